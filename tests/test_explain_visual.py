"""Visual explanations (study 003): saliency methods, their metrics, `explain visual`, `eval explanations`,
`train ala`. Robust facts only: known-region models, analytic curves, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.explain import metrics as M
from vlmtools.explain import saliency as S

runner = CliRunner()
SIZE = 32
REGION = (slice(8, 24), slice(0, 16))  # rows 8..23, cols 0..15: a quarter of the image


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def region_mask():
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[REGION] = True
    return m


class RegionFeatures(torch.nn.Module):
    """The image's first channel pooled to an 8x8 grid, zero outside the region (position-aware features)."""

    def __init__(self):
        super().__init__()
        gate = torch.from_numpy(region_mask()).float()[None, None]
        self.register_buffer("gate", torch.nn.functional.avg_pool2d(gate, 4))

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x[:, :1], 4) * self.gate


class RegionModel(torch.nn.Module):
    """A model whose decision depends on one known region: the sum of its region features."""

    def __init__(self):
        super().__init__()
        self.features = RegionFeatures()

    def forward(self, x):
        return self.features(x).sum(dim=(1, 2, 3))


def test_every_method_finds_the_region_a_synthetic_model_depends_on():
    model = RegionModel()
    x = torch.ones(1, 3, SIZE, SIZE)
    mask = region_mask()
    cam = S.gradcam(x, model, model.features, lambda a, b: a)[0]
    rise = S.rise(x, model, masks=8000, cell=4, p=0.5, seed=0, batch=2000)  # >= 0.82 for seeds 0-7
    # rollout: 4 px patches (8x8 grid); every token attends to the region's patches in each of 2 blocks
    patch_region = np.zeros((8, 8), dtype=bool)
    patch_region[2:6, 0:4] = True
    att = torch.zeros(1, 65, 65)
    att[:, :, 1:][:, :, torch.from_numpy(patch_region.reshape(-1))] = 1.0
    att = att / att.sum(-1, keepdim=True)
    roll = S.rollout([att, att], size=(SIZE, SIZE))[0]
    for name, m in (("gradcam", cam), ("rise", rise), ("rollout", roll)):
        assert m.shape == (SIZE, SIZE) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0
        assert M.iou(m, mask) >= 0.8, name


def test_rise_is_seeded_and_batching_does_not_change_it():
    model = RegionModel()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    a = S.rise(x, model, masks=50, cell=4, seed=3, batch=50)
    b = S.rise(x, model, masks=50, cell=4, seed=3, batch=7)
    c = S.rise(x, model, masks=50, cell=4, seed=4, batch=50)
    assert np.allclose(a, b, atol=1e-5)
    assert not np.allclose(a, c)


def test_iou_threshold_rule_is_mean_plus_std():
    m = np.array([[0.0, 0.1], [0.5, 0.9]], dtype=np.float32)
    assert M.binarize(m).tolist() == [[False, False], [False, True]]  # mean .375 + std .35 = .725
    assert M.iou(m, np.array([[0, 0], [0, 1]], bool)) == 1.0
    assert M.iou(m, np.array([[0, 0], [1, 1]], bool)) == 0.5
    assert M.iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 1.0


def test_insertion_deletion_of_a_constant_map_equal_the_analytic_values():
    # score = mean pixel value; all-ones image: deleting pixels (to 0) in any order falls linearly
    # from 1 to 0 (AUC 1/2); the blurred canvas of a constant image is the image (AUC 1)
    x = torch.ones(1, 3, SIZE, SIZE)
    score = lambda t: t.mean(dim=(1, 2, 3))  # noqa: E731
    flat = np.full((SIZE, SIZE), 0.3, np.float32)
    xs, ys = M.causal_curve(x, flat, score, "deletion", steps=10)
    assert xs[0] == 0.0 and xs[-1] == 1.0
    assert M.auc(xs, ys) == pytest.approx(0.5, abs=1e-6)
    assert M.auc(*M.causal_curve(x, flat, score, "insertion", steps=10)) == pytest.approx(1.0, abs=1e-6)
    zeros = torch.zeros_like(x)
    assert M.auc(*M.causal_curve(x, flat, score, "insertion", steps=7, canvas=zeros)) == pytest.approx(0.5, abs=1e-6)


