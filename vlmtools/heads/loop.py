"""The one training loop of every head: ``fit(model, train, val, options, loss_fn=..., metric_fn=...,
on_epoch=...)``.

- ``train`` and ``val`` are tuples of arrays (or tensors) with the same first dimension, e.g. (x, y);
  float arrays become float32 tensors, integer arrays int64.
- ``loss_fn(model, *batch) -> scalar tensor`` (default: cross-entropy of ``model(x)`` against ``y``).
- ``metric_fn(model, *rows) -> float``, higher is better, evaluated without gradients in eval mode on the
  val rows after every epoch (default: top-1 accuracy of ``model(x).argmax(1)`` against ``y``). Early
  stopping watches it: training stops after ``patience`` epochs without a new best, and the best epoch's
  weights are kept (loaded into ``model`` and returned). Without val rows the last epoch is kept.
- ``train_eval``: the train rows in the layout ``metric_fn`` reads, when it differs from ``train``'s
  (default: ``train``, at most TRAIN_METRIC_ROWS of its rows): the "train" entry of the final metrics.
- ``on_epoch(epoch, model) -> dict | None`` runs before each epoch (1-based): freeze or unfreeze
  parameters there (the optimizer skips parameters without gradients); a dict it returns is added to
  that epoch's curve entry.
- AdamW over ``params`` (default: all of the model's parameters); mini-batches drawn by a generator
  seeded with ``options.seed``, and torch's global seed set to it too, so a run on CPU is deterministic
  for a seed (build the model under ``seeded(seed)`` so its initial weights are too).
- ``solver="lbfgs"`` instead: full-batch L-BFGS (heads.logreg.lbfgs) on the mean loss + (l2 / 2n) * the
  squared norm of every weight matrix (parameters with 2+ dimensions; biases are not penalised), i.e.
  scikit-learn's LogisticRegression objective with C = 1 / l2 for a linear head; at most ``epochs``
  iterations, stopping when every gradient entry is within logreg.TOL (scikit-learn's default tol). The
  final weights are kept (no early stopping: val rows, if any, are only measured). It takes no torch.optim
  optimizer: constructing one imports torch._dynamo (about a second, once per process).
- The data is moved to the device once when it fits (on a GPU: under half the free memory), so batches
  are index slices there, with no host-to-device copy per step; ``batch_size=0`` trains full-batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from vlmtools.console import info, progress
from vlmtools.errors import BadInput, VlmError

EVAL_CHUNK = 8192
SOLVERS = ("adamw", "lbfgs")
LBFGS_CHUNK = 65536        # rows per forward/backward of the full-batch objective (bounded memory)
MAX_LR = 10.0  # beyond it no head here trains: a typo (1e30) is refused instead of training to NaN
TRAIN_METRIC_ROWS = 20000  # the final train metric is measured on at most this many (seeded) rows


@dataclass
class FitOptions:
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256      # 0: full batch
    seed: int = 0
    patience: int = 10         # epochs without a better val metric before stopping; 0: never stop early
    device: str = "auto"
    solver: str = "adamw"      # "lbfgs": full batch (epochs = most iterations; lr, batch_size, patience unused)
    l2: float = 1.0            # lbfgs: L2 strength on the summed loss (scikit-learn's 1 / C)

    def check(self) -> "FitOptions":
        if self.epochs < 1:
            raise BadInput(f"--epochs {self.epochs}: expected at least 1")
        if not 0 < self.lr <= MAX_LR:  # NaN fails too
            raise BadInput(f"--lr {self.lr}: expected a learning rate above 0 and at most {MAX_LR:g}")
        if not 0 <= self.weight_decay < 1 / self.lr:
            # AdamW shrinks each weight by lr * weight_decay per step: at 1 or more it flips signs and diverges
            raise BadInput(f"--weight-decay {self.weight_decay}: expected >= 0 and below 1/lr ({1 / self.lr:g})")
        if self.batch_size < 0:
            raise BadInput(f"--batch-size {self.batch_size}: expected >= 1 (or 0 for full batch)")
        if self.patience < 0:
            raise BadInput(f"--patience {self.patience}: expected >= 0 (0: no early stopping)")
        if self.solver not in SOLVERS:
            raise BadInput(f"--solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")
        if not self.l2 >= 0:
            raise BadInput(f"--l2 {self.l2}: expected >= 0")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


class NonFiniteLoss(VlmError):
    """Training diverged (NaN or inf loss): stop with exit 1 and write no head."""


@dataclass
class FitResult:
    state: dict               # the kept weights, on CPU (also loaded into the model)
    curve: list[dict]         # one entry per epoch: epoch, loss, <metric> (with val rows), hook extras
    best_epoch: int
    metrics: dict             # {"train": {metric: v}, "val": {metric: v}} of the kept weights
    stopped_early: bool
    seconds: float
    device: str
    converged: bool | None = None  # lbfgs: the gradient tolerance was reached within --epochs iterations


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global generator (model initialisation, dropout) for the block."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def to_tensors(arrays: Sequence, device=None) -> tuple:
    import numpy as np
    import torch

    out = []
    for a in arrays:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        if t.is_floating_point():
            t = t.float()
        elif t.dtype != torch.bool:
            t = t.long()
        out.append(t.to(device) if device is not None else t)
    return tuple(out)


def _train_tensors(train: Sequence) -> tuple[tuple, int]:
    """The train arrays as tensors and their common length (BadInput when there are no rows)."""
    train_t = to_tensors(train)
    n = len(train_t[0])
    if n == 0:
        raise BadInput("no training rows")
    if any(len(t) != n for t in train_t):
        raise ValueError("fit: the train arrays differ in length")
    return train_t, n


def cross_entropy_loss(model, x, y):
    import torch.nn.functional as F

    return F.cross_entropy(model(x), y)


def batched_logits(model, x, chunk: int = EVAL_CHUNK):
    import torch

    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else model(x)


def accuracy(model, x, y) -> float:
    if not len(y):
        return float("nan")
    return float((batched_logits(model, x).argmax(1) == y).float().mean())


def _fits_on(device: str, tensors: Sequence) -> bool:
    import torch

    if not device.startswith("cuda"):
        return True
    need = sum(t.element_size() * t.nelement() for t in tensors)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return need < free // 2


def fit(model, train: Sequence, val: Sequence | None = None, options: FitOptions | None = None, *,
        loss_fn: Callable | None = None, metric_fn: Callable | None = None,
        on_epoch: Callable | None = None, params=None, metric: str = "acc",
        train_eval: Sequence | None = None, description: str = "train", ties: str = "later") -> FitResult:
    """Train ``model`` (see the module docstring); returns the curve and the kept weights. ``ties``: which
    of several epochs with the best val metric is kept, "later" (further trained) or "first"."""
    import torch

    from vlmtools.models import resolve_device

    opts = (options or FitOptions()).check()
    if opts.solver == "lbfgs":
        return _fit_lbfgs(model, train, val, opts, loss_fn=loss_fn, metric_fn=metric_fn, on_epoch=on_epoch,
                          params=params, metric=metric, train_eval=train_eval, description=description)
    device = resolve_device(opts.device)
    loss_fn = loss_fn or cross_entropy_loss
    metric_fn = metric_fn or accuracy
    train_t, n = _train_tensors(train)
    val_t = to_tensors(val) if val is not None and len(val[0]) else None
    resident = _fits_on(device, train_t + (val_t or ()))
    data_device = device if resident else "cpu"
    train_t = tuple(t.to(data_device) for t in train_t)
    val_dev = tuple(t.to(device) for t in val_t) if val_t is not None else None
    model.to(device)
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.AdamW(list(params) if params is not None else model.parameters(),
                                  lr=opts.lr, weight_decay=opts.weight_decay)
    batch = n if opts.batch_size == 0 else min(opts.batch_size, n)
    curve: list[dict] = []
    best_epoch, best_val, best_state, stale = 0, None, None, 0
    stopped_early = False
    t0 = time.perf_counter()
    with progress(description, total=opts.epochs, unit="epochs") as bar:
        for epoch in range(1, opts.epochs + 1):
            entry: dict = {"epoch": epoch}
            if on_epoch is not None:
                entry.update(on_epoch(epoch, model) or {})
            model.train()
            order = torch.randperm(n, generator=gen).to(data_device)
            total = torch.zeros((), device=device)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                chunk = tuple(t[idx].to(device, non_blocking=True) for t in train_t)
                loss = loss_fn(model, *chunk)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(idx)
            entry["loss"] = round(float(total) / n, 6)
            if not math.isfinite(entry["loss"]):
                raise NonFiniteLoss(f"{description}: the loss became {entry['loss']} at epoch {epoch} (--lr {opts.lr:g}, "
                                    f"--weight-decay {opts.weight_decay:g}); nothing was written. Lower --lr, "
                                    f"or check the inputs for extreme values")
            if val_dev is not None:
                model.eval()
                value = float(metric_fn(model, *val_dev))
                entry[f"val_{metric}"] = round(value, 6)
                # a tie keeps the later weights (unless ties="first") but does not reset the patience
                stale = 0 if best_val is None or value > best_val else stale + 1
                if best_val is None or value > best_val or (value == best_val and ties == "later"):
                    best_epoch, best_val = epoch, value
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            curve.append(entry)
            shown = f" val {metric} {entry[f'val_{metric}']:.4f}" if val_dev is not None else ""
            bar.advance(1, description=f"{description} loss {entry['loss']:.4f}{shown}")
            if val_dev is not None and opts.patience and stale >= opts.patience:
                stopped_early = epoch < opts.epochs
                break
    if best_state is None:
        best_epoch = curve[-1]["epoch"]
    else:
        model.load_state_dict(best_state)
    model.eval()
    train_rows = _sample(train_t, opts.seed, device) if train_eval is None else to_tensors(train_eval, device)
    metrics = {"train": {metric: round(float(metric_fn(model, *train_rows)), 6), "rows": n}}
    if val_dev is not None:
        metrics["val"] = {metric: round(best_val, 6), "rows": len(val_dev[0])}
    seconds = time.perf_counter() - t0
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    from vlmtools.heads.curves import stop_sentence

    ended = stop_sentence(curve, best_epoch, stopped_early, planned=opts.epochs, patience=opts.patience)
    info(f"{description}: {ended} (on {device}, {seconds:.1f} s)")
    return FitResult(state, curve, best_epoch, metrics, stopped_early, round(seconds, 3), device)


def train_metric_rows(n: int, seed: int):
    """Which train rows the final train metric is measured on: all of them, or TRAIN_METRIC_ROWS drawn with
    ``seed`` (numpy, so that the probe's numpy path, heads.probe, measures the same rows)."""
    import numpy as np

    if n <= TRAIN_METRIC_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:TRAIN_METRIC_ROWS])


