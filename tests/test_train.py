"""`vlmtools train probe`, the head file format, the training loop, `classify --head`."""

import json

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.store import write_arrays

runner = CliRunner()
TINY = {"name": "vlmtools-tiny", "pretrained": "none"}
MICRO = {"name": "vlmtools-micro", "pretrained": "vlmtools"}
CLASSES = ["alpha", "beta", "gamma", "delta"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def blobs(n_per_class=40, dim=16, seed=0, spread=0.6):
    """Gaussian clusters around random unit centres, split 3/4 train, 1/4 test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), dim))
    x, meta = [], []
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            x.append(centres[c] + spread * rng.normal(size=dim))
            meta.append({"id": f"{name}{i:03d}", "path": f"/nowhere/{name}{i}.png", "label": name,
                         "split": "test" if i % 4 == 0 else ("val" if i % 4 == 1 else "train")})
    return np.array(x), meta


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    x, meta = blobs()
    write_arrays(d / "images", x, meta, kind="image", model=TINY)
    return d / "images"


def train_probe(store, out, *extra):
    return invoke("train", "probe", store, "-o", out, "--where", "split=train", "--epochs", 30, "--json", *extra)


# ----------------------------------------------------------------------------- probe + head file

def test_probe_trains_saves_and_classifies(store, tmp_path):
    res = train_probe(store, tmp_path / "probe", "--val-where", "split=val")
    assert res.exit_code == 0, res.output
    summary = lines(res.stdout)[0]
    assert summary["kind"] == "probe" and summary["classes"] == 4
    info = json.loads((tmp_path / "probe.json").read_text())
    assert info["format"] == "vlmtools.head/1" and info["kind"] == "probe"
    assert info["classes"] == CLASSES and info["input_dim"] == 16 and info["model"] == TINY
    assert info["tensors"] == {"fc.weight": [4, 16], "fc.bias": [4]}
    assert info["training"]["epochs"] == 30 and info["training"]["where"] == ["split=train"]
    assert info["training"]["solver"] == "lbfgs" and info["converged"] is True and summary["converged"] is True
    assert len(info["curve"]) == summary["epochs"] and info["curve"][0]["epoch"] == 1
    assert "val_acc" in info["curve"][0] and info["metrics"]["val"]["rows"] > 0
    assert len(info["inputs"]["image_store"]["sha"]) == 16
    assert (tmp_path / "probe.safetensors").exists()

    res = invoke("classify", store, "--head", tmp_path / "probe", "--where", "split=test", "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 0, res.output
    preds = lines((tmp_path / "p.jsonl").read_text())
    assert len(preds) == 40 and all(p["topk"][0]["class"] == p["pred"] for p in preds)
    assert abs(sum(t["score"] for t in preds[0]["topk"]) - 1) < 1e-3  # 4 classes, k=5: all probabilities
    acc = np.mean([p["pred"] == p["label"] for p in preds])
    assert acc > 0.5  # well-separated clusters; chance is 0.25
    res = invoke("eval", tmp_path / "p.jsonl")
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout.splitlines()[0])["acc1"] - acc) < 1e-4  # eval rounds to 4 decimals


def test_probe_is_deterministic_for_a_seed(store, tmp_path):
    for name in ("a", "b"):
        assert train_probe(store, tmp_path / name, "--seed", 3).exit_code == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["curve"] == b["curve"]
    from safetensors.numpy import load_file

    wa, wb = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "ab")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_val_where_and_no_val(store, tmp_path):
    res = train_probe(store, tmp_path / "v", "--val-where", "split=val")
    assert res.exit_code == 0, res.output
    summary = lines(res.stdout)[0]
    assert summary["val_rows"] == 40 and summary["train_rows"] == 80
    res = train_probe(store, tmp_path / "n", "--val-fraction", 0, "--epochs", 5, "--solver", "adamw")
    assert res.exit_code == 0, res.output
    summary = lines(res.stdout)[0]
    assert summary["val_rows"] == 0 and summary["epochs"] == 5 and summary["best_epoch"] == 5


def test_stratified_split_is_seeded_and_keeps_a_train_row():
    from vlmtools.heads.data import stratified_split

    y = np.array([0] * 10 + [1] * 3 + [2])
    tr, va = stratified_split(y, 3, 0.2, seed=1)
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]  # round(0.6) = 1; class 2 keeps its one row
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert stratified_split(y, 3, 0.2, seed=1)[1].tolist() == va.tolist()


# ----------------------------------------------------------------------------- the loop

def test_fit_custom_loss_hook_and_early_stopping():
    import torch

    from vlmtools.heads.loop import FitOptions, fit, seeded

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    with seeded(0):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    calls, frozen_grads = [], []

    def hook(epoch, m):  # freeze the first layer on even epochs, as ALA alternates
        for p in m[0].parameters():
            p.requires_grad_(epoch % 2 == 1)
        calls.append(epoch)
        return {"frozen": epoch % 2 == 0}

    def loss(m, xb, yb):
        frozen_grads.append(m[0].weight.requires_grad)
        return torch.nn.functional.cross_entropy(m(xb), yb) + 0.0 * m[2].weight.sum()

    before = model[0].weight.detach().clone()
    res = fit(model, (x, y), (x, y), FitOptions(epochs=6, lr=1e-2, batch_size=0, patience=0, device="cpu"),
              loss_fn=loss, on_epoch=hook)
    assert calls == [1, 2, 3, 4, 5, 6] and [e["frozen"] for e in res.curve] == [False, True] * 3
    assert not torch.equal(before, model[0].weight)  # trained on odd epochs
    # stopping: a metric that never improves stops after `patience` epochs; a tie keeps the later weights
    res = fit(model, (x, y), (x, y), FitOptions(epochs=50, patience=3, device="cpu"), metric_fn=lambda m, a, b: 0.5)
    assert res.stopped_early and len(res.curve) == 4 and res.best_epoch == 4


def test_fit_options_are_checked():
    from vlmtools.errors import BadInput
    from vlmtools.heads.loop import FitOptions

    for bad in (dict(epochs=0), dict(lr=0), dict(batch_size=-1), dict(patience=-2), dict(weight_decay=-1),
                dict(solver="sgd"), dict(l2=-1.0)):
        with pytest.raises(BadInput):
            FitOptions(**bad).check()


# ----------------------------------------------------------------------------- the L-BFGS probe

def _sklearn_objective(w, b, x, y, l2):
    """scikit-learn's LogisticRegression objective (C = 1/l2), restated in float64: the mean over rows of
    -log softmax(x w^T + b)[y] + l2/(2n) |w|^2, and its gradient (dw, db)."""
    x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    n = len(y)
    z = x @ w.T + b
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    value = -log_p[np.arange(n), y].mean() + l2 / (2 * n) * (w ** 2).sum()
    residual = np.exp(log_p)
    residual[np.arange(n), y] -= 1
    return value, residual.T @ x / n + l2 / n * w, residual.mean(0)


def test_logreg_objective_is_scikit_learns():
    from vlmtools.heads.logreg import logreg_objective

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    value, grad = logreg_objective(x, y, 3, l2=0.7)(np.concatenate([w.ravel(), b]))
    want, dw, db = _sklearn_objective(w, b, x, y, 0.7)
    assert abs(value - want) < 1e-5 and np.abs(grad - np.concatenate([dw.ravel(), db])).max() < 1e-5


def test_probe_solves_scikit_learns_objective(store, tmp_path):
    """The default probe's weights are the optimum of LogisticRegression's objective (its gradient is
    within scikit-learn's tol there), on all train rows; a stronger --l2 shrinks them."""
    from safetensors.numpy import load_file

    from vlmtools.heads.data import load_train_val

    data = load_train_val(store, where=["split=train"], val_fraction=0)
    norms = {}
    for l2 in (1.0, 10.0):
        res = train_probe(store, tmp_path / f"p{l2}", "--l2", l2)
        assert res.exit_code == 0, res.output
        assert lines(res.stdout)[0]["train_rows"] == len(data.train) == 80  # nothing held out
        weights = load_file(str(tmp_path / f"p{l2}.safetensors"))
        _, dw, db = _sklearn_objective(weights["fc.weight"], weights["fc.bias"], data.train.x, data.train.y, l2)
        assert max(np.abs(dw).max(), np.abs(db).max()) <= 1e-4
        norms[l2] = np.linalg.norm(weights["fc.weight"])
    assert norms[10.0] < 0.8 * norms[1.0]


def test_torch_and_numpy_lbfgs_agree_with_scikit_learn():
    from vlmtools.heads.linear import LinearHead
    from vlmtools.heads.logreg import fit_logreg
    from vlmtools.heads.loop import FitOptions, fit, seeded

    x, meta = blobs(n_per_class=30, seed=3)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = np.array([CLASSES.index(m["label"]) for m in meta])
    w, b, _, converged = fit_logreg(x, y, 4, l2=1.0)
    with seeded(0):
        head = LinearHead(16, 4)
    fit(head, (x, y), None, FitOptions(solver="lbfgs", device="cpu"))
    assert converged and np.abs(head.fc.weight.detach().numpy() - w).max() < 1e-2
    sklearn = pytest.importorskip("sklearn.linear_model")
    ref = sklearn.LogisticRegression().fit(x, y)  # its defaults: lbfgs, C = 1, tol 1e-4
    assert np.abs(ref.coef_ - w).max() < 1e-2 and np.abs(ref.intercept_ - b).max() < 1e-2
    assert (ref.predict(x) == (x @ w.T + b).argmax(1)).mean() > 0.98


# ----------------------------------------------------------------------------- bad input

def test_head_from_another_model_is_refused(store, tmp_path):
    assert train_probe(store, tmp_path / "probe").exit_code == 0
    x, meta = blobs()
    write_arrays(tmp_path / "micro", x, meta, kind="image", model=MICRO)
    res = invoke("classify", tmp_path / "micro", "--head", tmp_path / "probe", "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 2 and "vlmtools-tiny" in res.output
    assert not (tmp_path / "p.jsonl").exists()
    res = invoke("classify", store, "--head", tmp_path / "probe", "--method", "clip")
    assert res.exit_code == 2 and "--method" in res.output


@pytest.mark.parametrize("edit, message", [
    (lambda i: i.update(classes=i["classes"][:3]), "3 \"classes\""),
    (lambda i: i.update(classes=["a", "a", "b", "c"]), "duplicate class"),
    (lambda i: i["config"].update(n_classes=5), "do not fit"),
    (lambda i: i.update(kind="nonesuch"), "unknown head kind"),
    (lambda i: i.update(format="vlmtools.head/9"), "newer"),
    (lambda i: i["tensors"].update({"fc.bias": [5]}), "edited by hand"),
])
def test_hand_edited_head_is_refused(store, tmp_path, edit, message):
    assert train_probe(store, tmp_path / "probe").exit_code == 0
    path = tmp_path / "probe.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))
    res = invoke("classify", store, "--head", tmp_path / "probe", "-o", tmp_path / "p.jsonl")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "p.jsonl").exists()


def test_swapped_weights_are_refused(store, tmp_path):
    from safetensors.numpy import save_file

    assert train_probe(store, tmp_path / "probe").exit_code == 0
    save_file({"fc.weight": np.zeros((4, 8), np.float32), "fc.bias": np.zeros(4, np.float32)},
              str(tmp_path / "probe.safetensors"))
    res = invoke("classify", store, "--head", tmp_path / "probe")
    assert res.exit_code == 2 and "do not match" in res.output


@pytest.mark.parametrize("args, message", [
    (["--where", "split=nowhere"], "no row matches"),
    (["--epochs", 0], "--epochs"),
    (["--val-fraction", 1.5], "--val-fraction"),
    (["--val-fraction", 0.2, "--val-where", "split=val"], "exclude each other"),
    (["--where", "nokey"], "KEY=VALUE"),
])
def test_bad_probe_options(store, tmp_path, args, message):
    res = invoke("train", "probe", store, "-o", tmp_path / "h", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list(tmp_path.iterdir())


def test_store_without_labels_is_refused(tmp_path):
    x, meta = blobs(n_per_class=3)
    for rec in meta:
        del rec["label"]
    write_arrays(tmp_path / "s", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "s", "-o", tmp_path / "h")
    assert res.exit_code == 2 and "label" in res.output
    assert not (tmp_path / "h.json").exists()


def test_train_help_imports_no_heavy_modules():
    from tests.test_cli_basics import HEAVY, _modules_after

    code = ("from vlmtools.cli.app import app\nfrom typer.testing import CliRunner\nr = CliRunner()\n"
            "for args in (['train', '--help'], ['train', 'probe', '--help'], ['classify', '--help']):\n"
            "    assert r.invoke(app, args).exit_code == 0\n")
    heavy = sorted(m for m in _modules_after(code) if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_cpu_probe_imports_no_torch_and_writes_the_torch_heads_files(store, tmp_path):
    """On a CPU `train probe` runs without torch (a fresh process imports neither torch nor pydantic), and
    its head is the torch path's (heads.loop.fit on LinearHead from zero weights, the GPU path), on noisy
    data where a different start would show: the same JSON keys, curve length, metrics and predictions,
    weights equal to float32 rounding; torch's load_head reads them."""
    from tests.conftest import run_cli_modules
    from vlmtools.heads.base import load_head, train_and_save
    from vlmtools.heads.data import load_train_val
    from vlmtools.heads.linear import probe_options
    from vlmtools.heads.probe import zero_start
    from vlmtools.models import gpu_driver_present

    if gpu_driver_present():
        pytest.skip("a GPU driver: --device auto means the torch path")
    proc, loaded = run_cli_modules("train", "probe", store, "-o", tmp_path / "light", "--json")
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    rng = np.random.default_rng(3)
    y = np.arange(600) % 5
    x = rng.normal(size=(5, 32))[y] + 4.0 * rng.normal(size=(600, 32))  # classes overlap: train accuracy < 90 %
    meta = [{"id": str(i), "label": f"c{c}", "split": "val" if i % 6 == 0 else "train"} for i, c in enumerate(y)]
    write_arrays(tmp_path / "noisy", x, meta, kind="image", model=TINY)
    res = train_probe(tmp_path / "noisy", tmp_path / "np", "--val-where", "split=val", "--epochs", 100)
    assert res.exit_code == 0, res.output
    data = load_train_val(tmp_path / "noisy", where=["split=train"], val_where=["split=val"], val_fraction=0)
    training = {"where": ["split=train"], "val_where": ["split=val"], "val_fraction": 0.0}
    torch_summary = train_and_save("probe", dict(input_dim=32, n_classes=5), data, tmp_path / "pt",
                                   probe_options(), training=training, inputs=data.inputs(),
                                   description="train probe", on_epoch=zero_start)
    ours, theirs = json.loads((tmp_path / "np.json").read_text()), json.loads((tmp_path / "pt.json").read_text())
    assert ours.keys() == theirs.keys() and ours["curve"][0].keys() == theirs["curve"][0].keys()
    for key in ("format", "kind", "config", "tensors", "classes", "input_dim", "model", "training", "inputs",
                "device", "stopped_early", "converged", "metrics", "best_epoch"):
        assert ours[key] == theirs[key], key
    assert len(ours["curve"]) == len(theirs["curve"]) and 0.5 < ours["metrics"]["train"]["acc"] < 0.9
    assert lines(res.stdout)[0].keys() == torch_summary.keys()
    head_np, _ = load_head(tmp_path / "np")
    head_pt, _ = load_head(tmp_path / "pt")
    rows = torch.from_numpy(x.astype(np.float32) / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(head_np(rows).argmax(1), head_pt(rows).argmax(1))
        assert (head_np.fc.weight - head_pt.fc.weight).abs().max() < 1e-4


def test_train_metric_rows_are_one_seeded_sample():
    """Above TRAIN_METRIC_ROWS the train metric reads one seeded sample, the same for the numpy and the
    torch path; below it, every row."""
    from vlmtools.heads.loop import TRAIN_METRIC_ROWS, train_metric_rows

    assert train_metric_rows(50, 0).tolist() == list(range(50))
    a, b, c = (train_metric_rows(TRAIN_METRIC_ROWS + 5000, s) for s in (1, 1, 2))
    assert len(a) == TRAIN_METRIC_ROWS == len(set(a.tolist())) and (a == b).all() and not (a == c).all()