def test_deletion_of_the_true_region_first_equals_its_area_over_two():
    # score = mean over the region (a quarter of the pixels): deleting it first drops the score to 0
    # after a quarter of the pixels, so AUC = 1/8; deleting it last: 1 until 3/4, then down: 3/4 + 1/8
    x = torch.ones(1, 3, SIZE, SIZE)
    mask = torch.from_numpy(region_mask())
    score = lambda t: t[:, 0][:, mask].mean(dim=1)  # noqa: E731
    good = region_mask().astype(np.float32)
    assert M.auc(*M.causal_curve(x, good, score, "deletion", steps=64)) == pytest.approx(1 / 8, abs=1e-6)
    assert M.auc(*M.causal_curve(x, 1 - good, score, "deletion", steps=64)) == pytest.approx(7 / 8, abs=1e-6)


def test_vit_tower_gradcam_and_rollout_maps(tiny_encoder):
    tower = S.ClipTower(tiny_encoder.model)
    assert tower.kind == "vit"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # unseeded: ~1 in 6 maps all zero
    target = tower.embed(x[:1]).detach()[0]
    cams = S.gradcam(x, lambda t: tower.embed(t) @ target, tower.cam_layer, tower.to_grid)
    att = tower.attentions(x)
    assert len(att) == 2 and att[0].shape == (2, 17, 17)
    assert torch.allclose(att[0].sum(-1), torch.ones(2, 17), atol=1e-5)
    rolls = S.rollout(att, size=(32, 32))
    for m in cams + rolls:
        assert m.shape == (32, 32) and 0.0 <= m.min() and m.max() <= 1.0
    assert cams[0].max() == 1.0  # not a degenerate (all-zero) map


# ----------------------------------------------------------------------------- through the CLI

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmtools.synth.make import make_world

    out = tmp_path_factory.mktemp("w") / "world"
    make_world(out, classes=3, per_class=6, seed=0, test_fraction=0.34)
    return out


@pytest.fixture(scope="module")
def gradcam_maps(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "gradcam"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro",
               "--where", "split=test", "--cbd", world / "descriptors.jsonl")
    assert r.exit_code == 0, r.output
    return out


def test_explain_visual_writes_maps_at_image_resolution(gradcam_maps, world):
    rows = [json.loads(x) for x in (gradcam_maps / "maps.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["method"] for r in rows} == {"gradcam"}
    info = json.loads((gradcam_maps / "info.json").read_text())
    assert info["format"] == "vlmtools.maps/1" and len(info["classes"]) == 3
    assert info["cbd"] == str((world / "descriptors.jsonl").resolve())  # eval's judge scores by description
    for r in rows:
        m = np.load(gradcam_maps / r["map"])
        assert m.dtype == np.float16 and m.shape == (64, 64)
        assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0
        assert (gradcam_maps / r["png"]).stat().st_size > 0
        assert r["class"] in info["classes"] and 0.0 <= r["prob"] <= 1.0


def test_eval_explanations_per_image_and_summary(gradcam_maps, world, tmp_path):
    summary = tmp_path / "summary.json"
    r = invoke("eval", "explanations", gradcam_maps, "--manifest", world / "manifest.jsonl", "--steps", "4",
               "--summary", summary)
    assert r.exit_code == 0, r.output
    rows = lines(r.stdout)
    assert len(rows) == 6
    for row in rows:
        assert 0.0 <= row["iou"] <= 1.0 and 0.0 <= row["insertion"] <= 1.0 and 0.0 <= row["deletion"] <= 1.0
        assert row["id_score"] == pytest.approx(row["insertion"] - row["deletion"], abs=2e-6)
    s = json.loads(summary.read_text())
    assert s["methods"][0]["method"] == "gradcam"
    assert s["methods"][0]["iou"] == pytest.approx(np.mean([x["iou"] for x in rows]), abs=1e-5)


def test_rise_and_per_descriptor_maps(world, tmp_path):
    out = tmp_path / "rise"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro", "--method",
               "rise", "--masks", "16", "--batch-size", "8", "--limit", "1", "--no-overlays",
               "--descriptors", world / "descriptors.jsonl")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "maps.jsonl").read_text().splitlines()]
    descs = [json.loads(x) for x in (world / "descriptors.jsonl").read_text().splitlines()]
    expected = next(d["descriptors"] for d in descs if d["class"] == rows[0]["class"])
    assert [r["descriptor"] for r in rows] == expected
    assert all(np.load(out / r["map"]).shape == (64, 64) for r in rows)
    assert json.loads((out / "info.json").read_text())["settings"] == {"masks": 16, "cell": 7, "p": 0.5, "seed": 0}


