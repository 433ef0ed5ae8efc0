"""`vlmtools train probe`: a linear head (heads.linear.LinearHead's files) on an image store's labelled
embeddings. No torch import here.

The default solver is full-batch L-BFGS on scikit-learn's LogisticRegression objective (mean cross-entropy
+ (l2 / 2n) |W|^2, l2 = 1/C = 1, bias unpenalised) on all train rows: nothing is held out, because nothing
is early-stopped (``probe_val_fraction``). On a CPU it runs in numpy (heads.logreg's L-BFGS and
objective, from zero weights as scikit-learn starts) and writes the head without importing torch (about
1 s and 500 MiB of a 3 s process); on a GPU, or with --solver adamw, it is heads.loop.fit on the torch
head (L-BFGS from zero weights too). The two L-BFGS paths give the same head to float32 rounding
(tests/test_train.py).
"""

from __future__ import annotations

import time
from typing import Sequence

PROBE_SOLVER = "lbfgs"


def probe_options(**overrides):
    """The `train probe` defaults (solver L-BFGS, l2 1) as a FitOptions; ``overrides`` replace fields."""
    from vlmtools.heads.loop import FitOptions

    return FitOptions(**{"solver": PROBE_SOLVER, **overrides})


def probe_val_fraction(val_fraction: float | None, options) -> float | None:
    """The val share when --val-fraction is not given: none with L-BFGS (it keeps its last iterate, so val
    rows would only be measured, at the cost of training rows), the loop's default (0.1) with AdamW."""
    if val_fraction is None and options.solver == "lbfgs":
        return 0.0
    return val_fraction


def train_probe(store, output, *, options, where: Sequence[str] = (), val_where: Sequence[str] = (),
                val_fraction: float | None = None, model: str | None = None,
                pretrained: str | None = None) -> dict:
    """`vlmtools train probe`: a linear head on an image store's labelled embeddings. Returns the summary."""
    from vlmtools.heads.data import load_train_val
    from vlmtools.heads.files import check_head_output
    from vlmtools.models import resolve_device

    options.check()
    check_head_output(output)
    val_fraction = probe_val_fraction(val_fraction, options)
    data = load_train_val(store, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=model, pretrained=pretrained)
    config = dict(input_dim=data.reader.dim, n_classes=len(data.classes))
    training = {"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction}
    if options.solver == "lbfgs" and resolve_device(options.device) == "cpu":
        return save_numpy_probe(config, data, output, options, training=training, description="train probe")
    from vlmtools.heads.base import train_and_save

    return train_and_save("probe", config, data, output, options, training=training, inputs=data.inputs(),
                          description="train probe",
                          on_epoch=zero_start if options.solver == "lbfgs" else None)


def zero_start(epoch: int, head) -> None:
    """loop.fit's hook before epoch 1: L-BFGS starts from zero weights, as the numpy path and scikit-learn
    do, so that a head does not depend on the device it was trained on."""
    import torch

    if epoch == 1:
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()


def save_numpy_probe(config: dict, data, output, options, *, training: dict, description: str) -> dict:
    """The probe fitted by heads.logreg on the CPU, saved as the torch path saves it (the same head JSON,
    curve entries and summary, through heads.files). Returns the summary."""
    import numpy as np
    from safetensors.numpy import save_file

    from vlmtools import formats
    from vlmtools.heads.files import head_stem, trained_head_info, trained_summary, write_head_files

    with formats.output_lock(head_stem(output)):  # a second run training the same head is refused now
        result = fit_numpy_probe(data.train.x, data.train.y, config["n_classes"], data.val, options, description)
        state = result.state
        if not all(np.isfinite(v).all() for v in state.values()):
            raise ValueError("head weights fc.weight, fc.bias hold NaN or inf; not saved")
        info = trained_head_info("probe", config, result, classes=data.classes, spec=data.spec, options=options,
                                 training=training, inputs=data.inputs())
        info["tensors"] = {k: list(v.shape) for k, v in state.items()}
        paths = write_head_files(output, info, lambda file, metadata: save_file(state, file, metadata))
        return trained_summary("probe", paths, result, classes=data.classes, train_rows=len(data.train.y),
                               val_rows=len(data.val.y) if data.val is not None else 0)


def fit_numpy_probe(x, y, n_classes: int, val, options, description: str):
    """L-BFGS (heads.logreg, driven by loop.run_lbfgs as the torch loop is) from zero weights, at most
    --epochs iterations: a loop.FitResult whose state is {"fc.weight", "fc.bias"} as float32 numpy arrays;
    val rows are only measured."""
    import numpy as np

    from vlmtools.heads.logreg import logreg_objective
    from vlmtools.heads.loop import FitResult, lbfgs_done, run_lbfgs, train_metric_rows

    n, dim = x.shape
    size = n_classes * dim
    val_rows = val is not None and len(val.y) > 0

    def unpack(theta):
        return theta[:size].reshape(n_classes, dim).astype(np.float32), theta[size:].astype(np.float32)

    def acc(w, b, xs, ys) -> float:
        return float(((np.asarray(xs, dtype=np.float32) @ w.T + b).argmax(1) == ys).mean())

    def measure(it, theta, f) -> dict:
        entry = {"epoch": it, "loss": round(f, 6)}
        if val_rows:
            entry["val_acc"] = round(acc(*unpack(theta), val.x, val.y), 6)
        return entry

    t0 = time.perf_counter()
    theta, f, iterations, converged, curve = run_lbfgs(logreg_objective(x, y, n_classes, options.l2),
                                                       np.zeros(size + n_classes), options, description, measure)
    w, b = unpack(theta)
    rows = train_metric_rows(n, options.seed)
    metrics = {"train": {"acc": round(acc(w, b, x[rows], y[rows]), 6), "rows": n}}
    if val_rows:
        metrics["val"] = {"acc": curve[-1]["val_acc"], "rows": len(val.y)}
    seconds = time.perf_counter() - t0
    lbfgs_done(description, iterations, converged, metrics, "acc", "cpu", seconds)
    state = {"fc.weight": np.ascontiguousarray(w), "fc.bias": np.ascontiguousarray(b)}
    return FitResult(state, curve, curve[-1]["epoch"], metrics, False, round(seconds, 3), "cpu", converged)
