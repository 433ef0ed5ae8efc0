"""Trainable heads on stored embeddings (round 2): one file format, one registry, one training loop.

    base.py    Head (nn.Module with a JSON-able config), the registry kind -> class (``register``,
               ``HEADS``), save_head / load_head (NAME.safetensors + NAME.json, formats.HEAD_FORMAT)
    data.py    labelled embeddings from a store (--where, label -> class index, seeded val split or
               --val-where), input digests
    loop.py    FitOptions and fit(): the one training loop every head uses (custom loss, metric and
               per-epoch hook; early stopping on the val metric; deterministic for a seed on CPU), with
               AdamW or full-batch L-BFGS
    logreg.py  L-BFGS and scikit-learn's LogisticRegression objective in numpy (no torch)
    probe.py   `train probe`: on a CPU with numpy alone (logreg.py, no torch import), else linear.py's head
    files.py   a head's two files, written without torch
    linear.py  the linear head (one FC layer): `train probe` and `train adapter`; classify --head
    t2i.py     text -> image translators (mlp, qformer): `train t2i`
    adapter.py the study-001 adapter: image/text mixing, --image-ratio, --sweep
    augmented.py, lare.py, lads.py  study 004: an augmenter (f_Box, f_aug) trained first, then the probe

Importing base.py (and every module with a torch head) imports torch; this package itself does not, so
that data.py, loop.py, logreg.py, files.py and probe.py load without it. CLI modules import heads inside
their command functions.
"""

__all__ = ["HEADS", "Head", "build_head", "load_head", "register", "save_head"]


def __getattr__(name: str):
    if name in __all__:  # base.py imports torch: only when one of its names is asked for
        from vlmtools.heads import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
