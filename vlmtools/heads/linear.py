"""The linear head: one fully connected layer on (L2-normalized) embeddings, trained with cross-entropy.
`train probe` fits it on image embeddings (the fine-tuning baseline of studies 001 and 004); `train
adapter` (adapter.py) on a mix of image and text embeddings. Both kinds are this class."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from vlmtools.heads.base import Head, register


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
    data = load_train_val(store, where=where, val_where=val_where, val_fraction=val_fraction,
                          seed=options.seed, model=model, pretrained=pretrained)
    return train_and_save(
        "probe", dict(input_dim=data.reader.dim, n_classes=len(data.classes)), data, output, options,
        training={"where": list(where), "val_where": list(val_where), "val_fraction": val_fraction},
        inputs=data.inputs(), description="train probe")
