"""Trainable heads on stored embeddings (round 2): one file format, one registry, one training loop.

    base.py    Head (nn.Module with a JSON-able config), the registry kind -> class (``register``,
               ``HEADS``), save_head / load_head (NAME.safetensors + NAME.json, formats.HEAD_FORMAT)
    data.py    labelled embeddings from a store (--where, label -> class index, seeded val split or
               --val-where), input digests
    loop.py    FitOptions and fit(): the one training loop every head uses (custom loss, metric and
               per-epoch hook; early stopping on the val metric; deterministic for a seed on CPU), with
               AdamW or full-batch L-BFGS
    logreg.py  L-BFGS and scikit-learn's LogisticRegression objective in numpy (no torch)
    linear.py  the linear head (one FC layer): `train probe` and `train adapter`; classify --head
    t2i.py     text -> image translators (mlp, qformer): `train t2i`
    adapter.py the study-001 adapter: image/text mixing, --image-ratio, --sweep
    augmented.py, lare.py, lads.py  study 004: an augmenter (f_Box, f_aug) trained first, then the probe

Importing this package imports torch: CLI modules import it inside their command functions.
"""

from vlmtools.heads.base import HEADS, Head, build_head, load_head, register, save_head

__all__ = ["HEADS", "Head", "build_head", "load_head", "register", "save_head"]
