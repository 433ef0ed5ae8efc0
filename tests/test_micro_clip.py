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
        assert set(evaluation) == {"photo", "both"} and "domain" in evaluation["both"]["attributes"]
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["steps_done"] == 2 and [s for s, _ in record["loss_curve"]] == [1, 2]
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
