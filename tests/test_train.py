"""`vlmtools train probe`, the head file format, the training loop, `classify --head`."""

import json
import time

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
    started = time.perf_counter()
    res = train_probe(store, tmp_path / "probe", "--val-where", "split=val")
    elapsed = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    summary = lines(res.stdout)[0]
    assert summary["head"] == str(tmp_path / "probe.json") and summary["weights"] == str(tmp_path / "probe.safetensors")
    assert 0 <= summary["seconds"] <= elapsed  # the fit's own time, within the command's
    assert summary["kind"] == "probe" and summary["classes"] == 4
    info = json.loads((tmp_path / "probe.json").read_text())
    assert info["format"] == "vlmtools.head/1" and info["kind"] == "probe"
    assert info["classes"] == CLASSES and info["input_dim"] == 16 and info["model"] == TINY
    assert info["tensors"] == {"fc.weight": [4, 16], "fc.bias": [4]}
    assert info["training"]["epochs"] == 30 and info["training"]["where"] == ["split=train"]
    assert info["training"]["solver"] == "lbfgs" and info["converged"] is True and summary["converged"] is True
    assert len(info["curve"]) == summary["epochs"] and info["curve"][0]["epoch"] == 1
    assert "val_acc" in info["curve"][0] and info["metrics"]["val"]["rows"] > 0
    # L-BFGS keeps its last iterate: the head's val accuracy is the last curve point's, and stderr says it
    assert info["metrics"]["val"]["acc"] == info["curve"][-1]["val_acc"] and info["best_epoch"] == len(info["curve"])
    assert (f"train probe: L-BFGS, {len(info['curve'])} iterations (converged, val acc "
            f"{info['metrics']['val']['acc']:.4f}) on cpu in") in " ".join(res.stderr.split())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "probe.safetensors"), "np") as weights:
        assert weights.metadata() == {"format": "vlmtools.head/1", "kind": "probe"}
    assert len(info["inputs"]["image_store"]["sha"]) == 16
    # vlmtools-formats(5): inputs name the store and count the rows used (train 80, val 40 by --val-where)
    assert {k: v for k, v in info["inputs"]["image_store"].items() if k != "sha"} == {"path": str(store), "rows": 80}
    assert {k: v for k, v in info["inputs"]["image_store_val"].items() if k != "sha"} == {"path": str(store), "rows": 40}
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
    # and AdamW's initial weights (L-BFGS starts from zeros, AdamW from seeded random weights): full batches,
    # so the first epoch's loss is that of the start, ln 4 for zero weights
    full = ("--solver", "adamw", "--batch-size", 0, "--val-fraction", 0, "--epochs", 2)
    for seed in (1, 2):
        assert train_probe(store, tmp_path / f"s{seed}", *full, "--seed", seed).exit_code == 0
    first = [json.loads((tmp_path / f"s{seed}.json").read_text())["curve"][0]["loss"] for seed in (1, 2)]
    assert first[0] != first[1] and round(float(np.log(4)), 6) not in first
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
    assert "val split" not in res.stderr  # --val-fraction 0 asked for none: no warning about a missing one
    # the head file says how its val rows were chosen (what a paper's methods section reports)
    training = {n: json.loads((tmp_path / f"{n}.json").read_text())["training"] for n in "vn"}
    assert training["v"]["val_where"] == ["split=val"] and training["n"]["val_where"] == []
    assert training["n"]["val_fraction"] == 0
    assert train_probe(store, tmp_path / "f", "--val-fraction", 0.25, "--epochs", 5, "--solver", "adamw").exit_code == 0
    assert json.loads((tmp_path / "f.json").read_text())["training"]["val_fraction"] == 0.25


