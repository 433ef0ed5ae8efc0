"""`embed`: inputs -> encoder -> store, in shards (reader -> worker -> writer, as img2dataset does).

Shard k holds input rows [k*S, (k+1)*S) minus those that failed, so a rerun (or another worker) knows
exactly which shards are left: finished shards are kept, an interrupted one is redone from scratch.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from vlmtools import console, formats
from vlmtools.images import load_rgb
from vlmtools.errors import BadInput, VlmError
from vlmtools.store import INFO, StoreWriter, check_layout


@dataclass
class EmbedSummary:
    store: str
    count: int          # rows in the store
    embedded: int       # rows embedded by this run
    skipped: int        # inputs that failed in this run (see errors.jsonl)
    shards_done: int    # shards written by this run
    shards_kept: int    # shards already on disk, kept
    seconds: float
    complete: bool

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "per_second": round(self.rate, 2)}


def input_digest(ids: Sequence[str]) -> str:
    """Identifies the input (ids in order): resuming with a different input would corrupt the store."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def worker_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size), from arguments or torchrun/SLURM variables."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(f"worker rank {rank} is not in [0, {world_size})")
    return rank, world_size


def check_options(*, dtype: str, shard_size: int, rank: int | None, world_size: int | None) -> None:
    """Validate run options before any model is loaded (a model load takes seconds)."""
    check_layout(dtype, shard_size)
    worker_slot(rank, world_size)


def output_spec(out: str, model: str | None, pretrained: str | None):
    """The model for writing into ``out``: an existing store's own model unless the user names one (which
    must match it, checked before loading anything); for a new store, the user's spec or the default."""
    from pathlib import Path

    from vlmtools.models import ModelSpec, spec_for_store

    info_path = Path(out) / INFO
    if Path(out).is_dir() and info_path.exists():
        info = formats.read_json(info_path)
        formats.check_format(info, formats.STORE_FORMAT, str(info_path))
        return spec_for_store(info["model"], model, pretrained)
    return ModelSpec.parse(model, pretrained)


# ----------------------------------------------------------------------------- images

class _ImageDataset:
    """Map-style dataset: index -> (index, tensor or None, error reason)."""

    def __init__(self, records: Sequence[dict], preprocess: Callable):
        self.records = records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        path = self.records[i]["path"]
        try:
            if os.path.getsize(path) == 0:
                raise OSError("empty file (0 bytes)")
            return i, self.preprocess(load_rgb(path)), None
        except FileNotFoundError:
            return i, None, "file not found"
        except Exception as exc:  # any decoder failure is recorded, never fatal
            return i, None, f"{type(exc).__name__}: {exc}".strip()


def _collate(items):
    import torch

    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, reason) for i, t, reason in items if t is None]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensor, failed


def _shard_batches(shards: Sequence[int], shard_size: int, n: int, batch_size: int) -> list[list[int]]:
    """Batches of input indices that never cross a shard boundary, in shard order."""
    batches = []
    for k in shards:
        start, stop = k * shard_size, min((k + 1) * shard_size, n)
        batches.extend(list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))
    return batches


def _plan(writer: StoreWriter, n: int, shard_size: int, rank: int, world_size: int) -> tuple[int, list[int], list[int]]:
    n_shards = max(1, math.ceil(n / shard_size))
    mine = [k for k in range(n_shards) if k % world_size == rank]
    todo = [k for k in mine if not writer.shard_done(k)]
    writer.clean_partial(todo)
    return n_shards, mine, todo


def embed_images(records: Sequence[dict], out: str, encoder, *, batch_size: int = 64, workers: int = 2,
                 shard_size: int = 10000, dtype: str = "float16", rank: int | None = None,
                 world_size: int | None = None, retry_errors: bool = False) -> EmbedSummary:
    """Embed manifest ``records`` with ``encoder`` (a models.Encoder) into the store ``out``.
    ``retry_errors`` redoes the shards whose inputs failed before (e.g. after fixing the files)."""
    import numpy as np
    import torch

    if not records:
        raise BadInput("no images to embed (empty input)")
    rank, world_size = worker_slot(rank, world_size)
    writer = StoreWriter(out, kind="image", model=encoder.spec.as_dict(), dim=encoder.embed_dim, dtype=dtype,
                         shard_size=shard_size, preprocess=encoder.preprocess_description(),
                         extra_info={"input_sha": input_digest([r["id"] for r in records]),
                                     "input_count": len(records)})
    if retry_errors:
        reopened = writer.reopen_failed()
        console.info(f"retrying {len(reopened)} shard(s) with failed inputs" if reopened else
                     "no failed inputs to retry")
    n_shards, mine, todo = _plan(writer, len(records), shard_size, rank, world_size)
    start = time.perf_counter()
    if not todo:
        info = writer.finalize(n_shards)
        console.info(f"{out}: all {len(mine)} shard(s) of this worker are already done; nothing to do")
        return EmbedSummary(out, (info or {}).get("count") or 0, 0, 0, 0, len(mine), 0.0, info is not None)

    on_cuda = encoder.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(
        _ImageDataset(records, encoder.preprocess),
        batch_sampler=_shard_batches(todo, shard_size, len(records), batch_size),
        num_workers=workers, collate_fn=_collate, pin_memory=on_cuda,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None)

    embedded = skipped = 0
    pending: dict[int, tuple[list, list, list]] = {}  # shard -> (embeddings, meta, errors)
    total = sum(min((k + 1) * shard_size, len(records)) - k * shard_size for k in todo)
    with console.progress(f"embed images -> {out}", total=total, unit="img") as bar:
        for indices, tensor, failed in loader:
            first = indices[0] if indices else failed[0][0]
            shard = first // shard_size
            embs, metas, errs = pending.setdefault(shard, ([], [], []))
            if tensor is not None:
                embs.append(encoder.encode_image_tensor(tensor).numpy())
                metas.extend(records[i] for i in indices)
            errs.extend({"id": records[i]["id"], "path": records[i]["path"], "reason": reason} for i, reason in failed)
            embedded += len(indices)
            skipped += len(failed)
            bar.advance(len(indices) + len(failed), errors=len(failed))
            shard_end = min((shard + 1) * shard_size, len(records))
            last = max(indices + [i for i, _ in failed])
            if last == shard_end - 1:  # batches arrive in order: the shard is complete
                embs, metas, errs = pending.pop(shard)
                matrix = np.concatenate(embs) if embs else np.zeros((0, writer.dim), np.float32)
                writer.write_shard(shard, matrix, metas, errs)
    seconds = time.perf_counter() - start
    info = writer.finalize(n_shards)
    summary = EmbedSummary(out, (info or {}).get("count") or 0, embedded, skipped, len(todo),
                           len(mine) - len(todo), seconds, info is not None)
    _report(summary, "images")
    if embedded == 0 and skipped:
        raise VlmError(f"none of the {skipped} images could be read (see {os.path.join(out, 'errors.jsonl')}); "
                       f"relative paths in a manifest file resolve against its directory, on stdin against "
                       f"the current directory")
    return summary


