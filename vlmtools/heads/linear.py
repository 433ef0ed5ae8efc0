"""The linear head: one fully connected layer on (L2-normalized) embeddings, trained with cross-entropy.
`train probe` fits it on image embeddings (the fine-tuning baseline of studies 001 and 004); `train
adapter` (adapter.py) on a mix of image and text embeddings. Both kinds are this class.

The probe's default solver (and that of every head ending in the probe: adapter, LARE; LADS keeps its
authors' AdamW) is full-batch L-BFGS on scikit-learn's LogisticRegression objective (mean cross-entropy +
(l2 / 2n) |W|^2, l2 = 1/C = 1, bias unpenalised), on all train rows: nothing is held out, because nothing
is early-stopped (``probe_val_fraction``). ``probe_options`` are those defaults as a FitOptions. On a CPU
`train probe` fits it in numpy without importing torch (probe.py)."""

from __future__ import annotations

from torch import nn

from vlmtools.heads.base import Head, register
# `train probe` and its defaults live in probe.py (no torch); re-exported for the heads that end in the probe
from vlmtools.heads.probe import PROBE_SOLVER, probe_options, probe_val_fraction, train_probe  # noqa: F401


@register("probe", "adapter")
class LinearHead(Head):
    def __init__(self, input_dim: int, n_classes: int):
        super().__init__(input_dim=input_dim, n_classes=n_classes)
        self.fc = nn.Linear(input_dim, n_classes)

    def forward(self, x):
        return self.fc(x)