def test_probe_with_a_val_fraction_holds_out_the_same_rows_for_a_seed(store, tmp_path):
    # --seed fixes the stratified val split too: the same seed, the same held-out rows and the same head
    args = ("--val-fraction", 0.25, "--epochs", 5, "--solver", "adamw")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        res = train_probe(store, tmp_path / name, *args, "--seed", seed, "--patience", 0)
        assert res.exit_code == 0, res.output
        # --solver adamw is the mini-batch loop (torch), on a CPU too, not the CPU's L-BFGS
        assert "train probe: 5 epochs; best val acc" in " ".join(res.stderr.split()) and "L-BFGS" not in res.stderr
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert a["inputs"]["image_store_val"]["sha"] == b["inputs"]["image_store_val"]["sha"]
    assert a["inputs"]["image_store_val"]["sha"] != c["inputs"]["image_store_val"]["sha"]
    assert a["curve"] == b["curve"]  # (AdamW's seeded start: test_probe_is_deterministic_for_a_seed)


def test_probe_refuses_another_model_than_the_stores(store, tmp_path):
    res = invoke("train", "probe", store, "-o", tmp_path / "h", "--model", "vlmtools-micro")
    assert res.exit_code == 2 and "vlmtools-tiny" in res.output, res.output
    res = invoke("train", "probe", store, "-o", tmp_path / "h", "--model", "vlmtools-tiny", "--pretrained", "vlmtools")
    assert res.exit_code == 2, res.output
    assert not list(tmp_path.iterdir())
    assert invoke("train", "probe", store, "-o", tmp_path / "h", "--model", "vlmtools-tiny").exit_code == 0


def _start_then(later):
    """An objective with value 1 and gradient 1 at the start point (zero weights), ``later`` elsewhere."""
    return lambda theta: (1.0, np.ones_like(theta)) if not theta.any() else later(theta)


@pytest.mark.parametrize("objective, said", [
    (lambda theta: (float("inf"), np.zeros_like(theta)), "the loss became inf at epoch 1"),
    (lambda theta: (1.0, np.full_like(theta, np.nan)), "the loss became 1.0 at epoch 1"),  # a NaN gradient
    (_start_then(lambda theta: (float("nan"), np.zeros_like(theta))), "the loss became nan at epoch 1"),
])
def test_a_cpu_probe_whose_objective_is_not_finite_stops_with_exit_1_and_writes_nothing(store, tmp_path, monkeypatch,
                                                                                        objective, said):
    # at the start point, or at the point an L-BFGS step accepted: the run stops, names the iteration, keeps no head
    import vlmtools.heads.logreg as logreg

    monkeypatch.setattr(logreg, "logreg_objective", lambda *args, **kwargs: objective)
    res = invoke("train", "probe", store, "-o", tmp_path / "h", "--epochs", 3, "--device", "cpu")
    assert res.exit_code == 1 and f"train probe: {said} (L-BFGS iteration 1" in " ".join(res.output.split()), \
        res.output
    assert not list(tmp_path.iterdir())


def test_a_cpu_probe_stops_at_epochs_iterations_and_says_so(store, tmp_path):
    res = invoke("train", "probe", store, "-o", tmp_path / "h", "--where", "split=train", "--val-where", "split=val",
                 "--epochs", 2, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "h.json").read_text())
    assert [e["epoch"] for e in info["curve"]] == [1, 2] and all("val_acc" in e for e in info["curve"])
    assert info["converged"] is False and info["best_epoch"] == 2 and lines(res.stdout)[0]["epochs"] == 2
    assert "train probe: L-BFGS, 2 iterations (stopped at --epochs, val acc" in " ".join(res.stderr.split())
    # a single val row is measured too
    res = invoke("train", "probe", store, "-o", tmp_path / "one", "--where", "split=train", "--val-where", "id=alpha001",
                 "--epochs", 2, "--device", "cpu")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "one.json").read_text())
    assert info["metrics"]["val"]["rows"] == 1 and all("val_acc" in e for e in info["curve"])


