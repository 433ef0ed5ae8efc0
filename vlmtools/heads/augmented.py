"""What `train lare` and `train lads` share: a head = a trained augmenter (f_Box or f_aug) + a linear probe,
class text embeddings from templates, --shots, and the two-step training:

  step 1  fit the augmenter alone (heads.loop.fit with the method's loss, no early stopping);
  step 2  the `train probe` step (heads.base.train_and_save) on the original + augmented train rows; the
          augmenter's step-1 weights are loaded into the new head and frozen at its first epoch, so the
          head file keeps them (for `explain box`) and `classify --head` scores with the probe alone.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from vlmtools.errors import BadInput
from vlmtools.heads.base import Head


class AugmentedProbe(Head):
    """A linear probe (``fc``, the forward pass) with the augmenter it was trained with (``aug``)."""

    augmenter: type[nn.Module]

    def __init__(self, input_dim: int, n_classes: int, hidden: int, **extra):
        super().__init__(input_dim=input_dim, n_classes=n_classes, hidden=hidden, **extra)
        self.aug = self.augmenter(input_dim, hidden)
        self.fc = nn.Linear(input_dim, n_classes)

    def forward(self, x):
        return self.fc(x)


def check_common(samples: int | None, alpha: float, hidden: int | None, shots: int | None) -> None:
    if samples is not None and samples < 0:
        raise BadInput(f"--samples {samples}: expected K >= 0 points per box")
    if not 0 <= alpha <= 1:
        raise BadInput(f"--alpha {alpha}: expected a weight in [0, 1]")
    if hidden is not None and hidden < 1:
        raise BadInput(f"--hidden {hidden}: expected at least 1")
    if shots is not None and shots < 1:
        raise BadInput(f"--shots {shots}: expected at least 1 image per class")


def take_shots(data, shots: int | None, seed: int):
    """Keep ``shots`` train rows per class (chosen with ``seed``; all of a class with fewer). In place."""
    import numpy as np

    if shots is None:
        return data
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.train.y == c))[:shots] for c in range(len(data.classes))]
    data.train = data.train.subset(np.sort(np.concatenate(keep)))
    return data


def class_text_embeddings(classes: Sequence[str], templates: Sequence[str], spec, *, descriptors=None,
                          text_store=None, device: str = "auto", use_cache: bool = True, where: str = "the store"):
    """(C, d) float32 class embeddings T: of ``templates`` filled with the class names (averaged as
    `classify --method clip` does), or with ``descriptors`` (descriptor JSONL), the normalized mean of the
    class's "{class}, which has {descriptor}" embeddings (the CBD class vector). Descriptor classes must
    be exactly the train classes."""
    import numpy as np

    from vlmtools.classify import clip_classifier, embed_texts, normalize

    if descriptors is None:
        return clip_classifier(list(classes), list(templates), spec, text_store=text_store, device=device,
                               use_cache=use_cache).class_emb
    from vlmtools import formats
    from vlmtools.classify import build_descriptor_set, match_classes

    records = formats.read_descriptors(descriptors)
    match_classes(list(classes), records, classes_from=f"the train labels of {where}",
                  descriptors_from=str(descriptors), allow_missing=False,
                  descriptor_file=None if str(descriptors) == "-" else descriptors)
    dset = build_descriptor_set(list(classes), records)
    emb = normalize(embed_texts(dset.texts, spec, text_store=text_store, device=device, use_cache=use_cache))
    sums = np.add.reduceat(emb, np.asarray(dset.offsets[:-1]), axis=0)
    return normalize(sums / dset.counts[:, None]).astype(np.float32)


def open_text_store(text_store, spec, dim: int):
    """A text store to take class prompt embeddings from: same model and width as the image store."""
    from vlmtools.store import open_store

    if text_store is None:
        return None
    texts = open_store(text_store, spec, kind="text")
    if texts.dim != dim:
        raise BadInput(f"{text_store}: {texts.dim}-d embeddings, but the image store has {dim}-d")
    return texts


def check_class_list(classes_file, data) -> None:
    """--classes: every class must have train rows, and every train label must be listed."""
    from vlmtools import formats

    if classes_file is None:
        return
    listed = formats.read_class_list(classes_file)
    known = set(data.classes)
    absent = [c for c in listed if c not in known]
    if absent:
        raise BadInput(f"{classes_file}: class {absent[0]!r} has no train rows in {data.reader.path}"
                       + (f" (nor do {len(absent) - 1} more)" if len(absent) > 1 else ""))
    unlisted = sorted(known - set(listed))
    if unlisted:
        raise BadInput(f"{data.reader.path}: train label {unlisted[0]!r} is not in {classes_file}")


def fit_augmenter(module, train, loss_fn, options, epochs: int, description: str, val=None):
    """Step 1: ``module`` trained alone on the ``train`` arrays (x, y) with ``loss_fn(module, x, y)`` by AdamW
    (whatever the probe's solver); no early stop. Its metric is minus the loss: with ``val`` rows (x, y)
    the epoch of the lowest val loss is kept, else the last."""
    from dataclasses import replace

    from vlmtools.heads.loop import fit

    opts = replace(options, epochs=epochs, patience=0, solver="adamw")
    return fit(module, train, val, opts, loss_fn=loss_fn, description=description,
               metric_fn=lambda m, x, y: -loss_fn(m, x, y).item(), metric="neg_loss")


def fit_probe_with(kind: str, config: dict, aug_state: dict, data, extra_x, extra_y, output, options, *,
                   training: dict, inputs: dict, extra: dict, description: str, buffers: dict | None = None,
                   **fit_kwargs) -> dict:
    """Step 2: the probe on train rows + (extra_x, extra_y); the head keeps ``aug_state`` frozen (and
    ``buffers``, named tensors of the head). ``fit_kwargs`` go to loop.fit (loss_fn, metric_fn, ...)."""
    import numpy as np
    import torch

    from vlmtools.heads.base import train_and_save

    def load_augmenter(epoch, model):
        if epoch == 1:
            model.aug.load_state_dict(aug_state)
            for p in model.aug.parameters():
                p.requires_grad_(False)
            with torch.no_grad():
                for name, value in (buffers or {}).items():
                    getattr(model, name).copy_(value)
        return None

    x = np.concatenate([data.train.x, np.asarray(extra_x, dtype=np.float32)])
    y = np.concatenate([data.train.y, np.asarray(extra_y, dtype=np.int64)])
    val = (data.val.x, data.val.y) if data.val is not None else None
    return train_and_save(kind, config, data, output, options, training=training, inputs=inputs,
                          train_arrays=(x, y), val_arrays=val, extra=extra, description=description,
                          on_epoch=load_augmenter, **fit_kwargs)


def check_output(output) -> None:
    """-o must name head files; checked before the (long) first step."""
    from vlmtools.heads.files import check_head_output

    check_head_output(output)