def test_unreadable_image_is_listed_and_the_run_goes_on(world, tmp_path):
    manifest = tmp_path / "m.jsonl"
    recs = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()][:2]
    recs[0]["path"] = str(world / recs[0]["path"])
    recs[1] = {**recs[1], "path": str(tmp_path / "broken.png")}
    (tmp_path / "broken.png").write_bytes(b"not a png")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = invoke("explain", "visual", manifest, "-o", tmp_path / "out", "-m", "vlmtools-micro", "--no-overlays")
    assert r.exit_code == 1
    assert "broken.png" in r.output
    assert len((tmp_path / "out" / "maps.jsonl").read_text().splitlines()) == 1
    assert "broken.png" in (tmp_path / "out" / "errors.jsonl").read_text()
    manifest.write_text(json.dumps(recs[1]) + "\n")  # nothing readable at all: exit 2
    r = invoke("explain", "visual", manifest, "-o", tmp_path / "none", "-m", "vlmtools-micro", "--no-overlays")
    assert r.exit_code == 2 and "no map made for any of 1 image(s)" in r.output
    assert not (tmp_path / "none").exists()  # no info.json and empty maps.jsonl left behind


def test_tar_members_are_read_from_the_tar(world, tmp_path):
    """A store embedded from a webdataset tar records TAR#MEMBER paths; explain visual reads them."""
    import io
    import tarfile

    recs = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()][:3]
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for i, rec in enumerate(recs):
            for name, data in ((f"{i:03d}.png", (world / rec["path"]).read_bytes()),
                               (f"{i:03d}.json", json.dumps({"label": rec["label"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    r = invoke("embed", "images", tar, "-o", tmp_path / "store", "-m", "vlmtools-micro", "--workers", "0")
    assert r.exit_code == 0, r.output
    r = invoke("classify", tmp_path / "store", "-o", tmp_path / "p.jsonl")
    assert r.exit_code == 0, r.output
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all("#" in p["path"] for p in preds)
    r = invoke("explain", "visual", tmp_path / "p.jsonl", "-o", tmp_path / "maps", "-m", "vlmtools-micro",
               "--no-overlays")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "maps" / "maps.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not (tmp_path / "maps" / "errors.jsonl").exists()
    assert all(np.load(tmp_path / "maps" / row["map"]).shape == (64, 64) for row in rows)
    from vlmtools.images import load_rgb

    assert load_rgb(preds[0]["path"]).size == Image.open(world / recs[0]["path"]).size
    with pytest.raises(FileNotFoundError):
        load_rgb(f"{tar}#999.png")


@pytest.mark.parametrize("args, message", [
    (["--method", "rise", "--p", "1.5"], "--p 1.5"),
    (["--method", "rollout"], "needs a ViT image tower"),
    (["--method", "ala"], "needs --head"),
    (["--method", "rollout", "--descriptors", "DESC"], "--descriptors needs"),
    (["--layer", "7"], "stages 1..4"),
    (["--method", "rise", "--layer", "2"], "--layer is for --method gradcam"),
])
def test_explain_visual_bad_input(world, tmp_path, args, message):
    out = tmp_path / "out"
    args = [str(world / "descriptors.jsonl") if a == "DESC" else a for a in args]
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro", "--limit", "1",
               *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (out / "maps.jsonl").exists()


def test_eval_explanations_bad_input(gradcam_maps, world, tmp_path):
    recs = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]
    no_mask = tmp_path / "nomask.jsonl"
    no_mask.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "mask"} | {"path": str(world / r["path"])})
                               + "\n" for r in recs))
    r = invoke("eval", "explanations", gradcam_maps, "--manifest", no_mask, "-o", tmp_path / "o.jsonl")
    assert r.exit_code == 2 and 'has no "mask"' in r.output
    assert not (tmp_path / "o.jsonl").exists()
    small = tmp_path / "small.jsonl"
    (tmp_path / "masks").mkdir()
    for rec in recs:
        Image.new("L", (32, 32)).save(tmp_path / "masks" / f"{rec['id']}.png")
    small.write_text("".join(json.dumps(r | {"path": str(world / r["path"]), "mask": f"masks/{r['id']}.png"}) + "\n"
                             for r in recs))
    r = invoke("eval", "explanations", gradcam_maps, "--manifest", small, "--no-causal")
    assert r.exit_code == 2 and "maps of another size" in r.output
    r = invoke("eval", "explanations", tmp_path, "--manifest", world / "manifest.jsonl")
    assert r.exit_code == 2 and "not a maps directory" in r.output