def _sample(tensors: tuple, seed: int, device: str) -> tuple:
    import torch

    n = len(tensors[0])
    if n <= TRAIN_METRIC_ROWS:
        return tuple(t.to(device) for t in tensors)
    idx = torch.from_numpy(train_metric_rows(n, seed))
    return tuple(t[idx.to(t.device)].to(device) for t in tensors)


# ----------------------------------------------------------------------------- full-batch L-BFGS

def run_lbfgs(objective, theta0, opts: FitOptions, description: str, measure: Callable, metric: str = "acc"):
    """Drive logreg.lbfgs for a head (the torch loop below and heads.probe's numpy path): at most
    ``opts.epochs`` iterations under a progress bar; a non-finite loss, or at the start point a non-finite
    loss or gradient, stops with NonFiniteLoss; ``measure(it, theta, f) -> dict`` gives each iteration's
    curve entry (and the start point's, when it converged there). Returns (theta, f, iterations,
    converged, curve)."""
    import numpy as np

    from vlmtools.heads.logreg import lbfgs

    def diverged(value: float, it: int):
        raise NonFiniteLoss(f"{description}: the loss became {value} at epoch {it} (L-BFGS iteration {it}, "
                            f"--l2 {opts.l2:g}); nothing was written. Check the inputs for extreme values")

    calls: list[int] = []

    def checked(theta):
        value, grad = objective(theta)
        if not calls:  # at the start point a non-finite loss or gradient is divergence, not a trial step
            calls.append(1)
            if not (math.isfinite(value) and np.isfinite(grad).all()):
                diverged(value, 1)
        return value, grad

    curve: list[dict] = []
    with progress(description, total=opts.epochs, unit="iterations") as bar:
        def step(it: int, theta, f: float) -> None:
            if not math.isfinite(f):
                diverged(f, it)
            curve.append(measure(it, theta, f))
            val = curve[-1].get(f"val_{metric}")
            shown = f" val {metric} {val:.4f}" if val is not None else ""
            bar.advance(1, description=f"{description} loss {f:.4f}{shown}")

        theta, f, iterations, converged = lbfgs(checked, theta0, max_iter=opts.epochs, on_iteration=step)
    if not curve:  # converged before the first step (e.g. a zero gradient at the start)
        curve.append(measure(1, theta, f))
    return theta, f, iterations, converged, curve


