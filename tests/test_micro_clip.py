"""The micro CLIP: shipped weights match the config, load offline, and have learned the offline world."""

import json

import numpy as np
import pytest

from vlmtools.models import ModelSpec, load_model, packaged_configs, packaged_weights
from vlmtools.synth import (attribute_accuracy, class_name_accuracy, descriptor_accuracy, encode_images,
                            evaluate_world, make_classes, oracle_descriptors, sample_class_images)
from vlmtools.synth.world import VOCAB

NAME = "vlmtools-micro"


@pytest.fixture(scope="module")
def micro():
    return load_model(ModelSpec.parse(NAME), "cpu")


def test_config_is_packaged_with_standard_tokenizer():
    config = json.loads(packaged_configs()[NAME].read_text())
    assert config["vision_cfg"]["image_size"] == 64
    assert config["text_cfg"]["vocab_size"] == 49408  # open_clip's standard BPE tokenizer
    assert "hf_tokenizer_name" not in config["text_cfg"]


def test_shipped_weights_match_the_config_exactly():
    import open_clip
    from safetensors.torch import load_file

    from vlmtools.models import _register_packaged_configs

    path = packaged_weights(NAME)
    assert path is not None, f"vlmtools/weights/{NAME}.safetensors is missing"
    assert path.stat().st_size <= 20 * 2 ** 20
    _register_packaged_configs()
    expected = open_clip.create_model(NAME, pretrained=None).state_dict()
    shipped = load_file(str(path))
    assert set(shipped) == set(expected), (set(shipped) ^ set(expected))
    for key, tensor in shipped.items():
        assert tuple(tensor.shape) == tuple(expected[key].shape), key
        assert str(tensor.dtype) == "torch.float16", key
        assert bool(tensor.float().isfinite().all()), key


def test_packaged_model_loads_offline_by_default(micro, monkeypatch):
    assert ModelSpec.parse(NAME).pretrained == "vlmtools"
    assert micro.image_size == 64
    texts = micro.encode_texts(["a photo of a red triangle.", "a painting of a blue circle on water."])
    assert texts.shape == (2, micro.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-4)


def test_encode_images_matches_the_models_own_preprocess(micro):
    import torch
    from PIL import Image

    classes = make_classes(2, seed=0)
    images = sample_class_images(np.random.default_rng(0), classes, 2)[0]
    fast = encode_images(micro, images)
    slow = micro.encode_image_tensor(torch.stack([micro.preprocess(Image.fromarray(im)) for im in images])).numpy()
    np.testing.assert_allclose(fast, slow, atol=1e-4)


def test_micro_clip_knows_the_world_fast(micro):
    """A small held-out world: attributes far above chance, names near chance, descriptors far above names."""
    classes = make_classes(10, seed=7)
    images, _, attrs, labels = sample_class_images(np.random.default_rng([7, 1]), classes, 12, "photo")
    feats = encode_images(micro, images)
    acc = attribute_accuracy(micro, feats, attrs, which=("colour", "shape", "pattern", "habitat"))
    for attribute, value in acc.items():
        chance = 1 / len(VOCAB[attribute])
        assert value > chance + 0.3, (attribute, value)
    names = [c["name"] for c in classes]
    by_name = class_name_accuracy(micro, feats, labels, names)
    by_descriptors = descriptor_accuracy(micro, feats, labels,
                                         {c["name"]: oracle_descriptors(c)[0] for c in classes})
    assert by_name < 0.35  # chance is 0.1: a made-up name tells the model nothing
    assert by_descriptors > by_name + 0.3


def test_micro_clip_held_out_figures():
    """The figures recorded in the README (20 classes x 30 images, both domains)."""
    encoder = load_model(ModelSpec.parse(NAME), "cpu")
    result = evaluate_world(encoder, classes=20, per_class=30, seed=1000, domain="both")
    for attribute, value in result["attributes"].items():
        assert value > result["attribute_chance"][attribute] + 0.2, (attribute, value)
    assert result["class_name"] < 3 * result["chance"]
    assert result["descriptors"] > result["class_name"] + 0.3


def test_training_script_is_deterministic_and_writes_loadable_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    from vlmtools.synth import train_micro

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name / "micro.safetensors"
        train_micro.main(["--steps", "2", "--batch-size", "8", "--log-every", "1", "--eval-per-class", "2",
                          "--out", str(out)])
        evaluation = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(evaluation) == {"photo", "painting"} and "shape" in evaluation["painting"]["attributes"]
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["steps_done"] == 2 and [s for s, _ in record["loss_curve"]] == [1, 2]
        assert record["domains"] == ["photo", "painting"] and record["weights"]["bytes"] == out.stat().st_size
        assert record["seconds"] > 0 and record["eval"] == evaluation
        runs.append(out.read_bytes())
        weights = load_file(str(out))
        assert all(str(t.dtype) == "torch.float16" for t in weights.values())
    assert runs[0] == runs[1]


