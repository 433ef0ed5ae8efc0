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


def test_iou_threshold_rules():
    # default: the map as the ALA authors save it, uint8(255 m) truncated, salient where grey > 127
    m = np.array([[127 / 255, 127.99 / 255], [128 / 255, 1.0]], dtype=np.float32)
    assert M.binarize(m).tolist() == [[False, False], [True, True]]
    assert M.binarize(m, "0.75").tolist() == [[False, False], [False, True]]  # grey > floor(191.25)
    # mean+std kept as an option
    m = np.array([[0.0, 0.1], [0.5, 0.9]], dtype=np.float32)
    assert M.binarize(m, "mean+std").tolist() == [[False, False], [False, True]]  # .375 + .35 = .725
    assert M.iou(m, np.array([[0, 0], [0, 1]], bool), "mean+std") == 1.0
    assert M.iou(m, np.array([[0, 0], [0, 1]], bool)) == 1.0     # .5 is grey 127 (truncated): not salient
    assert M.iou(m, np.array([[0, 0], [1, 1]], bool)) == 0.5
    assert M.iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 1.0
    for bad in ("1.5", "0", "mean", "x"):
        with pytest.raises(ValueError):
            M.parse_threshold(bad)


# ----------------------------------------------------------------------------- RISE's CausalMetric, restated

