"""Head base class, the kind -> class registry, and the head file (NAME.safetensors + NAME.json).

A head is an ``nn.Module`` whose constructor takes only JSON-able keyword arguments; it keeps them in
``self.config`` so that ``build_head(kind, config)`` rebuilds it. Register a new kind with::

    @register("mykind")
    class MyHead(Head):
        def __init__(self, input_dim: int, n_classes: int, hidden: int = 256):
            super().__init__(input_dim=input_dim, n_classes=n_classes, hidden=hidden)
            ...

Weights are saved with safetensors only (never pickle), under a lock (NAME.lock), weights first and the
JSON last; the JSON records the sha256 of its weights file. load_head checks, before any real tensor is
allocated, the config (built on torch's meta device: a class count of -1 or 10^12 is refused, not
attempted), the tensors' names, shapes and dtypes and the class list against what the config builds,
then the weights' digest (a kill between the two renames leaves new weights beside an old JSON) and that
every weight is finite; anything else is a clear BadInput.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vlmtools import formats
from vlmtools.errors import BadInput
from vlmtools.heads.files import (check_head_output, head_stem, trained_head_info,  # noqa: F401 (re-exported)
                                  trained_summary, write_head_files)

HEADS: dict[str, type["Head"]] = {}


def register(*kinds: str):
    """Class decorator: make ``load_head`` able to rebuild heads of these kinds."""

    def deco(cls):
        for kind in kinds:
            if kind in HEADS and HEADS[kind] is not cls:
                raise ValueError(f"head kind {kind!r} is already registered by {HEADS[kind].__name__}")
            HEADS[kind] = cls
        return cls

    return deco


class Head(nn.Module):
    """Base of every trainable head: remembers its constructor arguments (``config``)."""

    def __init__(self, **config):
        super().__init__()
        self.config = dict(config)

    @property
    def n_classes(self) -> int | None:
        return self.config.get("n_classes")


def _import_builtin_kinds() -> None:
    """The heads shipped with vlmtools register themselves on import."""
    import importlib

    for name in ("linear", "t2i", "lare", "lads", "ala"):
        try:
            importlib.import_module(f"vlmtools.heads.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlmtools.heads.{name}":
                raise


def build_head(kind: str, config: dict, where: str = "head", device: str | None = None) -> Head:
    """A ``kind`` head built from ``config``; ``device="meta"`` builds it without allocating its weights
    (to check a config read from a file before trusting its sizes)."""
    _import_builtin_kinds()
    cls = HEADS.get(kind)
    if cls is None:
        raise BadInput(f"{where}: unknown head kind {kind!r} (known: {', '.join(sorted(HEADS))})")
    try:
        if device is None:
            return cls(**config)
        with torch.device(device):
            return cls(**config)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        # TypeError: unknown keys; RuntimeError/ValueError: sizes torch refuses (negative, too large)
        msg = " ".join(str(exc).split())[:200]
        raise BadInput(f"{where}: \"config\" does not fit head kind {kind!r} ({msg})") from None


def tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def save_head(path: str | os.PathLike, head: Head, info: dict) -> tuple[Path, Path]:
    """Write NAME.safetensors, then NAME.json (``info``, from formats.head_info, plus the weights' sha256),
    each atomically, holding NAME.lock. ``path`` may be NAME, NAME.json or NAME.safetensors. Returns
    (json path, weights path)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"head weights {', '.join(bad[:3])} hold NaN or inf; not saved")
    info = {**info, "tensors": {k: list(v.shape) for k, v in state.items()}}
    return write_head_files(path, info, lambda file, metadata: save_file(state, file, metadata=metadata))


def read_head_info(path: str | os.PathLike) -> dict:
    json_path, _ = formats.head_paths(path)
    if not json_path.exists():
        raise BadInput(f"{json_path}: no such head file (a head is NAME.json + NAME.safetensors)")
    return formats.validate_head_info(formats.read_json(json_path), str(json_path))