def test_training_can_continue_from_weights(tmp_path, capsys):
    from vlmtools.synth import train_micro

    first = tmp_path / "micro.safetensors"
    train_micro.main(["--steps", "1", "--batch-size", "4", "--eval-per-class", "1", "--out", str(first)])
    train_micro.main(["--steps", "1", "--batch-size", "4", "--eval-per-class", "1", "--seed", "1",
                      "--init", str(first), "--out", str(first)])
    capsys.readouterr()
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["init"]["previous_record"]["settings"]["seed"] == 0
    assert "--init" in record["command"] and len(record["init"]["sha256"]) == 64


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys):
    """Stopped after 2 of 4 steps and resumed: the same fp16 bytes, the same loss curve, two runs recorded."""
    from vlmtools.synth import train_micro

    common = ["--model", "vlmtools-micro-vit", "--domains", "photo", "--steps", "4", "--batch-size", "6",
              "--log-every", "1", "--eval-per-class", "0", "--nuisance", "0.5", "--threads", "1"]
    whole = tmp_path / "whole" / "w.safetensors"
    train_micro.main(common + ["--out", str(whole)])
    parts = tmp_path / "parts" / "w.safetensors"
    train_micro.main(common + ["--out", str(parts), "--stop-at", "2"])
    stopped = json.loads(parts.with_suffix(".json").read_text())
    assert stopped["steps_done"] == 2 and "eval" not in stopped
    assert parts.with_suffix(".ckpt.safetensors").exists()
    train_micro.main(common + ["--out", str(parts), "--resume"])
    capsys.readouterr()
    assert parts.read_bytes() == whole.read_bytes()
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (whole, parts))
    assert a["loss_curve"] == b["loss_curve"] and b["steps_done"] == 4
    assert [(r["from_step"], r["to_step"]) for r in b["runs"]] == [(0, 2), (2, 4)]


def test_resume_refuses_other_settings(tmp_path):
    from vlmtools.synth import train_micro

    out = tmp_path / "w.safetensors"
    base = ["--model", "vlmtools-micro-photo", "--domains", "photo", "--steps", "3", "--batch-size", "4",
            "--eval-per-class", "0", "--out", str(out), "--threads", "1"]
    train_micro.main(base + ["--stop-at", "1"])
    with pytest.raises(SystemExit, match="other settings.*lr"):
        train_micro.main(base + ["--resume", "--lr", "0.01"])


def test_compact_weights_store_only_trained_token_rows_and_load_back(tmp_path, capsys):
    """A photo-only micro model saves the token rows training touched; load_model rebuilds the full
    embedding (untouched rows = the fixed base draw) and encodes exactly as the trained model."""
    import torch
    from safetensors.torch import load_file

    from vlmtools.models import TOKEN_ROWS_KEY, base_token_embedding, load_model
    from vlmtools.synth import train_micro

    out = tmp_path / "w.safetensors"
    train_micro.main(["--model", "vlmtools-micro-photo", "--domains", "photo", "--steps", "2", "--batch-size",
                      "8", "--eval-per-class", "0", "--out", str(out), "--threads", "1"])
    capsys.readouterr()
    stored = load_file(str(out))
    rows = stored[TOKEN_ROWS_KEY]
    assert 10 < len(rows) < 2000 and stored["token_embedding.weight"].shape == (len(rows), 96)
    assert out.stat().st_size < 8 * 2 ** 20
    encoder = load_model(ModelSpec.parse("vlmtools-micro-photo", str(out)), "cpu")
    full = encoder.model.token_embedding.weight.detach().half()
    base = base_token_embedding(49408, 96)
    untouched = torch.ones(49408, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(full[untouched], base[untouched])
    assert torch.equal(full[rows], stored["token_embedding.weight"])


def test_vit_has_a_conv_stem_and_an_8x8_token_grid():
    import torch

    from vlmtools.models import create_packaged_model

    model = create_packaged_model("vlmtools-micro-vit")
    visual = model.visual
    assert len(visual.transformer.resblocks) >= 6
    assert isinstance(visual.conv1, torch.nn.Sequential)
    tokens = visual.conv1(torch.zeros(1, 3, 64, 64))
    assert tokens.shape[-2:] == (8, 8) and tokens.shape[1] == visual.transformer.width
    with torch.no_grad():
        out = visual.forward_intermediates(torch.zeros(1, 3, 64, 64), indices=[0, 5], intermediates_only=True,
                                           output_fmt="NCHW")
    assert [tuple(t.shape[-2:]) for t in out["image_intermediates"]] == [(8, 8), (8, 8)]