def rise_gkern(klen, nsig):
    """RISE's gkern restated: scipy.ndimage.gaussian_filter (mode 'reflect' = numpy's 'symmetric' padding,
    weights exp(-t²/2σ²) for |t| <= int(4σ + .5), normalised) of an impulse in a klen × klen window."""
    r = int(4 * nsig + 0.5)
    w = np.exp(-0.5 * np.arange(-r, r + 1) ** 2 / nsig ** 2)
    w /= w.sum()
    impulse = np.zeros(klen)
    impulse[klen // 2] = 1.0
    padded = np.pad(impulse, r, mode="symmetric")  # wider than the window: pad again, reflecting each time
    while len(padded) < klen + 2 * r:
        padded = np.pad(padded, r, mode="symmetric")
    mid = (len(padded) - klen) // 2
    line = np.convolve(padded, w, mode="same")[mid:mid + klen]
    return np.outer(line, line).astype(np.float32)


def rise_single_run(model, img, explanation, mode, step, klen=11, nsig=5):
    """RISE's CausalMetric.single_run (eclique/RISE evaluation.py) with its Evaluation notebook's substrates:
    insertion from conv2d(img, gkern 3x3xKxK diagonal, padding=K//2), deletion to zeros."""
    H, W = img.shape[-2:]
    HW = H * W
    c = int(model(img).argmax(1)[0])
    n_steps = (HW + step - 1) // step
    kern = np.zeros((3, 3, klen, klen), np.float32)
    for ch in range(3):
        kern[ch, ch] = rise_gkern(klen, nsig)
    if mode == "del":
        start, finish = img.clone(), torch.zeros_like(img)
    else:
        start = torch.nn.functional.conv2d(img, torch.from_numpy(kern), padding=klen // 2)
        finish = img.clone()
    scores = np.empty(n_steps + 1)
    order = np.flip(np.argsort(explanation.reshape(-1, HW), axis=1, kind="stable"), axis=-1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores[i] = model(start)[0, c]
        if i < n_steps:
            coords = order[0, step * i:step * (i + 1)]
            start.numpy().reshape(3, HW)[:, coords] = finish.numpy().reshape(3, HW)[:, coords]
    return scores, (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)


class SmallNet(torch.nn.Module):
    """A seeded conv net with a softmax over 4 classes: the model RISE's metric is run on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        return torch.softmax(self.fc(h) * 5, dim=1)


def test_gkern_is_rises():
    for klen, nsig in ((11, 5), (5, 5), (11, 1), (7, 2.5)):
        assert np.abs(M.gkern(klen, nsig) - rise_gkern(klen, nsig)).max() < 1e-8
    k = M.gkern(11, 5)
    assert k.sum() == pytest.approx(1.0, abs=1e-6) and k.max() / k.min() < 1.2  # nearly flat, not σ = 1


def test_gkern_equals_scipy_where_scipy_is_installed():
    ndimage = pytest.importorskip("scipy.ndimage")
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    assert np.abs(M.gkern(11, 5) - ndimage.gaussian_filter(impulse, 5).astype(np.float32)).max() < 1e-8


@pytest.mark.parametrize("size, step", [((16, 28), None), ((18, 23), 7), ((16, 16), 256)])
def test_insertion_deletion_equal_rise_causal_metric(size, step):
    model = SmallNet().eval()
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(1, 3, *size, generator=gen)
    # a map with ties (16 levels), as float16 maps upsampled have
    sal = np.round(torch.rand(size, generator=gen).numpy() * 15) / 15
    H, W = size
    used = step or -(-H * W // 224)
    c = int(model(img).argmax(1)[0])
    ref_aucs = {}
    for ours, theirs in (("insertion", "ins"), ("deletion", "del")):
        xs, ys = M.causal_curve(img.clone(), sal, lambda t: model(t)[:, c], ours, step, batch=64)
        ref, ref_aucs[ours] = rise_single_run(model, img.clone(), sal, theirs, used)
        assert len(ys) == len(ref) == -(-H * W // used) + 1
        assert np.abs(ys - ref).max() < 1e-5, ours
        assert xs[0] == 0.0 and xs[-1] == 1.0
        assert abs(M.auc(ys) - ref_aucs[ours]) < 1e-5
    # eval's scorer path: the class is the model's own prediction on the full image
    from vlmtools.explain.visual import EvalOptions, _causal_scores

    class Scorer:
        name, classes = "small", ["a", "b", "c", "d"]

        def tensor(self, image):
            return img.clone()

        def probs(self, x):
            return model(x)

    row = _causal_scores(Scorer(), None, sal.astype(np.float32), EvalOptions(step=step).check(),
                         M.gkern(11, 5))
    assert row["scored_class"] == "abcd"[c] and row["step"] == used
    assert abs(row["insertion"] - ref_aucs["insertion"]) < 1e-5 and abs(row["deletion"] - ref_aucs["deletion"]) < 1e-5


def test_deletion_of_the_true_region_first_equals_its_area_over_two():
    # score = mean over the region (a quarter of the pixels): deleting it first drops the score to 0
    # after a quarter of the pixels, so AUC = 1/8; deleting it last: 1 until 3/4, then down: 3/4 + 1/8
    x = torch.ones(1, 3, SIZE, SIZE)
    mask = torch.from_numpy(region_mask())
    score = lambda t: t[:, 0][:, mask].mean(dim=1)  # noqa: E731
    good = region_mask().astype(np.float32)
    assert M.auc(M.causal_curve(x, good, score, "deletion", step=16)[1]) == pytest.approx(1 / 8, abs=1e-6)
    assert M.auc(M.causal_curve(x, 1 - good, score, "deletion", step=16)[1]) == pytest.approx(7 / 8, abs=1e-6)
    zeros = torch.zeros_like(x)  # inserting the region first into a black canvas: the mirror image
    assert M.auc(M.causal_curve(x, good, score, "insertion", step=16, canvas=zeros)[1]) == pytest.approx(7 / 8, abs=1e-6)


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
    r = invoke("eval", "explanations", gradcam_maps, "--manifest", world / "manifest.jsonl", "--step", "1024",
               "--summary", summary)
    assert r.exit_code == 0, r.output
    rows = lines(r.stdout)
    assert len(rows) == 6
    for row in rows:  # 64 x 64 inputs, 1024 px per step: 4 steps; scored by the CBD classifier explained
        assert row["step"] == 1024 and row["scorer"] == "clip vlmtools-micro cbd descriptors.jsonl"
        assert row["id_score"] == pytest.approx(row["insertion"] - row["deletion"], abs=2e-6)
    s = json.loads(summary.read_text())
    assert s["methods"][0]["method"] == "gradcam" and s["scorer"] == "own" and s["steps"] == "1024 px per step"
    assert s["methods"][0]["iou"] == pytest.approx(np.mean([x["iou"] for x in rows]), abs=1e-5)
    assert s["methods"][0]["insertion"] == pytest.approx(np.mean([x["insertion"] for x in rows]), abs=1e-5)
    r = invoke("eval", "explanations", gradcam_maps, "--manifest", world / "manifest.jsonl", "--step", "1024",
               "--blur", "0")  # no blur: the canvas is the image, so insertion is the full image's score
    assert r.exit_code == 0, r.output
    assert [x["insertion"] for x in lines(r.stdout)] != [x["insertion"] for x in rows]


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
    for args, message in ((["--threshold", "1.5"], "--threshold"), (["--threshold", "median"], "mean+std"),
                          (["--step", "4", "--steps", "4"], "give one"), (["--step", "0"], "--step"),
                          (["--blur", "4,1"], "odd"), (["--blur", "x"], "KLEN,SIGMA"), (["--scorer", "me"], "own, clip")):
        r = invoke("eval", "explanations", gradcam_maps, "--manifest", world / "manifest.jsonl", *args,
                   "-o", tmp_path / "o.jsonl")
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not (tmp_path / "o.jsonl").exists()


def test_train_ala_caches_features_resumably_and_explains(world, tmp_path):
    head = tmp_path / "ala"
    args = ["train", "ala", world / "manifest.jsonl", "-o", head, "-m", "vlmtools-micro", "--where", "split=train",
            "--epochs", "2", "--val-fraction", "0", "--d-model", "16", "--heads", "2", "--grid", "4", "--json"]
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


def test_overlays_name_the_true_label_and_off_label_runs_warn(gradcam_maps, world, tmp_path):
    """Every overlay's title names the explained class and the image's label; explaining a class that is
    not the label for most images says so (here --class: one class for images of three)."""
    rows = [json.loads(x) for x in (gradcam_maps / "maps.jsonl").read_text().splitlines()]
    for r in rows:
        with Image.open(gradcam_maps / r["png"]) as im:
            title = im.info["Title"]
        assert f"explains {r['class']}" in title and f"true label: {r['label']}" in title
    one = rows[0]["label"]
    res = invoke("explain", "visual", world / "manifest.jsonl", "-o", tmp_path / "m", "-m", "vlmtools-micro",
                 "--where", "split=test", "--class", one)
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    off = sum(r["label"] != one for r in rows)
    assert f"differs from the true label for {off} of {len(rows)} images (--class {one} is not their label)" in said


# ----------------------------------------------------------------------------- study 003's protocol, through the CLI

@pytest.fixture(scope="module")
def layer2_maps(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "layer2"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro", "--where",
               "split=test", "--layer", "2", "--no-overlays", "--cbd", world / "descriptors.jsonl")
    assert r.exit_code == 0, r.output
    return out


def test_default_miou_is_grey_above_127_of_the_saved_8bit_map(layer2_maps, world, tmp_path):
    """The ALA authors' compute_miou.py: the map saved as an 8-bit grey image, > 127 salient; mask > 127."""
    r = invoke("eval", "explanations", layer2_maps, "--manifest", world / "manifest.jsonl", "--no-causal")
    assert r.exit_code == 0, r.output
    got = {row["id"]: row["iou"] for row in lines(r.stdout)}
    manifest = {rec["id"]: rec for rec in map(json.loads, (world / "manifest.jsonl").read_text().splitlines())}
    theirs, mean_std = {}, {}
    for row in _maps_of(layer2_maps):
        m = np.load(layer2_maps / row["map"])
        png = tmp_path / f"{row['id']}.png"
        Image.fromarray((m.astype(np.float32) * 255).astype(np.uint8)).save(png)  # as save_attn_map writes it
        pred = np.asarray(Image.open(png).convert("L")) > 127
        gt = np.asarray(Image.open(world / manifest[row["id"]]["mask"]).convert("L")) > 127
        theirs[row["id"]] = np.logical_and(gt, pred).sum() / np.logical_or(gt, pred).sum()
        mean_std[row["id"]] = M.iou(m, gt, "mean+std")
    assert got.keys() == theirs.keys() and len(got) == 6
    for k in got:
        assert got[k] == pytest.approx(theirs[k], abs=1e-6), k
    assert any(abs(theirs[k] - mean_std[k]) > 1e-3 for k in got)  # the two rules differ on these maps
    r = invoke("eval", "explanations", layer2_maps, "--manifest", world / "manifest.jsonl", "--no-causal",
               "--threshold", "mean+std")
    assert r.exit_code == 0, r.output
    assert {row["id"]: row["iou"] for row in lines(r.stdout)} == pytest.approx(mean_std, abs=1e-6)


def test_lattice_ceiling_is_the_best_map_constant_on_the_cells():
    blocks = np.zeros((32, 32), bool)
    blocks[8:24, 0:16] = True                      # whole cells of a 4 x 4 lattice (8 px each)
    assert M.lattice_ceiling(blocks, (4, 4)) == 1.0
    stripes = np.zeros((32, 32), bool)
    stripes[:, ::2] = True                         # 1 px stripes: every 4 x 4 cell is half covered
    assert M.lattice_ceiling(stripes, (4, 4)) == 0.5 and M.lattice_ceiling(stripes, (32, 32)) == 1.0
    # against every map of a 3 x 3 lattice (2^9 unions of cells), on random masks
    import itertools

    gen = np.random.default_rng(0)
    for _ in range(5):
        mask = gen.random((12, 12)) < gen.random()
        cells = np.repeat(np.repeat(np.arange(9).reshape(3, 3), 4, 0), 4, 1)
        best = max(M.region_iou(np.isin(cells, [c for c, on in zip(range(9), pick) if on]), mask)
                   for pick in itertools.product((0, 1), repeat=9))
        assert M.lattice_ceiling(mask, (3, 3)) == pytest.approx(best, abs=1e-12)


def test_lattice_is_recorded_and_eval_reports_its_ceiling(layer2_maps, world, tmp_path):
    assert json.loads((layer2_maps / "info.json").read_text())["lattice"] == [8, 8]  # ResNet stage 2 at 64 px
    summary = tmp_path / "s.json"
    r = invoke("eval", "explanations", layer2_maps, "--manifest", world / "manifest.jsonl", "--no-causal",
               "--summary", summary)
    assert r.exit_code == 0, r.output
    rows = lines(r.stdout)
    manifest = {rec["id"]: rec for rec in map(json.loads, (world / "manifest.jsonl").read_text().splitlines())}
    for row in rows:
        gt = np.asarray(Image.open(world / manifest[row["id"]]["mask"]).convert("L")) > 127
        assert row["iou_ceiling"] == pytest.approx(M.lattice_ceiling(gt, (8, 8)), abs=1e-6)
    s = json.loads(summary.read_text())["methods"][0]
    assert s["lattice"] == [8, 8] and s["iou_ceiling"] == pytest.approx(np.mean([x["iou_ceiling"] for x in rows]))
    assert "lattice ceiling" in r.output


def test_aea_freezes_side_and_attention_branches_bit_for_bit():
    """Alternative Epoch Architect: across a frozen epoch the side and attention branches' tensors do not
    change at all; across a trained one they do; the perception branch trains in both."""
    from vlmtools.heads.ala import AlaHead, aea_hook, ala_loss
    from vlmtools.heads.loop import FitOptions, fit, seeded

    shapes = [[8, 4, 4], [8, 4, 4], [8, 4, 4]]
    with seeded(0):
        head = AlaHead(input_dim=3 * 128, n_classes=3, shapes=shapes, layers=[0, 1, 2], d_model=8, heads=2, grid=4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3 * 128, generator=gen)
    y = torch.arange(48) % 3
    side = {n for n, _ in head.named_parameters() if not n.startswith("pb")}
    assert side and {"pb.weight", "pb_norm.weight"} <= {n for n, _ in head.named_parameters()}
    snaps = []

    def hook(epoch, model):
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return aea_hook(epoch, model)

    fit(head, (x, y), None, FitOptions(epochs=4, lr=1e-2, batch_size=16, patience=0, device="cpu"),
        loss_fn=ala_loss, on_epoch=hook)
    snaps.append({n: p.detach().clone() for n, p in head.named_parameters()})
    for epoch in (1, 2, 3, 4):  # snaps[epoch - 1] before the epoch, snaps[epoch] after it
        before, after = snaps[epoch - 1], snaps[epoch]
        frozen = epoch % 2 == 0
        for n in side:
            assert torch.equal(before[n], after[n]) == frozen, (epoch, n)
        assert not torch.equal(before["pb.weight"], after["pb.weight"]), epoch
    # on the frozen epochs the loss does not see the side branch at all
    head.attention_off = True
    head.zero_grad()
    ala_loss(head, x, y).backward()
    assert all(p.grad is None or not p.grad.any() for n, p in head.named_parameters() if n in side)


def test_ala_runs_at_the_vit_token_grid_over_every_layer_and_scores_its_own_maps(world, tmp_path):
    from vlmtools.heads.ala import load_ala_for_explain
    from vlmtools.images import load_rgb, normalize_params, square_tensor
    from vlmtools.models import ModelSpec, load_model

    head = tmp_path / "ala"
    r = invoke("train", "ala", world / "manifest.jsonl", "-o", head, "-m", "vlmtools-tiny", "--where",
               "split=train", "--epochs", "2", "--val-fraction", "0", "--d-model", "16", "--heads", "2", "--json")
    assert r.exit_code == 0, r.output
    encoder = load_model(ModelSpec.parse("vlmtools-tiny"), "cpu")
    grid = list(encoder.model.visual.grid_size)
    config = json.loads((tmp_path / "ala.json").read_text())["config"]
    assert config["layers"] == list(range(len(encoder.model.visual.transformer.resblocks)))
    assert [config["grid"]] * 2 == grid and all(s[1:] == grid for s in config["shapes"])
    maps = tmp_path / "maps"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", maps, "--method", "ala", "--head", head,
               "--where", "split=test", "--no-overlays")
    assert r.exit_code == 0, r.output
    assert json.loads((maps / "info.json").read_text())["lattice"] == grid
    # each map row carries the head's own prediction and probability
    explainer, _ = load_ala_for_explain(head, None, None, "cpu")
    explainer.attach(encoder)
    mean, std = normalize_params(encoder.preprocess)
    rows = _maps_of(maps)
    for row in rows:
        probs = explainer.probs(square_tensor(load_rgb(row["path"]), encoder.image_size, mean, std))[0]
        assert row["class"] == explainer.classes[int(probs.argmax())]
        assert row["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
    r = invoke("eval", "explanations", maps, "--manifest", world / "manifest.jsonl", "--steps", "3")
    assert r.exit_code == 0, r.output
    own = lines(r.stdout)
    assert {x["scorer"] for x in own} == {"ala ala"} and all(x["scored_class"] == x["class"] for x in own)
    assert all("iou_ceiling" in x for x in own)
    r = invoke("eval", "explanations", maps, "--manifest", world / "manifest.jsonl", "--steps", "3", "--scorer", "clip")
    assert r.exit_code == 0, r.output
    clip = lines(r.stdout)
    assert {x["scorer"] for x in clip} == {"clip vlmtools-tiny names"}
    assert [x["insertion"] for x in clip] != [x["insertion"] for x in own]
    assert "--scorer clip" in " ".join(r.output.split())


def test_grounding_scores_each_descriptor_map_against_the_region_it_names(world, tmp_path):
    out = tmp_path / "desc"
    r = invoke("explain", "visual", world / "manifest.jsonl", "-o", out, "-m", "vlmtools-micro", "--method", "rise",
               "--masks", "8", "--where", "split=test", "--limit", "2", "--no-overlays", "--descriptors",
               world / "descriptors.jsonl")
    assert r.exit_code == 0, r.output
    rows = _maps_of(out)
    assert {r["kind"] for r in rows} == {"object", "background"}  # the world marks its habitat lines
    r = invoke("eval", "explanations", out, "--manifest", world / "manifest.jsonl")
    assert r.exit_code == 2 and "--descriptors" in r.output  # no class maps: says how to score these
    manifest = {rec["id"]: rec for rec in map(json.loads, (world / "manifest.jsonl").read_text().splitlines())}
    # a map that is exactly its region lands on it every time; the other region's map never does
    for flip in (False, True):
        for row in rows:
            obj = np.asarray(Image.open(world / manifest[row["id"]]["mask"]).convert("L")) > 127
            on_object = (row["kind"] == "object") != flip
            np.save(out / row["map"], (obj if on_object else ~obj).astype(np.float16))
        summary = tmp_path / f"g{flip}.json"
        r = invoke("eval", "explanations", out, "--manifest", world / "manifest.jsonl", "--descriptors",
                   "--summary", summary)
        assert r.exit_code == 0, r.output
        got = lines(r.stdout)
        assert len(got) == len(rows) and {g["descriptor"] for g in got} == {row["descriptor"] for row in rows}
        assert all(g["hit"] is (not flip) for g in got)
        assert all(g["energy"] == (0.0 if flip else 1.0) for g in got)
        m = json.loads(summary.read_text())["methods"][0]
        assert m["hit_object"] == m["hit_background"] == (0.0 if flip else 1.0)
        assert 0 < m["chance_object"] < 0.5 < m["chance_background"] < 1
    assert "bg hit" in r.output and "obj hit" in r.output


def test_off_label_warning_names_who_picked_the_class(capsys):
    """A manifest explained by an ALA head: the head picked the class, not class names or --cbd, so the
    warning says so and offers no --cbd hint."""
    from vlmtools.explain import visual as V

    V._warn_off_label([False, False, True], None, False, None, head=True)
    said = " ".join(capsys.readouterr().err.split())
    assert "the ALA head's own top class" in said and "--cbd" not in said and "by name" not in said
    V._warn_off_label([False, False, True], None, False, None)
    said = " ".join(capsys.readouterr().err.split())
    assert "by name" in said and "--cbd FILE" in said
