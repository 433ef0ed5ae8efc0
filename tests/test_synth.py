"""The offline world: files, determinism, ground truth, class design, CLI and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.errors import BadInput
from vlmtools.formats import read_class_list, read_descriptors, read_manifest
from vlmtools.synth import (VOCAB, caption, class_captions, make_classes, make_world, oracle_descriptors,
                            sample_batch, sample_class_images)
from vlmtools.synth.world import OBJECT_ATTRIBUTES, _ATTRIBUTE_WORDS

runner = CliRunner()
WORLD_FILES = {"images", "masks", "manifest.jsonl", "attributes.jsonl", "classes.txt", "descriptors.jsonl",
               "descriptors-vague.jsonl", "captions.jsonl", "image_captions.jsonl", "world.json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    make_world(out, classes=6, per_class=5, domain="both", seed=3, test_fraction=0.4)
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_world_files_and_manifest(world):
    assert {p.name for p in world.iterdir()} == WORLD_FILES
    records = read_manifest(world / "manifest.jsonl")
    assert len(records) == 30
    assert all(Path(r["path"]).exists() and Path(r["mask"]).exists() for r in records)
    assert {r["split"] for r in records} == {"train", "test"}
    assert sum(r["split"] == "test" for r in records) == 6 * 2  # round(5 * 0.4) per class
    assert {r["domain"] for r in records} == {"photo", "painting"}
    classes = read_class_list(world / "classes.txt")
    assert classes == read_class_list(world / "manifest.jsonl") == read_class_list(world / "descriptors.jsonl")
    attrs = _jsonl(world / "attributes.jsonl")
    assert [a["id"] for a in attrs] == [r["id"] for r in records]
    assert all(a["domain"] == r["domain"] and a["label"] == r["label"] for a, r in zip(attrs, records))
    info = json.loads((world / "world.json").read_text())
    assert info["seed"] == 3 and [d["name"] for d in info["definitions"]] == classes


def test_masks_are_exact_object_silhouettes(world):
    records = read_manifest(world / "manifest.jsonl")
    attrs = _jsonl(world / "attributes.jsonl")
    for rec, a in zip(records[:10], attrs[:10]):
        image = np.asarray(Image.open(rec["path"]))
        mask = np.asarray(Image.open(rec["mask"]))
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}
        ys, xs = np.nonzero(mask)
        # the mask's box holds the recorded object position and is about as big as its radius says
        assert xs.min() - 2 <= a["x"] * 64 <= xs.max() + 2 and ys.min() - 2 <= a["y"] * 64 <= ys.max() + 2
        assert 0.5 * a["radius"] < (xs.max() - xs.min()) / 64 < 2.2 * a["radius"]


def test_oracle_descriptors_follow_the_class_definitions(world):
    descriptors = read_descriptors(world / "descriptors.jsonl")
    info = json.loads((world / "world.json").read_text())
    for cls in info["definitions"]:
        rec = descriptors[cls["name"]]
        assert rec["style"] == "oracle"
        assert rec["kinds"].count("background") == 1 and rec["kinds"].count("object") == len(OBJECT_ATTRIBUTES)
        habitat_line = rec["descriptors"][rec["kinds"].index("background")]
        assert cls["attributes"]["habitat"][0][0] in habitat_line
        assert cls["attributes"]["shape"][0][0] in " ".join(rec["descriptors"])
    captions = _jsonl(world / "captions.jsonl")
    assert [c["class"] for c in captions] == list(descriptors)
    for c in captions:
        assert c["sentences"] and all(c["class"] not in s for s in c["sentences"])


def test_same_seed_same_bytes_other_seed_other_world(tmp_path, world):
    again = tmp_path / "again"
    make_world(again, classes=6, per_class=5, domain="both", seed=3, test_fraction=0.4)
    assert _tree_bytes(again) == _tree_bytes(world)
    other = tmp_path / "other"
    make_world(other, classes=6, per_class=5, domain="both", seed=4, test_fraction=0.4)
    assert (other / "classes.txt").read_text() != (world / "classes.txt").read_text()


def test_domains(tmp_path):
    for domain in ("photo", "painting"):
        out = tmp_path / domain
        make_world(out, classes=2, per_class=3, domain=domain, seed=0)
        assert {r["domain"] for r in read_manifest(out / "manifest.jsonl")} == {domain}
    photo = np.asarray(Image.open(tmp_path / "photo" / "images" / "00000.png")).astype(float)
    painting = np.asarray(Image.open(tmp_path / "painting" / "images" / "00000.png")).astype(float)
    assert np.abs(photo - painting).mean() > 5  # the same seed renders differently in the two domains


def test_class_design():
    classes = make_classes(20, seed=0)
    names = [c["name"] for c in classes]
    assert len(set(names)) == 20
    for name in names:  # made-up names say nothing about the attributes
        assert not any(w in name.lower() for w in _ATTRIBUTE_WORDS), name
    groups = [c["group"] for c in classes]
    assert any(g.startswith("fine:") for g in groups) and "habitat" in groups
    by_name = {c["name"]: c for c in classes}
    for c in classes:
        if c["partner"] is None:
            continue
        p = by_name[c["partner"]]
        differing = [a for a in c["attributes"] if c["attributes"][a] != p["attributes"][a]]
        if c["group"] == "habitat":
            assert differing == ["habitat"]
        else:
            assert differing == [c["group"].split(":")[1]]
    signatures = {tuple(oracle_descriptors(c)[0]) for c in classes}
    assert len(signatures) == 20  # oracle descriptors tell every class apart


def test_captions_name_attributes_never_classes():
    rng = np.random.default_rng(0)
    _, _, attrs = sample_batch(rng, 64, hard_negatives=0.3)
    class_names = {c["name"] for c in make_classes(50, seed=0)}
    texts = [caption(rng, a) for a in attrs]
    assert len(set(texts)) > 40  # varied templates
    assert not any(name in t for t in texts for name in class_names)
    vocabulary = {w for values in VOCAB.values() for w in values}
    assert sum(any(w in t for w in vocabulary) for t in texts) >= 60
    assert all(any(c["name"] in s for s in class_captions(c)) is False for c in make_classes(5, 0))


def test_sample_batch_arrays_and_hard_negatives():
    rng = np.random.default_rng(1)
    images, masks, attrs = sample_batch(rng, 32, image_size=64, domain="photo", hard_negatives=1.0)
    assert images.shape == (32, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (32, 64, 64) and masks.dtype == bool and masks.any(axis=(1, 2)).all()
    assert {a["domain"] for a in attrs} == {"photo"}
    for prev, cur in zip(attrs, attrs[1:]):  # every image is its predecessor with one attribute changed
        assert sum(prev[k] != cur[k] for k in ("colour", "shape", "pattern", "size", "habitat")) == 1
    again = sample_batch(np.random.default_rng(1), 32, 64, "photo", 1.0)
    assert np.array_equal(again[0], images)


def test_sample_class_images_follow_the_classes():
    classes = make_classes(4, seed=2)
    images, masks, attrs, labels = sample_class_images(np.random.default_rng(0), classes, 20, "painting")
    assert images.shape == (80, 64, 64, 3) and labels[:20] == [classes[0]["name"]] * 20
    main_shape = classes[0]["attributes"]["shape"][0][0]
    assert all(a["shape"] == main_shape for a in attrs[:20])
    assert {a["style"] for a in attrs} <= {"posterized", "brush", "ink"}


def test_generation_costs_little_beyond_rendering(tmp_path):
    """Writing a world (PNGs, masks, JSONL) costs at most about as much again as rendering its images in
    memory: a ratio measured in one run, so it holds on a busy machine too (200 images: ~3 s idle)."""
    import time

    start = time.perf_counter()
    sample_class_images(np.random.default_rng(0), make_classes(10, seed=0), 20, "photo")
    render_only = time.perf_counter() - start
    start = time.perf_counter()
    make_world(tmp_path / "w", classes=10, per_class=20, seed=0)
    assert time.perf_counter() - start < 2.5 * render_only + 1.0


# ----------------------------------------------------------------------------- CLI

def test_cli_make_prints_summary(tmp_path):
    out = tmp_path / "w"
    result = runner.invoke(app, ["synth", "make", str(out), "--classes", "3", "--per-class", "4",
                                 "--domain", "painting", "--seed", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 12 and summary["classes"] == 3 and summary["domain"] == "painting"
    assert len(list((out / "images").glob("*.png"))) == 12


def test_cli_refuses_non_empty_out_unless_force(tmp_path):
    out = tmp_path / "w"
    args = ["synth", "make", str(out), "--classes", "2", "--per-class", "2"]
    assert runner.invoke(app, args).exit_code == 0
    before = _tree_bytes(out)
    result = runner.invoke(app, args + ["--seed", "5"])
    assert result.exit_code == 2 and "not empty" in result.output and "--force" in result.output
    assert _tree_bytes(out) == before
    result = runner.invoke(app, args + ["--seed", "5", "--force"])
    assert result.exit_code == 0
    assert _tree_bytes(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp or old dirs left


def test_cli_force_never_deletes_a_non_world(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    result = runner.invoke(app, ["synth", "make", str(out), "--force", "--classes", "2", "--per-class", "1"])
    assert result.exit_code == 2 and "not a synth world" in result.output
    assert (out / "thesis.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--domain", "cartoon"], "--domain"),
    (["--classes", "1"], "--classes"),
    (["--per-class", "0"], "--per-class"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--image-size", "8"], "--image-size"),
])
def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "w"
    result = runner.invoke(app, ["synth", "make", str(out), *args])
    assert result.exit_code == 2 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import vlmtools.synth.make as make_module

    calls = {"n": 0}
    real_render = make_module.render

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(make_module, "render", flaky)
    with pytest.raises(RuntimeError):
        make_world(tmp_path / "w", classes=2, per_class=5)
    assert list(tmp_path.iterdir()) == []


def test_library_bad_input():
    with pytest.raises(BadInput, match="--domain"):
        make_world("/nonexistent/never", domain="oil")


def test_read_back(world, tmp_path):
    from vlmtools.synth import load_world, read_attributes

    info = load_world(world)
    attrs = read_attributes(world)
    assert len(attrs) == 30 and info["classes"] == 6
    assert all(a["label"] in {d["name"] for d in info["definitions"]} for a in attrs.values())
    (tmp_path / "world.json").write_text("{}")
    with pytest.raises(BadInput, match="world.json"):
        load_world(tmp_path)