def test_the_train_accuracy_of_a_large_store_is_a_seeded_sample_the_same_every_run(tmp_path):
    # above TRAIN_METRIC_ROWS rows the train accuracy reads a sample drawn with --seed: a rerun reports the same
    from vlmtools.heads.loop import TRAIN_METRIC_ROWS

    rng = np.random.default_rng(0)
    y = np.arange(TRAIN_METRIC_ROWS + 4000) % 2
    x = rng.normal(size=(len(y), 3)) + 0.3 * y[:, None]  # overlapping classes: many rows misclassified
    write_arrays(tmp_path / "s", x, [{"id": str(i), "label": "ab"[c]} for i, c in enumerate(y)], kind="image",
                 model=TINY)
    metrics = []
    for name in ("a", "b"):
        res = invoke("train", "probe", tmp_path / "s", "-o", tmp_path / name, "--seed", 5, "--device", "cpu", "--json")
        assert res.exit_code == 0, res.output
        metrics.append(lines(res.stdout)[0]["metrics"]["train"])
    assert metrics[0] == metrics[1] and metrics[0]["rows"] == len(y) and metrics[0]["acc"] < 0.8


def test_a_probe_whose_zero_start_is_already_optimal_records_one_curve_point(tmp_path):
    # classes symmetric about the origin (v, -v; u, -u): the gradient at zero weights vanishes, L-BFGS stops
    # before its first step, and the head still records where it stopped
    v, u = np.eye(4)[0] + 0.5 * np.eye(4)[2], np.eye(4)[1] + 0.5 * np.eye(4)[3]
    x = np.array([v, -v, u, -u] * 3)
    meta = [{"id": str(i), "label": "ab"[i % 4 // 2], "split": "val" if i >= 8 else "train"} for i in range(len(x))]
    write_arrays(tmp_path / "s", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "s", "-o", tmp_path / "h", "--where", "split=train", "--val-where",
                 "split=val", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "h.json").read_text())
    assert info["converged"] is True and info["best_epoch"] == 1
    # cross-entropy of (1/2, 1/2); zero weights score both classes alike, so argmax picks the first: half right
    assert info["curve"] == [{"epoch": 1, "loss": round(float(np.log(2)), 6), "val_acc": 0.5}]


def test_the_library_probe_defaults_are_the_cli_defaults(store, tmp_path):
    # heads.linear.probe_options() is what `vlmtools train probe` does without options (L-BFGS, l2 1, no val)
    from safetensors.numpy import load_file

    from vlmtools.heads.linear import probe_options
    from vlmtools.heads.linear import train_probe as library_train_probe

    res = invoke("train", "probe", store, "-o", tmp_path / "cli", "--where", "split=train")
    assert res.exit_code == 0, res.output
    summary = library_train_probe(store, tmp_path / "lib", options=probe_options(), where=["split=train"])
    assert (summary["val_rows"], summary["device"]) == (0, "cpu") and summary["head"] == str(tmp_path / "lib.json")
    cli, lib = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cli", "lib"))
    assert lib["training"] == cli["training"] and lib["training"]["solver"] == "lbfgs"
    assert "iterations (converged) on cpu in" in " ".join(res.stderr.split())  # no val rows: no val accuracy
    wa, wb = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("cli", "lib"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_stratified_split_is_seeded_and_keeps_a_train_row():
    from vlmtools.heads.data import stratified_split

    y = np.array([0] * 10 + [1] * 3 + [2])
    tr, va = stratified_split(y, 3, 0.2, seed=1)
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]  # round(0.6) = 1; class 2 keeps its one row
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert stratified_split(y, 3, 0.2, seed=1)[1].tolist() == va.tolist()
    # half of each class, but never a class's last train row: 2 rows -> 1 val, 1 row -> 0 val, 4 rows -> 2 val
    y = np.array([0, 0, 1, 2, 2, 2, 2])
    tr, va = stratified_split(y, 3, 0.5, seed=0)
    assert np.bincount(y[va], minlength=3).tolist() == [1, 0, 2] and np.bincount(y[tr]).tolist() == [1, 1, 2]
    # classes too small for any val row: no val rows (an empty index), every row trains
    tr, va = stratified_split(np.array([0, 1, 1]), 2, 0.2, seed=0)
    assert tr.tolist() == [0, 1, 2] and va.tolist() == [] and y[va].tolist() == []


def test_the_input_digest_tells_apart_the_rows_a_head_was_trained_on():
    # vlmtools-formats(5): a head's inputs sha is over the rows used, their ids, labels and embeddings
    from vlmtools.heads.data import Labelled, digest
    from vlmtools.store import RowView

    x, meta = blobs(n_per_class=5)
    x = x.astype(np.float32)
    y = np.array([CLASSES.index(m["label"]) for m in meta])
    base = Labelled(x, y, meta, CLASSES)
    assert base.digest() == Labelled(x.copy(), y.copy(), [dict(m) for m in meta], CLASSES).digest()
    nudged = x.copy()
    nudged[3, 2] += 1e-3
    relabelled = y.copy()
    relabelled[0] = 1
    renamed = [dict(m) for m in meta]
    renamed[4]["id"] = "another"
    others = [Labelled(nudged, y, meta, CLASSES), Labelled(x, relabelled, meta, CLASSES),
              Labelled(x, y, renamed, CLASSES), base.subset(range(1, len(base)))]
    digests = [base.digest()] + [o.digest() for o in others]
    assert len(set(digests)) == len(digests) and all(len(d) == 16 for d in digests)
    # a store read lazily (a RowView over float16 shards, past one 65,536-row read) hashes as the float32
    # matrix it reads as
    rng = np.random.default_rng(0)
    shards = [rng.normal(size=(40_000, 2)).astype(np.float16), rng.normal(size=(30_000, 2)).astype(np.float16)]
    matrix = np.concatenate(shards).astype(np.float32)
    assert digest(RowView(shards, 2)) == digest(matrix) != digest(matrix[:-1])


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
    (["--val-fraction", 1], "--val-fraction"),  # every row held out: nothing left to train on
    (["--where", "split=val", "--val-where", "split=val"], "all are val rows"),
    (["--val-fraction", 0.2, "--val-where", "split=val"], "exclude each other"),
    (["--where", "nokey"], "KEY=VALUE"),
])
def test_bad_probe_options(store, tmp_path, args, message):
    res = invoke("train", "probe", store, "-o", tmp_path / "h", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list(tmp_path.iterdir())


def test_val_where_rows_never_train_and_two_classes_are_enough(store, tmp_path):
    # without --where every row but the --val-where ones trains: no row is both fitted and measured on
    res = invoke("train", "probe", store, "-o", tmp_path / "h", "--val-where", "split=val", "--json")
    assert res.exit_code == 0, res.output
    assert (lines(res.stdout)[0]["train_rows"], lines(res.stdout)[0]["val_rows"]) == (120, 40)
    assert "left out" not in res.stderr  # every row is labelled, every val class is a train class
    x, meta = blobs(n_per_class=5)
    write_arrays(tmp_path / "ab", x[:10], meta[:10], kind="image", model=TINY)  # alpha and beta only
    res = invoke("train", "probe", tmp_path / "ab", "-o", tmp_path / "two")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "two.json").read_text())["classes"] == ["alpha", "beta"]
    res = invoke("train", "probe", store, "-o", tmp_path / "one", "--where", "label=alpha")
    assert res.exit_code == 2 and "one class ('alpha'); a classifier needs at least two (check --where)" \
        in " ".join(res.output.split()), res.output
    write_arrays(tmp_path / "a", x[:5], meta[:5], kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "a", "-o", tmp_path / "one")
    assert res.exit_code == 2 and " ".join(res.output.split()).endswith("a classifier needs at least two"), res.output
    # AdamW holds out a stratified 10 % by default; with too few rows per class for any: said, none held out
    res = invoke("train", "probe", store, "-o", tmp_path / "adamw", "--solver", "adamw", "--epochs", 3, "--json")
    assert res.exit_code == 0 and lines(res.stdout)[0]["val_rows"] == 16, res.output  # 4 of each class's 40
    res = invoke("train", "probe", tmp_path / "ab", "-o", tmp_path / "few", "--solver", "adamw", "--epochs", 3,
                 "--val-fraction", 0.05, "--json")  # 5 rows per class: round(0.25) = 0
    assert res.exit_code == 0 and lines(res.stdout)[0]["val_rows"] == 0, res.output
    assert "too few rows per class for a val split" in " ".join(res.stderr.split())