def lbfgs_done(description: str, iterations: int, converged: bool, metrics: dict, metric: str, device: str,
               seconds: float) -> None:
    """The summary line of an L-BFGS fit on stderr."""
    val_txt = f", val {metric} {metrics['val'][metric]:.4f}" if "val" in metrics else ""
    info(f"{description}: L-BFGS, {iterations} iterations ({'converged' if converged else 'stopped at --epochs'}"
         f"{val_txt}) on {device} in {seconds:.1f} s")


def _fit_lbfgs(model, train, val, opts: FitOptions, *, loss_fn, metric_fn, on_epoch, params, metric,
               train_eval, description) -> FitResult:
    """``fit`` with solver "lbfgs" (see the module docstring)."""
    import torch

    from vlmtools.models import resolve_device

    device = resolve_device(opts.device)
    loss_fn = loss_fn or cross_entropy_loss
    metric_fn = metric_fn or accuracy
    train_t, n = _train_tensors(train)
    val_t = to_tensors(val, device) if val is not None and len(val[0]) else None
    model.to(device)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    extra = (on_epoch(1, model) or {}) if on_epoch is not None else {}
    trainable = [p for p in (list(params) if params is not None else model.parameters()) if p.requires_grad]
    penalised = [p for p in trainable if p.dim() >= 2]
    resident = _fits_on(device, train_t)
    train_d = tuple(t.to(device if resident else "cpu") for t in train_t)
    chunk = LBFGS_CHUNK

    sizes = [p.numel() for p in trainable]

    def set_params(theta) -> None:
        flat = torch.from_numpy(theta).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            for p, part in zip(trainable, torch.split(flat, sizes)):
                p.copy_(part.view_as(p))

    def objective(theta):
        """Mean loss over all rows (chunked; a chunk's loss weighs by its rows) + the L2 term, and its
        gradient, at the flat parameters ``theta`` (float64 numpy, as logreg.lbfgs keeps them)."""
        set_params(theta)
        for p in trainable:
            p.grad = None
        total = 0.0
        for start in range(0, n, chunk):
            part = tuple(t[start:start + chunk].to(device, non_blocking=True) for t in train_d)
            loss = loss_fn(model, *part) * (len(part[0]) / n)
            loss.backward()
            total += float(loss.detach())
        if opts.l2 and penalised:
            reg = sum((p * p).sum() for p in penalised) * (opts.l2 / (2 * n))
            reg.backward()
            total += float(reg.detach())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        return total, torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()

    def measure(it: int, theta, f: float) -> dict:
        set_params(theta)
        entry = {"epoch": it, "loss": round(f, 6), **(extra if it == 1 else {})}
        if val_t is not None:
            model.eval()
            entry[f"val_{metric}"] = round(float(metric_fn(model, *val_t)), 6)
            model.train()
        return entry

    model.train()
    with torch.no_grad():
        theta0 = torch.cat([p.detach().reshape(-1) for p in trainable]).double().cpu().numpy()
    theta, f, iterations, converged, curve = run_lbfgs(objective, theta0, opts, description, measure, metric)
    set_params(theta)
    model.eval()
    train_rows = _sample(train_t, opts.seed, device) if train_eval is None else to_tensors(train_eval, device)
    metrics = {"train": {metric: round(float(metric_fn(model, *train_rows)), 6), "rows": n}}
    if val_t is not None:
        metrics["val"] = {metric: curve[-1][f"val_{metric}"], "rows": len(val_t[0])}
    seconds = time.perf_counter() - t0
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    lbfgs_done(description, iterations, converged, metrics, metric, device, seconds)
    return FitResult(state, curve, curve[-1]["epoch"], metrics, False, round(seconds, 3), device, converged)