def test_train_ala_caches_features_resumably_and_explains(world, tmp_path):
    head = tmp_path / "ala"
    args = ["train", "ala", world / "manifest.jsonl", "-o", head, "-m", "vlmtools-micro", "--where", "split=train",
            "--epochs", "2", "--val-fraction", "0", "--d-model", "16", "--heads", "2", "--json"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    summary = lines(r.stdout)[-1]
    assert summary["kind"] == "ala" and summary["epochs"] == 2 and summary["layers"] == [0, 1, 2, 3, 4]
    info = json.loads((tmp_path / "ala.json").read_text())
    assert [e["side"] for e in info["curve"]] == ["trained", "frozen"]  # AEA: every other epoch frozen
    cache = tmp_path / "ala.features"
    store_info = json.loads((cache / "info.json").read_text())
    assert store_info["kind"] == "features" and store_info["count"] == 12
    shard = next(cache.glob("emb-*.npy"))
    before = shard.stat().st_mtime_ns
    r = invoke(*args)  # the second run reuses the cached features
    assert r.exit_code == 0, r.output
    assert shard.stat().st_mtime_ns == before
    r = invoke(*args, "--layers", "2,4")  # other layers, same cache: the message says how to rebuild it
    assert r.exit_code == 2 and f"delete {cache}" in r.output and "--force" not in r.output, r.output
    assert shard.stat().st_mtime_ns == before
    out = tmp_path / "maps"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "--method", "ala", "--head", head,
               "--where", "split=test", "--no-overlays")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "maps.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and np.load(out / rows[0]["map"]).shape == (64, 64)
    # a head trained with another seed: its maps are a second run (seed) of the same row
    r = invoke(*[a if a != head else tmp_path / "ala1" for a in args], "--seed", "1")
    assert r.exit_code == 0, r.output
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", tmp_path / "maps1", "--method", "ala", "--head",
               tmp_path / "ala1", "--where", "split=test", "--no-overlays")
    assert r.exit_code == 0, r.output
    summary = tmp_path / "s.json"
    r = invoke("eval", "explanations", out, tmp_path / "maps1", "--manifest", world / "manifest.jsonl", "--no-causal",
               "--summary", summary, "-o", tmp_path / "e.jsonl")
    assert r.exit_code == 0, r.output
    assert [(m["label"], m["runs"]) for m in json.loads(summary.read_text())["methods"]] == [("ala", 2)]
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", tmp_path / "x", "--method", "ala", "--head",
               head, "-m", "vlmtools-tiny", "--limit", "1")
    assert r.exit_code == 2 and "trained on the tower of vlmtools-micro" in r.output


