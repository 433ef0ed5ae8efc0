"""Head base class, the kind -> class registry, and the head file (NAME.safetensors + NAME.json).

A head is an ``nn.Module`` whose constructor takes only JSON-able keyword arguments; it keeps them in
``self.config`` so that ``build_head(kind, config)`` rebuilds it. Register a new kind with::

    @register("mykind")
    class MyHead(Head):
        def __init__(self, input_dim: int, n_classes: int, hidden: int = 256):
            super().__init__(input_dim=input_dim, n_classes=n_classes, hidden=hidden)
            ...

Weights are saved with safetensors only (never pickle); load_head checks the tensors' names and shapes
and the class list against what the JSON's config builds, so a file edited by hand is a clear BadInput.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vlmtools import formats
from vlmtools.errors import BadInput

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


def build_head(kind: str, config: dict, where: str = "head") -> Head:
    _import_builtin_kinds()
    cls = HEADS.get(kind)
    if cls is None:
        raise BadInput(f"{where}: unknown head kind {kind!r} (known: {', '.join(sorted(HEADS))})")
    try:
        return cls(**config)
    except TypeError as exc:
        raise BadInput(f"{where}: \"config\" does not fit head kind {kind!r} ({exc})") from None


def tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def save_head(path: str | os.PathLike, head: Head, info: dict) -> tuple[Path, Path]:
    """Write NAME.safetensors, then NAME.json (``info``, from formats.head_info), each atomically.
    ``path`` may be NAME, NAME.json or NAME.safetensors. Returns (json path, weights path)."""
    from safetensors.torch import save_file

    json_path, st_path = formats.head_paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    info = {**info, "tensors": {k: list(v.shape) for k, v in state.items()}}
    with formats.atomic_path(st_path) as tmp:
        save_file(state, str(tmp), metadata={"format": formats.HEAD_FORMAT, "kind": info["kind"]})
    formats.write_json(json_path, info)
    return json_path, st_path


def read_head_info(path: str | os.PathLike) -> dict:
    json_path, _ = formats.head_paths(path)
    if not json_path.exists():
        raise BadInput(f"{json_path}: no such head file (a head is NAME.json + NAME.safetensors)")
    return formats.validate_head_info(formats.read_json(json_path), str(json_path))


def load_head(path: str | os.PathLike, device: str = "cpu") -> tuple[Head, dict]:
    """Rebuild a head from its files: (module in eval mode on ``device``, the JSON info)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, st_path = formats.head_paths(path)
    info = read_head_info(path)
    where = str(json_path)
    head = build_head(info["kind"], info["config"], where)
    if info["config"].get("input_dim", info["input_dim"]) != info["input_dim"]:
        raise BadInput(f"{where}: \"input_dim\" {info['input_dim']} differs from config's "
                       f"{info['config'].get('input_dim')}")
    expected = tensor_shapes(head)
    if info["tensors"] != expected:
        raise BadInput(f"{where}: \"tensors\" {_shapes(info['tensors'])} do not fit a {info['kind']} head of "
                       f"this config, which has {_shapes(expected)}; was the file edited by hand?")
    classes = info.get("classes")
    if classes is not None and head.n_classes is not None and len(classes) != head.n_classes:
        raise BadInput(f"{where}: {len(classes)} \"classes\" but the head has {head.n_classes} outputs")
    if not st_path.exists():
        raise BadInput(f"{st_path}: no such file (the weights of head {json_path})")
    try:
        state = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"{st_path}: not a safetensors file ({exc})") from None
    got = {k: list(v.shape) for k, v in state.items()}
    if got != expected:
        raise BadInput(f"{st_path}: tensors {_shapes(got)} do not match {json_path} ({_shapes(expected)})")
    head.load_state_dict(state)
    return head.to(device).eval(), info


def _shapes(shapes: dict) -> str:
    items = [f"{k}{tuple(v)}" for k, v in list(shapes.items())[:4]]
    return ", ".join(items) + (" ..." if len(shapes) > 4 else "")


def check_head_output(output) -> None:
    """Refuse an unusable -o before any training."""
    if output is None or str(output) in ("", "-"):
        raise BadInput("-o/--output: a head is two files, NAME.json and NAME.safetensors; give NAME")
    for p in formats.head_paths(output):
        if p.is_dir():
            raise BadInput(f"{p}: is a directory; -o names the head files NAME.json + NAME.safetensors")


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
    if classes is ...:
        classes = data.classes
    if train_arrays is None:
        train_arrays = (data.train.x, data.train.y)
        if data.val is not None:
            val_arrays = (data.val.x, data.val.y)
    head, result = train_head(kind, config, train_arrays, val_arrays, options, description=description,
                              **fit_kwargs)
    extra = {**(extra or {}), **(extra_fn(head) if extra_fn is not None else {})}
    json_path, st_path = save_trained(output, kind, head, result, classes=classes, spec=data.spec,
                                      options=options, training=training, inputs=inputs, extra=extra)
    return {"head": str(json_path), "weights": str(st_path), "kind": kind,
            "classes": len(classes) if classes is not None else None,
            "train_rows": len(train_arrays[0]), "val_rows": len(val_arrays[0]) if val_arrays is not None else 0,
            "epochs": len(result.curve), "best_epoch": result.best_epoch, "metrics": result.metrics,
            **({"converged": result.converged} if result.converged is not None else {}),
            "seconds": result.seconds, "device": result.device, **extra}


def save_trained(output, kind: str, head: Head, result, *, classes, spec, options, training: dict,
                 inputs: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """Save a head trained by loop.fit (``result``: its FitResult) with the whole head JSON."""
    info = formats.head_info(
        kind=kind, config=head.config, tensors={}, classes=classes, input_dim=head.config["input_dim"],
        model=spec.as_dict(), training={**options.as_dict(), **training}, seed=options.seed,
        inputs=inputs, curve=result.curve, best_epoch=result.best_epoch, metrics=result.metrics,
        extra={"device": result.device, "stopped_early": result.stopped_early,
               **({"converged": result.converged} if result.converged is not None else {}), **(extra or {})})
    return save_head(output, head, info)


def train_head(kind: str, config: dict, train_arrays: Sequence, val_arrays: Sequence | None, options,
               **fit_kwargs):
    """Build a ``kind`` head from ``config`` under the options' seed and fit it: (head, loop.FitResult)."""
    from vlmtools.heads.loop import fit, seeded

    with seeded(options.seed):
        head = build_head(kind, config)
    return head, fit(head, train_arrays, val_arrays, options, **fit_kwargs)
