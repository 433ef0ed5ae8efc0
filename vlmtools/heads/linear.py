"""The linear head: one fully connected layer on (L2-normalized) embeddings, trained with cross-entropy.
`train probe` fits it on image embeddings (the fine-tuning baseline of studies 001 and 004); `train
adapter` (adapter.py) on a mix of image and text embeddings. Both kinds are this class.

The probe's default solver (and that of every head ending in the probe: adapter, LARE; LADS keeps its
authors' AdamW) is full-batch L-BFGS on scikit-learn's LogisticRegression objective (mean cross-entropy +
(l2 / 2n) |W|^2, l2 = 1/C = 1, bias unpenalised), on all train rows: nothing is held out, because nothing
is early-stopped (``probe_val_fraction``). ``probe_options`` are those defaults as a FitOptions."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from vlmtools.heads.base import Head, register

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


@register("probe", "adapter")
class LinearHead(Head):
    def __init__(self, input_dim: int, n_classes: int):
        super().__init__(input_dim=input_dim, n_classes=n_classes)
        self.fc = nn.Linear(input_dim, n_classes)

    def forward(self, x):
        return self.fc(x)


def train_probe(store, output, *, options, where: Sequence[str] = (), val_where: Sequence[str] = (),
                val_fraction: float | None = None, model: str | None = None,
                pretrained: str | None = None) -> dict:
    """`vlmtools train probe`: a linear head on an image store's labelled embeddings. Returns the summary."""
    from vlmtools.heads.base import train_and_save
    from vlmtools.heads.data import load_train_val

    options.check()
    val_fraction = probe_val_fraction(val_fraction, options)
    data = load_train_val(store, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=model, pretrained=pretrained)
    return train_and_save(
        "probe", dict(input_dim=data.reader.dim, n_classes=len(data.classes)), data, output, options,
        training={"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction},
        inputs=data.inputs(), description="train probe")
