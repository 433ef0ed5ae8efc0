"""Labelled embeddings from a store, for training heads: selection (--where), label -> class index,
and the validation split (seeded, class-stratified --val-fraction, or --val-where KEY=VALUE)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from vlmtools.console import warn
from vlmtools.errors import BadInput

DEFAULT_VAL_FRACTION = 0.1


@dataclass
class Labelled:
    """Rows of a store with a class index: x (N, d) float32, y (N,) int64 into ``classes``, their meta."""
    x: "object"
    y: "object"
    meta: list[dict]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.meta)

    def subset(self, idx) -> "Labelled":
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64)
        return Labelled(self.x[idx], self.y[idx], [self.meta[i] for i in idx.tolist()], self.classes)

    def digest(self) -> str:
        return digest(self.x, self.y, [str(r.get("id")) for r in self.meta])


@dataclass
class TrainData:
    """What a head is trained on: the store, its model spec, the train rows and the val rows (or None)."""
    reader: "object"
    spec: "object"
    train: Labelled
    val: Labelled | None

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def inputs(self, role: str = "image_store") -> dict:
        """The "inputs" entry of a head file for this store."""
        out = {role: {"path": str(self.reader.path), "sha": self.train.digest(), "rows": len(self.train)}}
        if self.val is not None:
            out[f"{role}_val"] = {"path": str(self.reader.path), "sha": self.val.digest(), "rows": len(self.val)}
        return out


def digest(*parts) -> str:
    """sha256 (first 16 hex digits) of arrays and string lists: the identity of a head's inputs."""
    import numpy as np

    from vlmtools.store import RowView

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (list, tuple)):
            h.update("\n".join(map(str, part)).encode("utf-8"))
        elif isinstance(part, RowView):  # read in chunks, hashed as the float32 matrix it reads as
            h.update(str((np.dtype(np.float32).str, (len(part), part.dim))).encode())
            for i in range(0, len(part), 65536):
                h.update(np.ascontiguousarray(part[i:i + 65536]).tobytes())
        else:
            arr = np.ascontiguousarray(part)
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]


def open_store_for(path, kind: str, model: str | None = None, pretrained: str | None = None):
    """(reader, model spec) of a store; ``model``/``pretrained`` may name its model and must match it."""
    from vlmtools.classify import store_spec
    from vlmtools.store import open_store

    reader = open_store(path, kind=kind)
    return reader, store_spec(reader, model, pretrained)


def select(reader, where: Sequence[str] = ()) -> list[int]:
    """Row indices of a store matching ``where`` (all rows without it); BadInput when none match."""
    from vlmtools.classify import parse_where, select_rows, str_labels

    if not where:
        return list(range(len(reader)))
    rows = select_rows(str_labels(reader.meta), parse_where(where))
    if not rows:
        raise BadInput(f"{reader.path}: no row matches --where {' '.join(where)}")
    return rows


def labelled_rows(reader, where: Sequence[str] = (), classes: Sequence[str] | None = None,
                  exclude: Sequence[int] = ()) -> tuple[list[int], list[dict]]:
    """Row indices and meta (labels as strings) of the labelled rows matching ``where``, minus ``exclude``.
    BadInput if nothing matches or nothing has a label."""
    from vlmtools.classify import str_labels

    meta = str_labels(reader.meta)
    if not meta:
        raise BadInput(f"{reader.path}: the store holds no rows")
    skip = set(exclude)
    rows = [i for i in select(reader, where) if i not in skip]
    if not rows:
        raise BadInput(f"{reader.path}: no rows left to train on (all are val rows)")
    labelled = [i for i in rows if meta[i].get("label") is not None]
    blank = next((i for i in labelled if not str(meta[i]["label"]).strip()), None)
    if blank is not None:
        raise BadInput(f"{reader.path}: row {blank} (id {meta[blank].get('id')!r}) has an empty \"label\"; "
                       f"a class needs a name (leave \"label\" out for unlabelled images)")
    if not labelled:
        raise BadInput(f"{reader.path}: no selected row has a \"label\"; training a head needs labelled "
                       f"embeddings (embed a manifest with labels)")
    if len(labelled) < len(rows):
        warn(f"{len(rows) - len(labelled)} of {len(rows)} selected rows of {reader.path} have no label; "
             f"they are left out")
    return labelled, [meta[i] for i in labelled]


def to_labelled(reader, rows: list[int], meta: list[dict], classes: list[str], what: str) -> Labelled:
    """Labelled rows of ``reader`` whose label is one of ``classes`` (others dropped with a warning)."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    keep = [n for n, rec in enumerate(meta) if rec["label"] in index]
    if len(keep) < len(meta):
        unknown = sorted({rec["label"] for rec in meta if rec["label"] not in index})
        warn(f"{len(meta) - len(keep)} {what} rows have labels with no training rows and are left out: "
             f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}")
    rows = [rows[n] for n in keep]
    meta = [meta[n] for n in keep]
    x = reader.embeddings[np.asarray(rows, dtype=np.int64)] if rows else np.zeros((0, reader.dim), np.float32)
    y = np.asarray([index[rec["label"]] for rec in meta], dtype=np.int64)
    return Labelled(np.ascontiguousarray(x, dtype=np.float32), y, meta, list(classes))


def stratified_split(y, n_classes: int, fraction: float, seed: int):
    """(train idx, val idx): per class, round(fraction * n_c) rows (half up) go to val, at most n_c - 1,
    chosen by a generator seeded with ``seed``; both sorted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    val = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        n_val = min(int(fraction * len(idx) + 0.5), len(idx) - 1)
        if n_val > 0:
            val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def check_val_options(val_where: Sequence[str], val_fraction: float | None) -> None:
    if val_where and val_fraction:
        raise BadInput("--val-where and --val-fraction exclude each other: pick one way to choose val rows")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise BadInput(f"--val-fraction {val_fraction}: expected a number in [0, 1)")


def load_train_val(store, *, where: Sequence[str] = (), val_where: Sequence[str] = (),
                   val_fraction: float | None = None, seed: int = 0, model: str | None = None,
                   pretrained: str | None = None, kind: str = "image") -> TrainData:
    """Train and val rows of an image store (or of another ``kind`` of store: ALA's "features"). Val rows
    are those matching ``val_where`` (taken out of the train selection), else a class-stratified
    ``val_fraction`` of it (default 0.1; 0: no val rows, so no early stopping). Classes are the train labels in first-seen order."""
    check_val_options(val_where, val_fraction)
    reader, spec = open_store_for(store, kind, model, pretrained)
    val_rows: list[int] = []
    if val_where:
        val_rows, val_meta = labelled_rows(reader, val_where)
    rows, meta = labelled_rows(reader, where, exclude=val_rows)
    classes = list(dict.fromkeys(rec["label"] for rec in meta))
    if len(classes) < 2:
        raise BadInput(f"{store}: the training rows hold one class ({classes[0]!r}); a classifier needs at "
                       f"least two" + (" (check --where)" if where else ""))
    train = to_labelled(reader, rows, meta, classes, "train")
    val = None
    if val_where:
        val = to_labelled(reader, val_rows, val_meta, classes, "val")
        if not len(val):
            raise BadInput(f"{store}: no row matching --val-where {' '.join(val_where)} has a training class")
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        if fraction > 0:
            train_idx, val_idx = stratified_split(train.y, len(classes), fraction, seed)
            if len(val_idx):
                train, val = train.subset(train_idx), train.subset(val_idx)
            else:
                warn(f"--val-fraction {fraction}: too few rows per class for a val split; training without "
                     f"one (no early stopping)")
    return TrainData(reader, spec, train, val)
