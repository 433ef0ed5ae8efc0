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
from vlmtools.store import INFO, StoreWriter, check_layout, read_info


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


def input_digest(rows: Sequence[dict]) -> str:
    """Identifies the input: every field of every row, in order (all of it lands in the store's meta), so
    resuming with a changed input (a label renamed, another world with the same ids) is refused."""
    import json

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def files_digest(records: Sequence[dict]) -> str:
    """Size and modification time of every image: a file replaced under the same name changes it."""
    h = hashlib.sha256()
    for rec in records:
        try:
            st = os.stat(rec["path"])
            h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"-\n")
    return h.hexdigest()[:16]


def _exclusive(out: str, rank: int | None, world_size: int | None):
    """A rankless run locks its store (OUT.lock) for its whole length; ranked workers share one store
    by design (each writes only its own shards)."""
    import contextlib

    return contextlib.nullcontext() if ranked(rank, world_size) else formats.output_lock(out)


def _prepare(out: str, force: bool) -> None:
    if force:
        from vlmtools.store import clear_store

        clear_store(out)


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            try:
                return int(value)
            except ValueError:
                raise BadInput(f"${name}={value!r}: expected a whole number") from None
    return default


def ranked(rank: int | None = None, world_size: int | None = None) -> bool:
    """Whether this run is one of several workers (given ranks, or torchrun/SLURM variables)."""
    return rank is not None or world_size is not None or any(
        os.environ.get(v, "").strip() for v in ("RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS"))


def worker_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size), from arguments or torchrun/SLURM variables."""
    if rank is None:
        rank = _env_int(("RANK", "SLURM_PROCID"), 0)
    if world_size is None:
        world_size = _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(f"worker rank {rank} is not in [0, {world_size})")
    return rank, world_size


def check_options(*, dtype: str, shard_size: int, rank: int | None, world_size: int | None) -> None:
    """Validate run options before any model is loaded (a model load takes seconds)."""
    check_layout(dtype, shard_size)
    worker_slot(rank, world_size)


def output_spec(out: str, model: str | None, pretrained: str | None, force: bool = False):
    """The model for writing into ``out``: an existing store's own model unless the user names one (which
    must match it, checked before loading anything); for a new store, the user's spec or the default."""
    from pathlib import Path

    from vlmtools.models import ModelSpec, spec_for_store

    if Path(out).is_dir() and (Path(out) / INFO).exists() and not force:
        info = read_info(Path(out))
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


def _quiet_worker(_: int) -> None:
    """Decoder processes leave Ctrl-C/SIGTERM to the main process, which stops them without a traceback
    from each worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
                 world_size: int | None = None, retry_errors: bool = False, force: bool = False) -> EmbedSummary:
    """Embed manifest ``records`` with ``encoder`` (a models.Encoder) into the store ``out``.
    ``retry_errors`` redoes the shards whose inputs failed before (e.g. after fixing the files);
    ``force`` empties an existing store first."""
    if not records:
        raise BadInput("no images to embed (empty input)")
    worker_slot(rank, world_size)
    with _exclusive(out, rank, world_size):
        _prepare(out, force)
        return _embed_images(records, out, encoder, batch_size=batch_size, workers=workers,
                             shard_size=shard_size, dtype=dtype, rank=rank, world_size=world_size,
                             retry_errors=retry_errors)


def _embed_images(records, out, encoder, *, batch_size, workers, shard_size, dtype, rank, world_size,
                  retry_errors) -> EmbedSummary:
    import numpy as np
    import torch

    rank, world_size = worker_slot(rank, world_size)
    writer = StoreWriter(out, kind="image", model=encoder.spec.as_dict(), dim=encoder.embed_dim, dtype=dtype,
                         shard_size=shard_size, preprocess=encoder.preprocess_description(),
                         extra_info={"input_sha": input_digest(records), "input_count": len(records),
                                     "files_sha": files_digest(records), **encoder.precision_info()},
                         renewable=("files_sha",) if retry_errors else ())
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
        num_workers=workers, collate_fn=_collate, pin_memory=on_cuda, worker_init_fn=_quiet_worker,
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
    # an empty list (as in some published descriptor files) gives no rows; classify scores that class
    descriptor_lines = formats.DescriptorLines(name, allow_empty=True)
    empty = []
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
            if not rec["descriptors"]:
                empty.append((lineno, cls))
            for j, (d, k) in enumerate(zip(rec["descriptors"], formats.descriptor_kinds(rec))):
                rows.append({"id": f"{cls}::{j}", "text": descriptor_sentence(cls, d, wrap), "class": cls,
                             "descriptor": d, "kind": k, "wrap": wrap})
        elif kind == "texts":
            rows.append({**rec, "id": str(rec.get("id", len(rows)))})
        else:
            rows.append({"id": str(len(rows)), "text": rec})
    if empty and not rows:
        raise BadInput(f"{name}:{empty[0][0]}: class {empty[0][1]!r} has an empty descriptor list, and no class "
                       f"has descriptors")
    if empty:
        console.warn(f"{name}: {len(empty)} classes have an empty descriptor list and get no rows (e.g. "
                     f"{empty[0][1]!r}); classify --allow-empty scores them")
    if not rows:
        raise BadInput(f"{name}: no texts to embed")
    extras = {"source": "descriptors" if source == "descriptors" else "texts"}
    if source == "descriptors":
        extras["wrap"] = wrap
    return rows, extras


def embed_texts(rows: Sequence[dict], out: str, encoder, *, batch_size: int = 256, shard_size: int = 10000,
                dtype: str = "float16", extra_info: dict | None = None, rank: int | None = None,
                world_size: int | None = None, force: bool = False) -> EmbedSummary:
    worker_slot(rank, world_size)
    with _exclusive(out, rank, world_size):
        _prepare(out, force)
        return _embed_texts(rows, out, encoder, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                            extra_info=extra_info, rank=rank, world_size=world_size)


def _embed_texts(rows, out, encoder, *, batch_size, shard_size, dtype, extra_info, rank, world_size) -> EmbedSummary:
    rank, world_size = worker_slot(rank, world_size)
    extra = {**(extra_info or {}), "input_sha": input_digest(rows), "input_count": len(rows),
             **encoder.precision_info()}
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
