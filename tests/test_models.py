import time

import numpy as np
import pytest

from vlmtools.errors import BadInput, ModelUnavailable, StoreMismatch
from vlmtools.models import ModelSpec, load_model
from tests.conftest import run_cli


def test_spec_defaults():
    assert ModelSpec.parse(None) == ModelSpec("ViT-B-32", "openai")
    assert ModelSpec.parse("vlmtools-tiny").pretrained == "none"
    assert ModelSpec.parse("vlmtools-tiny", "random").pretrained == "none"
    assert ModelSpec.parse("hf-hub:org/repo", "openai") == ModelSpec("hf-hub:org/repo", None)
    assert ModelSpec.parse("ViT-B-32", "./w.safetensors").pretrained.endswith("/w.safetensors")


def test_spec_mismatch_is_refused():
    spec = ModelSpec("ViT-B-32", "openai")
    spec.check_matches({"name": "ViT-B-32", "pretrained": "openai"}, "store")
    with pytest.raises(StoreMismatch, match="ViT-L-14"):
        spec.check_matches({"name": "ViT-L-14", "pretrained": "openai"}, "store")


def test_tiny_model_encodes_normalized(tiny_encoder):
    texts = tiny_encoder.encode_texts(["a red bird", "a blue car", "x"])
    assert texts.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    again = load_model(ModelSpec.parse("vlmtools-tiny"), "cpu").encode_texts(["a red bird"])
    np.testing.assert_allclose(texts[0], again[0], rtol=1e-5)  # random weights are seeded


def test_coca_architecture_loads_and_encodes():
    enc = load_model(ModelSpec.parse("vlmtools-tiny-coca"), "cpu")
    from PIL import Image

    img = enc.preprocess(Image.new("RGB", (40, 40), (200, 10, 10))).unsqueeze(0)
    feats = enc.encode_image_tensor(img)
    assert feats.shape == (1, enc.embed_dim)


def test_unknown_model_and_tag():
    with pytest.raises(BadInput, match="unknown model"):
        load_model(ModelSpec.parse("no-such-model", "openai"), "cpu")
    with pytest.raises(BadInput, match="no pretrained tag"):
        load_model(ModelSpec.parse("ViT-B-32", "no-such-tag"), "cpu")
    with pytest.raises(ModelUnavailable, match="no such file"):
        load_model(ModelSpec.parse("ViT-B-32", "/nonexistent/w.safetensors"), "cpu")


def test_bad_device():
    with pytest.raises(BadInput, match="--device"):
        load_model(ModelSpec.parse("vlmtools-tiny"), "tpu")


@pytest.mark.parametrize("offline_env", [{}, {"HF_HUB_OFFLINE": "1"}])
def test_offline_real_weights_fail_fast_and_clearly(tmp_path, image_dir, offline_env):
    """No network, no cache: exit 2, the message names the model, where it looked and how to fix it."""
    manifest = tmp_path / "m.txt"
    manifest.write_text(str(next(image_dir.glob("*.png"))) + "\n")
    # A closed local port stands in for the hub, so the test means the same with or without network.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_ENDPOINT": "http://127.0.0.1:9", **offline_env}
    start = time.perf_counter()
    proc = run_cli("embed", "images", manifest, "-o", tmp_path / "store", "--model", "ViT-B-32",
                   "--pretrained", "openai", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ViT-B-32" in proc.stderr and "openai" in proc.stderr
    assert str(tmp_path / "hf" / "hub") in proc.stderr
    assert "--pretrained /path/to" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "store").exists()


def test_cached_weights_are_found_in_the_hub_cache(tmp_path, monkeypatch):
    """A tag counts as available offline when its hub repo's weight file is in the cache (huggingface_hub's
    own lookup), not when a snapshot holds a config only."""
    from vlmtools.models import _is_cached

    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "open_clip_config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert not _is_cached("ViT-B-32", "openai")
    (repo / "snapshots" / "abc" / "open_clip_model.safetensors").write_bytes(b"")
    assert _is_cached("ViT-B-32", "openai") and not _is_cached("ViT-B-16", "openai")


def test_device_resolves_without_torch_where_no_gpu_can_be(monkeypatch):
    """--device cpu, and auto on a machine without a GPU driver, resolve without importing torch; a bad
    name is refused without it too; where a driver may be, auto asks torch."""
    import subprocess
    import sys

    import vlmtools.models as M

    code = ("import sys\nfrom vlmtools.models import resolve_device, gpu_driver_present\nfrom vlmtools.errors "
            "import BadInput\nout = [resolve_device('cpu')]\nif not gpu_driver_present():\n"
            "    out.append(resolve_device('auto'))\ntry:\n    resolve_device('tpu')\nexcept BadInput as e:\n"
            "    out.append('refused')\nprint(out, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("]")[1].strip() == "False", proc.stdout
    assert proc.stdout.startswith("['cpu', 'cpu', 'refused']" if not M.gpu_driver_present() else "['cpu', 'refused']")
    monkeypatch.setattr(M.os.path, "exists", lambda p: p == "/dev/nvidiactl")  # a driver: torch decides
    if sys.platform.startswith("linux"):
        assert M.gpu_driver_present()
        import torch

        assert M.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