def test_unlabelled_rows_and_val_rows_of_unknown_classes_are_left_out_and_counted(tmp_path):
    x, meta = blobs(n_per_class=10)
    for rec in [m for m in meta if m["split"] == "train"][:3]:
        del rec["label"]  # three unlabelled images among the train rows
    for i, rec in enumerate(meta[-6:]):
        rec.update(label=f"u{i}", split="val")  # six val rows of classes no train row has
    write_arrays(tmp_path / "s", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "s", "-o", tmp_path / "h", "--where", "split=train",
                 "--val-where", "split=val", "--json")
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    n_train = sum(m["split"] == "train" for m in meta)
    assert f"warning: 3 of {n_train} selected rows of {tmp_path / 's'} have no label; they are left out" in said
    assert "warning: 6 val rows have labels with no training rows and are left out: 'u0', 'u1', 'u2', 'u3', 'u4' ..." in said
    n_val = sum(m["split"] == "val" for m in meta)
    assert (lines(res.stdout)[0]["train_rows"], lines(res.stdout)[0]["val_rows"]) == (n_train - 3, n_val - 6)
    res = invoke("train", "probe", tmp_path / "s", "-o", tmp_path / "h1", "--where", "split=train",
                 "--val-where", "label=u0")
    assert res.exit_code == 2 and "no row matching --val-where label=u0 has a training class" in res.output
    meta[-1]["label"] = "u0"  # five unknown classes: all named, no "..."
    meta[0]["label"] = " "  # a test row: the empty label is refused in whatever selection it is
    write_arrays(tmp_path / "t", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "t", "-o", tmp_path / "h2", "--where", "split=val", "--val-where",
                 "split=test")
    assert res.exit_code == 2 and "row 0 (id 'alpha000') has an empty \"label\"" in " ".join(res.output.split())
    meta[0]["label"] = "alpha"
    write_arrays(tmp_path / "u", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", tmp_path / "u", "-o", tmp_path / "h3", "--where", "split=train",
                 "--val-where", "split=val")
    assert res.exit_code == 0, res.output
    assert "left out: 'u0', 'u1', 'u2', 'u3', 'u4' train probe: " in " ".join(res.stderr.split()), res.stderr


def test_a_text_store_is_not_trained_on(tmp_path):
    x, meta = blobs(n_per_class=5)
    write_arrays(tmp_path / "texts", x, [{**m, "text": m["id"]} for m in meta], kind="text", model=TINY)
    res = invoke("train", "probe", tmp_path / "texts", "-o", tmp_path / "h")
    assert res.exit_code == 2 and "text" in res.output, res.output
    assert not list(tmp_path.glob("h*"))


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
                "device", "stopped_early", "converged", "metrics", "best_epoch", "seed"):
        assert ours[key] == theirs[key], key
    assert len(ours["curve"]) == len(theirs["curve"]) and 0.5 < ours["metrics"]["train"]["acc"] < 0.9
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["val_acc"] - b["val_acc"]) < 0.02
               for a, b in zip(ours["curve"], theirs["curve"]))
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
