"""Harder worlds (synth make's options and --preset cub-like): what each option changes, determinism,
bad input. The figures they give with the packaged models are in tests/test_world_models.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.errors import BadInput
from vlmtools.formats import read_descriptors, read_manifest
from vlmtools.synth import make_classes, make_world
from vlmtools.synth.make import PRESETS, resolve_preset
from vlmtools.synth.render import render
from vlmtools.synth.world import VOCAB, name_word

runner = CliRunner()
SMALL_CUB = dict(PRESETS["cub-like"], classes=12, per_class=4)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    make_world(tmp_path / "a", seed=7, domain="both", **SMALL_CUB)
    make_world(tmp_path / "b", seed=7, domain="both", **SMALL_CUB)
    make_world(tmp_path / "c", seed=8, domain="both", **SMALL_CUB)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a["classes.txt"] != c["classes.txt"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == len([k for k in a if k.startswith("images/")])


def test_plain_options_give_the_plain_world(tmp_path):
    """Every harder option at its neutral value draws the same images as a world made without them."""
    make_world(tmp_path / "plain", classes=4, per_class=3, seed=2)
    make_world(tmp_path / "neutral", classes=4, per_class=3, seed=2, names="made-up", fine=0.3, family=2,
               overlap=0.0, clutter=0, occlusion=0.0, object_scale=1.0, noise=0.0, label_noise=0.0)
    assert _tree_bytes(tmp_path / "plain") == _tree_bytes(tmp_path / "neutral")


def test_informative_names_carry_true_attribute_words():
    plain = make_classes(30, seed=4)
    named = make_classes(30, seed=4, names="informative")
    assert [c["attributes"] for c in plain] == [c["attributes"] for c in named]
    counts = {}
    for p, c in zip(plain, named):
        words = [name_word(a, c["attributes"][a][0][0]) for a in c["named_attributes"]]
        assert c["name"] == " ".join(words + [p["name"]])
        for a in c["named_attributes"]:
            counts[a] = counts.get(a, 0) + 1
    assert {len(c["named_attributes"]) for c in named} == {1, 2}
    assert max(counts, key=counts.get) == "colour" and len(counts) >= 3  # colour most often, as in CUB


def test_families_of_confusable_siblings():
    classes = make_classes(30, seed=1, fine=0.6, family=3, overlap=0.2)
    families = {}
    for c in classes:
        if c["group"].startswith("fine:"):
            families.setdefault(c["family"], []).append(c)
    assert len(families) == 6 and all(len(f) == 3 for f in families.values())
    for members in families.values():
        attribute = members[0]["group"].split(":")[1]
        mains = {m["attributes"][attribute][0][0] for m in members}
        assert len(mains) == 3  # each sibling has its own main value ...
        for m in members:
            dist = dict(map(tuple, m["attributes"][attribute]))
            assert dist[m["attributes"][attribute][0][0]] == pytest.approx(0.8)  # ... kept 80% of the time
            assert set(dist) == mains and sum(dist.values()) == pytest.approx(1.0)
            others = [a for a in VOCAB if a in m["attributes"] and a != attribute]
            assert all(m["attributes"][a] == members[0]["attributes"][a] for a in others)


def test_nuisances_keep_masks_true_to_what_is_visible():
    rng = np.random.default_rng(0)
    attrs = {"colour": "red", "shape": "square", "pattern": "solid", "size": "large", "habitat": "sand",
             "domain": "photo", "style": "photo"}
    plain_img, plain_mask, _ = render(np.random.default_rng(5), attrs)
    img, mask, geometry = render(np.random.default_rng(5), attrs, nuisance={"occlusion": 0.2})
    assert 0.1 < geometry["occluded"] < 0.3  # a branch 8-16% of the image wide, placed to hide about 20%
    assert mask.sum() == pytest.approx((1 - geometry["occluded"]) * plain_mask.sum(), abs=1)
    assert not (mask & ~plain_mask).any()  # the same object, part of it hidden
    hidden = plain_mask & ~mask
    assert np.abs(img[hidden].astype(int) - plain_img[hidden].astype(int)).mean() > 30  # the branch shows there
    small = render(rng, attrs, nuisance={"scale": 0.6})[1]
    assert small.sum() < 0.5 * plain_mask.sum()
    cluttered, cmask, _ = render(np.random.default_rng(5), attrs, nuisance={"clutter": 6})
    assert np.array_equal(cmask.sum() > 0, True) and (cluttered != plain_img).any()


def test_label_noise_touches_train_labels_only(tmp_path):
    make_world(tmp_path / "w", classes=5, per_class=20, seed=0, label_noise=0.3)
    manifest = read_manifest(tmp_path / "w" / "manifest.jsonl")
    attrs = _jsonl(tmp_path / "w" / "attributes.jsonl")
    flipped = [m["split"] for m, a in zip(manifest, attrs) if m["label"] != a["label"]]
    assert set(flipped) == {"train"} and 0.15 < len(flipped) / 70 < 0.45
    assert all(a.get("given_label", a["label"]) == m["label"] for m, a in zip(manifest, attrs))


def test_vague_descriptors_are_the_oracle_plus_one_wrong_value(tmp_path):
    make_world(tmp_path / "w", classes=6, per_class=1, seed=0)
    oracle = read_descriptors(tmp_path / "w" / "descriptors.jsonl")
    vague = read_descriptors(tmp_path / "w" / "descriptors-vague.jsonl")
    assert list(oracle) == list(vague)
    for cls in oracle:
        lines = vague[cls]["descriptors"]
        assert len(lines) == len(oracle[cls]["descriptors"]) - 1 and vague[cls]["kinds"] == ["object"] * 4
        assert all(" or " in line for line in lines)  # no habitat line; every line names two values


def test_preset_values_and_overrides():
    assert resolve_preset("cub-like", classes=None, overlap=0.0)["overlap"] == 0.0
    assert resolve_preset("cub-like")["names"] == "informative"
    assert resolve_preset(None, clutter=2) == {"clutter": 2}
    with pytest.raises(BadInput, match="--preset"):
        resolve_preset("imagenet-like")


def test_cli_preset_records_its_options(tmp_path):
    out = tmp_path / "w"
    result = runner.invoke(app, ["synth", "make", str(out), "--preset", "cub-like", "--classes", "9",
                                 "--per-class", "2", "--clutter", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["preset"] == "cub-like" and summary["classes"] == 9
    options = json.loads((out / "world.json").read_text())["options"]
    assert options["clutter"] == 1 and options["names"] == "informative" and options["family"] == 3
    image = np.asarray(Image.open(out / "images" / "00000.png"))
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("args, message", [
    (["--preset", "imagenet-like"], "--preset"),
    (["--names", "latin"], "--names"),
    (["--overlap", "0.9"], "--overlap"),
    (["--family", "1"], "--family"),
    (["--clutter", "-1"], "--clutter"),
    (["--label-noise", "1.0"], "--label-noise"),
    (["--object-scale", "0.1"], "--object-scale"),
])
def test_cli_bad_options_exit_2_and_write_nothing(tmp_path, args, message):
    result = runner.invoke(app, ["synth", "make", str(tmp_path / "w"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []
