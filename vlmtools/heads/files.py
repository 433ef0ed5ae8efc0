"""A head's two files, written without torch: NAME.safetensors, then NAME.json (format vlmtools.head/1,
man vlmtools-formats(5)), each atomically, under NAME.lock. base.save_head (torch tensors) and the probe's
numpy path (heads/probe.py) both write through ``write_head_files``, so their files have one layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from vlmtools import formats
from vlmtools.errors import BadInput


def check_head_output(output) -> None:
    """Refuse an unusable -o before any training."""
    if output is None or str(output) in ("", "-"):
        raise BadInput("-o/--output: a head is two files, NAME.json and NAME.safetensors; give NAME")
    for p in formats.head_paths(output):
        if p.is_dir():
            raise BadInput(f"{p}: is a directory; -o names the head files NAME.json + NAME.safetensors")


def head_stem(path: str | os.PathLike) -> Path:
    """NAME of a head given as NAME, NAME.json or NAME.safetensors (its lock is NAME.lock)."""
    return formats.head_paths(path)[0].with_suffix("")


def write_head_files(path: str | os.PathLike, info: dict, save: Callable[[str, dict], None]) -> tuple[Path, Path]:
    """``save(file, metadata)`` writes the weights (safetensors) to ``file``; then the JSON ``info`` is written
    with the weights' sha256 added. Returns (json path, weights path)."""
    json_path, st_path = formats.head_paths(path)
    with formats.output_lock(head_stem(path)):
        with formats.atomic_path(st_path) as tmp:
            save(str(tmp), {"format": formats.HEAD_FORMAT, "kind": info["kind"]})
            info["weights_sha256"] = formats.file_sha256(tmp)
        formats.failpoint("head.between_renames")
        formats.write_json(json_path, info)
    return json_path, st_path


def trained_head_info(kind: str, config: dict, result, *, classes, spec, options, training: dict, inputs: dict,
                      extra: dict | None = None) -> dict:
    """The head JSON of a head fitted by loop.fit or the probe's numpy path (``result``: a loop.FitResult);
    "tensors" is filled in by the writer."""
    return formats.head_info(
        kind=kind, config=config, tensors={}, classes=classes, input_dim=config["input_dim"],
        model=spec.as_dict(), training={**options.as_dict(), **training}, seed=options.seed,
        inputs=inputs, curve=result.curve, best_epoch=result.best_epoch, metrics=result.metrics,
        extra={"device": result.device, "stopped_early": result.stopped_early,
               **({"converged": result.converged} if result.converged is not None else {}), **(extra or {})})


def trained_summary(kind: str, paths: tuple[Path, Path], result, *, classes, train_rows: int, val_rows: int,
                    extra: dict | None = None) -> dict:
    """What `train ... --json` prints for a head written to ``paths`` (json, weights)."""
    return {"head": str(paths[0]), "weights": str(paths[1]), "kind": kind,
            "classes": len(classes) if classes is not None else None,
            "train_rows": train_rows, "val_rows": val_rows,
            "epochs": len(result.curve), "best_epoch": result.best_epoch, "metrics": result.metrics,
            **({"converged": result.converged} if result.converged is not None else {}),
            "seconds": result.seconds, "device": result.device, **(extra or {})}