def _maps_of(d):
    return [json.loads(x) for x in (d / "maps.jsonl").read_text().splitlines()]


def test_eval_explanations_rows_are_runs_of_equal_settings(gradcam_maps, world, tmp_path):
    import shutil

    layer2 = tmp_path / "layer2"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", layer2, "-m", "vlmtools-micro", "--where",
               "split=test", "--layer", "2", "--no-overlays")
    assert r.exit_code == 0, r.output
    again = tmp_path / "again"
    shutil.copytree(gradcam_maps, again)  # the same settings: a second run (seed) of the first row
    summary = tmp_path / "s.json"
    r = invoke("eval", "explanations", gradcam_maps, layer2, again, "--manifest", world / "manifest.jsonl",
               "--steps", "2", "--summary", summary, "-o", tmp_path / "per-map.jsonl")
    assert r.exit_code == 0, r.output
    rows = json.loads(summary.read_text())["methods"]
    assert [(m["method"], m["runs"]) for m in rows] == [("gradcam", 2), ("gradcam", 1)]
    assert rows[0]["label"] != rows[1]["label"] and "layer=2" in rows[1]["label"]
    assert rows[0]["maps"] == [str(gradcam_maps), str(again)] and rows[0]["iou_std"] == 0.0
    assert rows[1]["label"] in r.output
    # the first row scores insertion/deletion by description (--cbd), the second by class-name prompts
    assert "not comparable" in " ".join(r.output.split())
    fewer = tmp_path / "fewer"
    shutil.copytree(gradcam_maps, fewer)
    (fewer / "maps.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _maps_of(gradcam_maps)[:-1]))
    r = invoke("eval", "explanations", gradcam_maps, fewer, "--manifest", world / "manifest.jsonl", "--no-causal",
               "-o", tmp_path / "o.jsonl")
    assert r.exit_code == 2 and "different images" in " ".join(r.output.split())
    assert not (tmp_path / "o.jsonl").exists()


def test_explain_visual_refuses_a_used_output_unless_force(world, tmp_path):
    out = tmp_path / "maps"
    common = [world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro", "--no-overlays"]
    r = invoke("explain", "visual", *common, "--limit", "3")
    assert r.exit_code == 0, r.output
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    r = invoke("explain", "visual", *common, "--limit", "1", "--method", "rise", "--masks", "8")
    assert r.exit_code == 2 and "--force" in r.output
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    r = invoke("explain", "visual", *common, "--limit", "1", "--method", "rise", "--masks", "8", "--force")
    assert r.exit_code == 0, r.output
    rows = _maps_of(out)
    assert len(rows) == 1 and rows[0]["method"] == "rise"
    # the first run's maps are gone, the user's file stays, no temp directory is left beside -o
    assert {f.name for f in out.iterdir()} == {"info.json", "maps.jsonl", rows[0]["map"], "notes.txt"}
    assert [f.name for f in tmp_path.iterdir()] == ["maps"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", other, "-m", "vlmtools-micro", "--force")
    assert r.exit_code == 2 and "not a maps directory" in r.output
    assert [f.name for f in other.iterdir()] == ["x.txt"]


def test_explain_visual_interrupted_leaves_nothing(world, tmp_path, monkeypatch):
    from vlmtools.explain import visual as V

    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = V.save_map
    monkeypatch.setattr(V, "save_map", interrupt)
    with pytest.raises(KeyboardInterrupt):
        V.explain_visual(str(world / "manifest.jsonl"), tmp_path / "maps", opts=V.VisualOptions(),
                         model="vlmtools-micro", limit=3, png=False)
    assert list(tmp_path.iterdir()) == []