# ----------------------------------------------------------------------------- texts

def text_records(path: str, wrap: str = "cbd") -> tuple[list[dict], dict]:
    """Rows to embed from plain lines, ``{"text"}`` JSONL, or descriptor JSONL (one row per
    (class, descriptor), the embedded text wrapped by ``wrap``). Returns (rows, info extras)."""
    from vlmtools.prompts import descriptor_sentence

    name = formats.source_name(path)
    rows: list[dict] = []
    source = None
    descriptor_lines = formats.DescriptorLines(name)
    for lineno, rec in formats.iter_jsonl(path, allow_plain=True):
        where = f"{name}:{lineno}"
        if isinstance(rec, str):
            kind = "lines"
        elif isinstance(rec, dict) and "descriptors" in rec:
            kind = "descriptors"
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
            kind = "texts"
        else:
            raise BadInput(f"{where}: expected a line of text, {{\"text\": ...}} or a descriptor line "
                           f"{{\"class\", \"descriptors\"}}")
        if source is None:
            source = kind
        elif {source, kind} != {"lines", "texts"} and source != kind:
            raise BadInput(f"{where}: mixes {kind} with {source} lines")
        if kind == "descriptors":
            rec = descriptor_lines.check(lineno, rec)
            cls = str(rec["class"])
            for j, (d, k) in enumerate(zip(rec["descriptors"], formats.descriptor_kinds(rec))):
                rows.append({"id": f"{cls}::{j}", "text": descriptor_sentence(cls, d, wrap), "class": cls,
                             "descriptor": d, "kind": k, "wrap": wrap})
        elif kind == "texts":
            rows.append({**rec, "id": str(rec.get("id", len(rows)))})
        else:
            rows.append({"id": str(len(rows)), "text": rec})
    if not rows:
        raise BadInput(f"{name}: no texts to embed")
    extras = {"source": "descriptors" if source == "descriptors" else "texts"}
    if source == "descriptors":
        extras["wrap"] = wrap
    return rows, extras


def embed_texts(rows: Sequence[dict], out: str, encoder, *, batch_size: int = 256, shard_size: int = 10000,
                dtype: str = "float16", extra_info: dict | None = None, rank: int | None = None,
                world_size: int | None = None) -> EmbedSummary:
    rank, world_size = worker_slot(rank, world_size)
    extra = {**(extra_info or {}), "input_sha": input_digest([r["id"] + "\t" + r["text"] for r in rows]),
             "input_count": len(rows)}
    writer = StoreWriter(out, kind="text", model=encoder.spec.as_dict(), dim=encoder.embed_dim, dtype=dtype,
                         shard_size=shard_size, extra_info=extra)
    n_shards, mine, todo = _plan(writer, len(rows), shard_size, rank, world_size)
    start = time.perf_counter()
    embedded = 0
    with console.progress(f"embed text -> {out}", total=sum(
            min((k + 1) * shard_size, len(rows)) - k * shard_size for k in todo), unit="text") as bar:
        for k in todo:
            chunk = rows[k * shard_size:(k + 1) * shard_size]
            parts = []
            for b in range(0, len(chunk), batch_size):
                parts.append(encoder.encode_texts([r["text"] for r in chunk[b:b + batch_size]], batch_size))
                bar.advance(len(parts[-1]))
            import numpy as np

            writer.write_shard(k, np.concatenate(parts), chunk)
            embedded += len(chunk)
    seconds = time.perf_counter() - start
    info = writer.finalize(n_shards)
    summary = EmbedSummary(out, (info or {}).get("count") or 0, embedded, 0, len(todo), len(mine) - len(todo),
                           seconds, info is not None)
    if todo:
        _report(summary, "texts")
    else:
        console.info(f"{out}: all {len(mine)} shard(s) of this worker are already done; nothing to do")
    return summary


def _report(s: EmbedSummary, unit: str) -> None:
    line = (f"embedded {s.embedded} {unit} in {s.seconds:.1f}s ({s.rate:,.1f}/s), skipped {s.skipped}, "
            f"{s.shards_done} shard(s) written, {s.shards_kept} kept; store {s.store} has {s.count} rows")
    if not s.complete:
        line += " (waiting for other workers' shards)"
    if s.skipped:
        line += f"; see {os.path.join(s.store, 'errors.jsonl')}"
    console.info(line)