def load_head(path: str | os.PathLike, device: str = "cpu") -> tuple[Head, dict]:
    """Rebuild a head from its files: (module in eval mode on ``device``, the JSON info). Everything the
    files claim is checked before the weights are allocated (see the module docstring)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    json_path, st_path = formats.head_paths(path)
    info = read_head_info(path)
    where = str(json_path)
    if info["config"].get("input_dim", info["input_dim"]) != info["input_dim"]:
        raise BadInput(f"{where}: \"input_dim\" {info['input_dim']} differs from config's "
                       f"{info['config'].get('input_dim')}")
    shell = build_head(info["kind"], info["config"], where, device="meta")  # sizes checked, nothing allocated
    expected = tensor_shapes(shell)
    if info["tensors"] != expected:
        raise BadInput(f"{where}: \"tensors\" {_shapes(info['tensors'])} do not fit a {info['kind']} head of "
                       f"this config, which has {_shapes(expected)}; was the file edited by hand?")
    classes = info.get("classes")
    if classes is not None and shell.n_classes is not None and len(classes) != shell.n_classes:
        raise BadInput(f"{where}: {len(classes)} \"classes\" but the head has {shell.n_classes} outputs")
    if not st_path.exists():
        raise BadInput(f"{st_path}: no such file (the weights of head {json_path})")
    if st_path.is_dir():
        raise BadInput(f"{st_path}: is a directory, expected the weights of head {json_path}")
    try:
        with safe_open(str(st_path), framework="pt") as fh:  # the header only: names, shapes, dtypes
            header = {k: fh.get_slice(k) for k in fh.keys()}
            got = {k: list(v.get_shape()) for k, v in header.items()}
            dtypes = {k: v.get_dtype() for k, v in header.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{st_path}: not a safetensors file ({' '.join(str(exc).split())[:160]})") from None
    if got != expected:
        raise BadInput(f"{st_path}: tensors {_shapes(got)} do not match {json_path} ({_shapes(expected)})")
    want_float = {k: v.is_floating_point() for k, v in shell.state_dict().items()}
    odd = [f"{k} ({dtypes[k]})" for k in got if want_float[k] and dtypes[k] not in FLOAT_DTYPES]
    if odd:
        raise BadInput(f"{st_path}: tensor {odd[0]} is not floating point; a head's weights are F16/BF16/F32/F64")
    digest = info.get("weights_sha256")
    if digest is not None and formats.file_sha256(st_path) != digest:
        raise BadInput(f"{st_path}: these weights are not the ones {json_path} was written with (digest "
                       f"differs): the head was interrupted while being saved, or one of its two files was "
                       f"replaced; train it again")
    try:
        state = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{st_path}: not a safetensors file ({' '.join(str(exc).split())[:160]})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInput(f"{st_path}: tensor {name} holds NaN or inf values; the head is damaged (train it again)")
    head = build_head(info["kind"], info["config"], where)
    head.load_state_dict(state)
    return head.to(device).eval(), info


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _shapes(shapes: dict) -> str:
    items = [f"{k}{tuple(v)}" for k, v in list(shapes.items())[:4]]
    return ", ".join(items) + (" ..." if len(shapes) > 4 else "")


def train_and_save(kind: str, config: dict, data, output, options, *, training: dict, inputs: dict,
                   classes=..., train_arrays: Sequence | None = None, val_arrays: Sequence | None = None,
                   description: str = "train", extra: dict | None = None, extra_fn=None,
                   **fit_kwargs) -> dict:
    """Build a ``kind`` head under the options' seed, fit it on ``data`` (heads.data.TrainData: its
    train/val rows as (x, y), unless ``train_arrays``/``val_arrays`` are given), save it to ``output``
    and return the summary (what `--json` prints). ``classes`` defaults to data.classes (None for heads that do not
    classify); ``extra_fn(head) -> dict`` adds keys, computed on the kept weights, to the head file and
    summary. ``fit_kwargs`` go to loop.fit (loss_fn, metric_fn, on_epoch, metric, ...)."""
    check_head_output(output)
    with formats.output_lock(head_stem(output)):  # a second run training the same head is refused now
        return _train_and_save(kind, config, data, output, options, training=training, inputs=inputs,
                               classes=classes, train_arrays=train_arrays, val_arrays=val_arrays,
                               description=description, extra=extra, extra_fn=extra_fn, **fit_kwargs)


def _train_and_save(kind, config, data, output, options, *, training, inputs, classes, train_arrays, val_arrays,
                    description, extra, extra_fn, **fit_kwargs) -> dict:
    if classes is ...:
        classes = data.classes
    if train_arrays is None:
        train_arrays = (data.train.x, data.train.y)
        if data.val is not None:
            val_arrays = (data.val.x, data.val.y)
    head, result = train_head(kind, config, train_arrays, val_arrays, options, description=description,
                              **fit_kwargs)
    extra = {**(extra or {}), **(extra_fn(head) if extra_fn is not None else {})}
    paths = save_trained(output, kind, head, result, classes=classes, spec=data.spec, options=options,
                         training=training, inputs=inputs, extra=extra)
    return trained_summary(kind, paths, result, classes=classes, train_rows=len(train_arrays[0]),
                           val_rows=len(val_arrays[0]) if val_arrays is not None else 0, extra=extra)


def save_trained(output, kind: str, head: Head, result, *, classes, spec, options, training: dict,
                 inputs: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """Save a head trained by loop.fit (``result``: its FitResult) with the whole head JSON."""
    info = trained_head_info(kind, head.config, result, classes=classes, spec=spec, options=options,
                             training=training, inputs=inputs, extra=extra)
    return save_head(output, head, info)


def train_head(kind: str, config: dict, train_arrays: Sequence, val_arrays: Sequence | None, options,
               **fit_kwargs):
    """Build a ``kind`` head from ``config`` under the options' seed and fit it: (head, loop.FitResult)."""
    from vlmtools.heads.loop import fit, seeded

    with seeded(options.seed):
        head = build_head(kind, config)
    return head, fit(head, train_arrays, val_arrays, options, **fit_kwargs)
