"""--precision: fp32 is open_clip's own fp32 forward, bf16 (autocast) and fp16 (half weights) differ from it
but stay close; the precision reaches stores (info.json) and predictions."""

import json

import numpy as np
import pytest

from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.models import ModelSpec, load_model

TEXTS = ["a photo of a bird", "Sooty Albatross, which has white rings around the eyes", "a red songbird"]


def run_cli(*args, input=None):
    """In-process (a subprocess per command costs seconds of imports); .returncode/.stdout/.stderr."""
    res = CliRunner().invoke(app, [str(a) for a in args], input=input)
    res.returncode = res.exit_code
    return res


@pytest.fixture(scope="module")
def encoders():
    spec = ModelSpec.parse("vlmtools-tiny")
    return {p: load_model(spec, "cpu", p) for p in ("fp32", "bf16", "fp16", "amp")}


def _open_clip_fp32():
    """vlmtools-tiny straight from open_clip (random weights from seed 0, as load_model makes them)."""
    import open_clip
    import torch

    from vlmtools.models import _register_packaged_configs

    _register_packaged_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("vlmtools-tiny", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("vlmtools-tiny")


def test_fp32_is_open_clips_fp32_forward_and_low_precisions_differ(encoders):
    import torch

    model, _, tokenizer = _open_clip_fp32()
    images = torch.randn(3, 3, encoders["fp32"].image_size, encoders["fp32"].image_size,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_t = torch.nn.functional.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1).numpy()
        ref_i = torch.nn.functional.normalize(model.encode_image(images), dim=-1).numpy()
    got = {p: (e.encode_texts(TEXTS), e.encode_image_tensor(images).numpy()) for p, e in encoders.items()}
    np.testing.assert_array_equal(got["fp32"][0], ref_t)
    np.testing.assert_array_equal(got["fp32"][1], ref_i)
    np.testing.assert_array_equal(got["amp"][0], ref_t)  # amp on CPU is fp32
    for low in ("bf16", "fp16"):
        for ours, ref in zip(got[low], (ref_t, ref_i)):
            assert ours.dtype == np.float32
            assert not np.array_equal(ours, ref), low
            assert np.min(np.sum(ours * ref, axis=1)) > 0.98, low  # same vectors, rounded
    assert encoders["fp16"].model.text_projection.dtype == torch.float16  # half weights, as clip.load
    assert encoders["bf16"].model.text_projection.dtype == torch.float32  # autocast over fp32 weights
    assert encoders["amp"].precision_info() == {"precision": "amp", "compute": "fp32"}


def test_precision_reaches_info_json_and_predictions(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    stores = {}
    for p in ("fp32", "bf16"):
        stores[p] = tmp_path / f"text-{p}"
        res = run_cli("embed", "text", texts, "-o", stores[p], "--model", "vlmtools-tiny", "--device", "cpu",
                      "--precision", p, "--dtype", "float32")
        assert res.returncode == 0, res.stderr
        info = json.loads((stores[p] / "info.json").read_text())
        assert (info["precision"], info["compute"], info["dtype"]) == (p, p, "float32")
    a, b = (np.load(stores[p] / "emb-00000.npy") for p in ("fp32", "bf16"))
    assert not np.array_equal(a, b)
    # another precision into the same store is refused, nothing changed
    res = run_cli("embed", "text", texts, "-o", stores["fp32"], "--model", "vlmtools-tiny", "--device", "cpu",
                  "--precision", "fp16", "--dtype", "float32")
    assert res.returncode == 2 and "precision" in res.stderr
    np.testing.assert_array_equal(np.load(stores["fp32"] / "emb-00000.npy"), a)

    from vlmtools.store import write_arrays

    meta = [{"id": f"im{i}", "label": c} for i, c in enumerate(["bird", "owl", "bird"])]
    write_arrays(tmp_path / "images", np.eye(3, 32), meta, kind="image",
                 model={"name": "vlmtools-tiny", "pretrained": "none"},
                 extra_info={"precision": "fp16", "compute": "fp16"})
    (tmp_path / "classes.txt").write_text("bird\nowl\n")
    res = run_cli("classify", tmp_path / "images", "--classes", tmp_path / "classes.txt", "--precision", "bf16",
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr
    preds = [json.loads(line) for line in res.stdout.splitlines()]
    assert preds and all(r["precision"] == {"image": "fp16", "text": "bf16"} for r in preds)


def test_bad_precision_is_bad_input(tmp_path):
    res = run_cli("embed", "text", "-", "-o", tmp_path / "s", "--model", "vlmtools-tiny", "--precision", "fp8",
                  input="a bird\n")
    assert res.returncode == 2 and "fp8" in res.stderr
    assert not (tmp_path / "s").exists()
