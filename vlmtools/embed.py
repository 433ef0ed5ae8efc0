"""`embed`: inputs -> encoder -> store, in shards (reader -> worker -> writer, as img2dataset does).

Shard k holds input rows [k*S, (k+1)*S) minus those that failed, so a rerun (or another worker) knows
exactly which shards are left: finished shards are kept, an interrupted one is redone from scratch.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
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
    timings: dict = field(default_factory=dict)  # seconds per stage (read_input, load_model, first_batch, ...)

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


def files_digest(records: Sequence[dict], sources: Sequence | None = None) -> str:
    """Size and modification time of every image (of its tar, for tar members: wds.read_source's
    locations): a file replaced under the same name changes it."""
    h = hashlib.sha256()
    for n, rec in enumerate(records):
        src = rec["path"] if sources is None else sources[n]
        try:
            st = os.stat(src if isinstance(src, str) else src[0])
            h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"-\n")
    return h.hexdigest()[:16]


def _exclusive(out: str, rank: int | None, world_size: int | None):
    """A rankless run locks its store (OUT.lock) for its whole length; ranked workers share one store
    by design (each writes only its own shards)."""
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

DECODES = ("auto", "cpu", "gpu")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(device: str) -> int:
    """Decode workers from the core count: on CUDA every core but the main process's (up to 16); on the
    CPU half of them, since the model's forward pass needs the other half."""
    cpus = available_cpus()
    if device.startswith("cuda"):
        return max(1, min(16, cpus - 1))
    return max(1, cpus // 2)


def prefetch_for(workers: int) -> int:
    """Batches each worker keeps ready: enough for ~8 batches in flight, 2 to 4 per worker."""
    return max(2, min(4, -(-8 // max(workers, 1))))


class _ImageDataset:
    """Map-style dataset: index -> (index, payload, error reason). The payload is a preprocessed tensor
    (PIL path) or, with ``raw_jpeg``, a JPEG's bytes as a uint8 tensor for the batched tensor pipeline
    (other formats, CMYK and EXIF-rotated JPEGs still take the PIL path here, per file)."""

    def __init__(self, sources: Sequence, preprocess: Callable, draft_side: int | None = None,
                 raw_jpeg: bool = False):
        self.sources = sources
        self.preprocess = preprocess
        self.draft_side = draft_side
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        import io

        import torch

        from vlmtools.images import plain_jpeg
        from vlmtools.wds import read_source

        try:
            data = read_source(self.sources[i])
            if not data:
                raise OSError("empty file (0 bytes)")
            if self.raw_jpeg and plain_jpeg(data):
                return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), None
            src = self.sources[i]
            name = src if isinstance(src, str) else src[0]
            return i, ("tensor", self.preprocess(load_rgb(io.BytesIO(data), self.draft_side, name=name))), None
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
    """-> (indices, preprocessed tensor batch or None, raw JPEGs, [(index, reason)]); the tensor batch holds
    the PIL-path images, in the order of their indices. Raw JPEGs are (indices, one uint8 tensor of all
    their bytes, sizes): one tensor crosses the process boundary per batch, not one per image."""
    import torch

    ok = [(i, p[1]) for i, p, _ in items if p is not None and p[0] == "tensor"]
    raw = [(i, p[1]) for i, p, _ in items if p is not None and p[0] == "jpeg"]
    failed = [(i, reason) for i, p, reason in items if p is None]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    blob = torch.cat([d for _, d in raw]) if raw else torch.zeros(0, dtype=torch.uint8)
    return [i for i, _ in ok], tensor, ([i for i, _ in raw], blob, [len(d) for _, d in raw]), failed


def _shard_ranges(n: int, shard_size: int, bounds: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, stop) input rows of every store shard: fixed-size ranges, or ``bounds`` (row where each
    input shard starts, then the end) when the input comes in shards of its own (webdataset tars)."""
    if bounds is not None:
        return list(zip(bounds[:-1], bounds[1:]))
    return [(b, min(b + shard_size, n)) for b in range(0, max(n, 1), shard_size)]


def _shard_batches(shards: Sequence[int], ranges: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of input indices that never cross a shard boundary, in shard order."""
    batches = []
    for k in shards:
        start, stop = ranges[k]
        batches.extend(list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))
    return batches


def _plan(writer: StoreWriter, n_shards: int, rank: int, world_size: int) -> tuple[list[int], list[int]]:
    mine = [k for k in range(n_shards) if k % world_size == rank]
    todo = [k for k in mine if not writer.shard_done(k)]
    writer.clean_partial(todo)
    return mine, todo


def decode_path(decode: str, device: str, preprocess) -> tuple[str, object]:
    """The decode path ("cpu" or "gpu") and, for "gpu", the tensor preprocessing, without a word (see
    resolve_decode)."""
    from vlmtools.images import TensorPreprocess

    if decode not in DECODES:
        raise BadInput(f"--decode {decode!r}: expected one of {'|'.join(DECODES)}")
    if decode == "cpu" or (decode == "auto" and not device.startswith("cuda")):
        return "cpu", None
    tensor_pre = TensorPreprocess.from_transform(preprocess)
    return ("cpu", None) if tensor_pre is None else ("gpu", tensor_pre)


def resolve_decode(decode: str, encoder) -> tuple[str, object]:
    """The decode path a run uses ("cpu" or "gpu") and, for "gpu", the tensor preprocessing. ``auto`` is
    gpu on a CUDA device when the model's transform can be reproduced on tensors; ``gpu`` without CUDA runs
    the same tensor pipeline on the CPU (torchvision's libjpeg decoder), which is what the tests check."""
    path, tensor_pre = decode_path(decode, encoder.device, encoder.preprocess)
    if decode == "gpu" and path == "cpu":
        console.warn(f"--decode gpu: the model's preprocessing ({encoder.preprocess_description()}) has a "
                     f"step the tensor pipeline does not reproduce; decoding on the CPU with PIL")
    elif decode == "gpu" and not encoder.device.startswith("cuda"):
        console.info("--decode gpu without a CUDA device: decoding JPEGs with torchvision on the CPU")
    return path, tensor_pre


class _BatchDecoder:
    """Turns a collated batch into (input indices, model-ready tensor on the device, failures): JPEG bytes
    are decoded together on the device and preprocessed as tensors; a file that fails there takes the
    PIL path (and is recorded as failed only if that fails too)."""

    def __init__(self, encoder, tensor_pre, draft_side):
        self.encoder, self.tensor_pre, self.draft_side = encoder, tensor_pre, draft_side

    def __call__(self, indices, tensor, raw, failed):
        import io

        import torch

        from vlmtools.images import decode_jpegs

        raw_indices, blob, sizes = raw
        if not raw_indices:
            return indices, tensor, failed
        datas = torch.split(blob, sizes)  # contiguous views, one per file
        device = self.encoder.device
        decoded = decode_jpegs(datas, device)
        good = [(i, img) for i, img in zip(raw_indices, decoded) if img is not None]
        parts, order = [], list(indices)
        if tensor is not None:
            parts.append(tensor.to(device, non_blocking=True))
        if good:
            parts.append(self.tensor_pre([img for _, img in good]))
            order += [i for i, _ in good]
        retry = [(i, data) for i, data, img in zip(raw_indices, datas, decoded) if img is None]
        failed = list(failed)
        for i, data in retry:  # the decoder refused it: the PIL path decides
            try:
                img = load_rgb(io.BytesIO(data.numpy().tobytes()), self.draft_side)
                parts.append(self.encoder.preprocess(img).unsqueeze(0).to(device))
                order.append(i)
            except Exception as exc:
                failed.append((i, f"{type(exc).__name__}: {exc}".strip()))
        if not parts:
            return [], None, failed
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        perm = sorted(range(len(order)), key=order.__getitem__)
        if perm != list(range(len(order))):
            batch = batch[torch.as_tensor(perm, device=batch.device)]
            order = [order[p] for p in perm]
        return order, batch, sorted(failed)


def _last_index(batch) -> int:
    """The highest input index a collated batch covers (its images, raw JPEGs and failures)."""
    indices, _, (raw_indices, _, _), failed = batch
    return max(indices + raw_indices + [i for i, _ in failed])


def _decoded_batches(loader, to_batch, ahead: bool, device: str):
    """(last input index, input indices, model-ready tensor, failures) per loader batch. With ``ahead``, a
    thread decodes the next batches (nvJPEG and the tensor preprocessing, on a stream of its own on CUDA)
    while the model runs on the current one; otherwise batches are decoded in turn."""
    if not ahead:
        for batch in loader:
            yield (_last_index(batch), *to_batch(*batch))
        return
    yield from _DecodeAhead(loader, to_batch, device)


class _DecodeAhead:
    """Runs ``to_batch`` over ``loader`` in a background thread, at most DEPTH batches ahead. The heavy
    calls (file bytes from the workers, decode_jpeg, tensor kernels) release the GIL, so decoding overlaps
    the model. Errors in the thread are raised in the consumer; closing stops the thread and the loader."""

    DEPTH = 3

    def __init__(self, loader, to_batch, device: str):
        import queue
        import threading

        self.loader, self.to_batch, self.device = loader, to_batch, device
        self.queue: "queue.Queue" = queue.Queue(maxsize=self.DEPTH)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vlmtools-decode", daemon=True)

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        import torch

        cuda = self.device.startswith("cuda")
        stream = torch.cuda.Stream(device=self.device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                iterator = iter(self.loader)
                for batch in iterator:
                    if self.stop.is_set():
                        break
                    item = (_last_index(batch), *self.to_batch(*batch))
                    if cuda:
                        stream.synchronize()  # the consumer's stream may use the tensor at once
                    if not self._put(("batch", item)):
                        break
                del iterator  # shuts the loader's workers down from this thread
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc))

    def __iter__(self):
        self.thread.start()
        try:
            while True:
                kind, item = self.queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                tensor = item[2]
                if tensor is not None and tensor.is_cuda:
                    import torch

                    # made on the decode stream, used and freed on this one: keep the allocator from
                    # handing its memory to the next decode before the model is done with it
                    tensor.record_stream(torch.cuda.current_stream(tensor.device))
                yield item
        finally:
            self.stop.set()
            self.thread.join(timeout=10)


@dataclass(frozen=True)
class _LoaderPlan:
    """What decode workers are started for: a loader made for one plan serves only a run with that plan."""
    batches: list
    transform: str  # the preprocess transform's description
    raw_jpeg: bool
    draft_side: int | None
    workers: int
    pin_memory: bool


def _image_loader(sources: Sequence, preprocess: Callable, plan: _LoaderPlan):
    import torch

    return torch.utils.data.DataLoader(
        _ImageDataset(sources, preprocess, plan.draft_side, raw_jpeg=plan.raw_jpeg), batch_sampler=plan.batches,
        num_workers=plan.workers, collate_fn=_collate, pin_memory=plan.pin_memory, worker_init_fn=_quiet_worker,
        persistent_workers=False, prefetch_factor=prefetch_for(plan.workers) if plan.workers > 0 else None)


class _Prefetch:
    """A loader's iterator started before the model loads: its workers fork (small, without the model) and
    decode the first batches while the model is built; the run takes it when its plan is the same."""

    def __init__(self, sources: Sequence, preprocess: Callable, plan: _LoaderPlan):
        self.plan = plan
        self.iterator = iter(_image_loader(sources, preprocess, plan))

    def take(self):
        iterator, self.iterator = self.iterator, None
        return iterator

    def close(self) -> None:
        """Stop the workers now (an interrupted model load, or a plan that changed)."""
        iterator, self.iterator = self.iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def run_precision(precision: str, device: str) -> dict:
    """What a store records of the encoder's precision (Encoder.precision_info), known before any model
    loads (on a machine without a GPU driver, without importing torch)."""
    from vlmtools.models import compute_precision, resolve_device

    return {"precision": precision, "compute": compute_precision(precision, resolve_device(device))}


def image_run_info(records: Sequence[dict], sources: Sequence | None, extra_info: dict | None,
                   precision: dict) -> dict:
    """The store info keys that identify an `embed images` run: its input, the images' files, precision."""
    return {**(extra_info or {}), "input_sha": input_digest(records), "input_count": len(records),
            "files_sha": files_digest(records, sources), **precision}


def finished_run(out: str, *, kind: str, spec, run_info: dict, n_shards: int, dtype: str, shard_size: int,
                 rank: int | None = None, world_size: int | None = None, force: bool = False,
                 retry_errors: bool = False) -> EmbedSummary | None:
    """The summary of a run with nothing to do, decided from the store alone before any model loads: the
    store at ``out`` was written by this very run (kind, model, layout, input, files, precision) and every
    shard of this worker is on disk. None otherwise: the run goes on and decides as it always did."""
    from pathlib import Path

    path = Path(out)
    if force or not (path / INFO).is_file() or (retry_errors and any(path.glob("errors-*.jsonl"))):
        return None
    try:
        info = read_info(path)
    except BadInput:
        return None
    expected = {"kind": kind, "model": spec.as_dict(), "dtype": dtype, "shard_size": shard_size, **run_info}
    if any(info.get(key) != value for key, value in expected.items()) or not isinstance(info.get("dim"), int):
        return None
    slot, size = worker_slot(rank, world_size)
    mine = [k for k in range(n_shards) if k % size == slot]
    if not all((path / formats.emb_name(formats.shard_stem(k))).exists() for k in mine):
        return None
    with _exclusive(out, rank, world_size):  # the caller's rank arguments: a rankless run takes the lock
        writer = StoreWriter(out, kind=kind, model=spec.as_dict(), dim=info["dim"], dtype=dtype,
                             shard_size=shard_size, extra_info=run_info,
                             preprocess=info.get("preprocess"))  # the transform the shards were made with
        done = writer.finalize(n_shards)
    console.info(f"{out}: all {len(mine)} shard(s) of this worker are already done; nothing to do (the model "
                 f"was not loaded)")
    return EmbedSummary(out, (done or {}).get("count") or 0, 0, 0, 0, len(mine), 0.0, done is not None)


def embed_images(records: Sequence[dict], out: str, encoder, *, batch_size: int = 64, workers: int | None = None,
                 shard_size: int = 10000, dtype: str = "float16", rank: int | None = None,
                 world_size: int | None = None, retry_errors: bool = False, force: bool = False,
                 decode: str = "auto", draft: bool = True, sources: Sequence | None = None,
                 shard_bounds: Sequence[int] | None = None, extra_info: dict | None = None,
                 run_info: dict | None = None, prefetch: "_Prefetch | None" = None) -> EmbedSummary:
    """Embed manifest ``records`` with ``encoder`` (a models.Encoder) into the store ``out``.
    ``retry_errors`` redoes the shards whose inputs failed before (e.g. after fixing the files);
    ``force`` empties an existing store first.
    ``decode``: auto|cpu|gpu (see resolve_decode); ``draft``: JPEG draft decoding on the PIL path.
    ``sources`` (default: each record's path) says where each input's bytes are (wds.read_source);
    ``shard_bounds`` makes store shard k hold input rows [bounds[k], bounds[k+1]) (one per input tar).
    ``run_info``: image_run_info, when the caller computed it; ``prefetch``: decode workers the caller
    started before the model loaded (used when they were started for this very run)."""
    if not records:
        raise BadInput("no images to embed (empty input)")
    worker_slot(rank, world_size)
    with _exclusive(out, rank, world_size):
        _prepare(out, force)
        return _embed_images(records, out, encoder, batch_size=batch_size, workers=workers,
                             shard_size=shard_size, dtype=dtype, rank=rank, world_size=world_size,
                             retry_errors=retry_errors, decode=decode, draft=draft, sources=sources,
                             shard_bounds=shard_bounds, extra_info=extra_info, run_info=run_info,
                             prefetch=prefetch)


def _embed_images(records, out, encoder, *, batch_size, workers, shard_size, dtype, rank, world_size,
                  retry_errors, decode, draft, sources, shard_bounds, extra_info, run_info, prefetch) -> EmbedSummary:
    import numpy as np

    rank, world_size = worker_slot(rank, world_size)
    path, tensor_pre = resolve_decode(decode, encoder)
    if workers is None:
        workers = default_workers(encoder.device)
    precision = encoder.precision_info()
    if run_info is None or any(run_info.get(k) != v for k, v in precision.items()):
        run_info = image_run_info(records, sources, extra_info, precision)
    writer = StoreWriter(out, kind="image", model=encoder.spec.as_dict(), dim=encoder.embed_dim, dtype=dtype,
                         shard_size=shard_size, preprocess=encoder.preprocess_description(),
                         extra_info=run_info, renewable=("files_sha",) if retry_errors else ())
    if retry_errors:
        reopened = writer.reopen_failed()
        console.info(f"retrying {len(reopened)} shard(s) with failed inputs" if reopened else
                     "no failed inputs to retry")
    ranges = _shard_ranges(len(records), shard_size, shard_bounds)
    n_shards = len(ranges)
    mine, todo = _plan(writer, n_shards, rank, world_size)
    start = time.perf_counter()
    if not todo:
        info = writer.finalize(n_shards)
        console.info(f"{out}: all {len(mine)} shard(s) of this worker are already done; nothing to do")
        return EmbedSummary(out, (info or {}).get("count") or 0, 0, 0, 0, len(mine), 0.0, info is not None)

    on_cuda = encoder.device.startswith("cuda")
    sources = sources if sources is not None else [r["path"] for r in records]
    draft_side = encoder.image_size if draft else None
    to_batch = _BatchDecoder(encoder, tensor_pre, draft_side)
    ahead = path == "gpu" or on_cuda  # decoding or host-to-device copies to overlap with the model
    batches = _shard_batches(todo, ranges, batch_size)
    plan = _LoaderPlan(batches, encoder.preprocess_description(), path == "gpu", draft_side, workers, on_cuda)
    if prefetch is not None and prefetch.plan == plan:
        loader = prefetch.take()  # its workers have been decoding since before the model loaded
    else:
        if prefetch is not None:
            console.debug("the decode workers started before the model loaded were started for another plan "
                          "(the model's transform or the shards differ); starting them again")
            prefetch.close()
        loader = _image_loader(sources, encoder.preprocess, plan)
    shard_of = {}  # last input row of a shard -> the shard
    for k in todo:
        if ranges[k][0] == ranges[k][1]:  # an input shard without images: an empty store shard
            writer.write_shard(k, np.zeros((0, writer.dim), np.float32), [])
        else:
            shard_of[ranges[k][1] - 1] = k
    starts = [ranges[k][0] for k in todo if ranges[k][0] < ranges[k][1]]
    nonempty = [k for k in todo if ranges[k][0] < ranges[k][1]]

    embedded = skipped = 0
    pending: dict[int, tuple[list, list, list]] = {}  # shard -> (embeddings, meta, errors)
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    first_batch = 0.0  # worker start-up and the first batch's decoding
    batches = contextlib.closing(_decoded_batches(loader, to_batch, ahead, encoder.device))
    with console.progress(f"embed images -> {out}", total=total, unit="img") as bar, batches as decoded:
        for last, indices, tensor, failed in decoded:
            first_batch = first_batch or time.perf_counter() - start
            first = min(indices + [i for i, _ in failed])
            shard = nonempty[bisect.bisect_right(starts, first) - 1]
            embs, metas, errs = pending.setdefault(shard, ([], [], []))
            if tensor is not None:
                embs.append(encoder.encode_image_tensor(tensor).numpy())
                metas.extend(records[i] for i in indices)
            errs.extend({"id": records[i]["id"], "path": records[i]["path"], "reason": reason} for i, reason in failed)
            embedded += len(indices)
            skipped += len(failed)
            bar.advance(len(indices) + len(failed), errors=len(failed))
            if last in shard_of:  # batches arrive in order: the shard is complete
                embs, metas, errs = pending.pop(shard)
                matrix = np.concatenate(embs) if embs else np.zeros((0, writer.dim), np.float32)
                writer.write_shard(shard, matrix, metas, errs)
    seconds = time.perf_counter() - start
    info = writer.finalize(n_shards)
    summary = EmbedSummary(out, (info or {}).get("count") or 0, embedded, skipped, len(todo),
                           len(mine) - len(todo), seconds, info is not None,
                           {"first_batch": round(first_batch, 3), "loop": round(seconds, 3),
                            "finalize": round(time.perf_counter() - start - seconds, 3)})
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


def text_run_info(rows: Sequence[dict], extra_info: dict | None, precision: dict) -> dict:
    """The store info keys that identify an `embed text` run: its input and precision."""
    return {**(extra_info or {}), "input_sha": input_digest(rows), "input_count": len(rows), **precision}


def embed_text_input(rows: Sequence[dict], extras: dict, out: str, spec, *, device: str = "auto",
                     precision: str = "amp", force: bool = False, **options) -> EmbedSummary:
    """`embed text`: "nothing to do" from the store alone when this run finished before (no model loaded),
    else load the model and embed ``rows`` (text_records)."""
    from vlmtools.models import load_model

    shard_size = options.get("shard_size", 10000)
    finished = finished_run(out, kind="text", spec=spec, run_info=text_run_info(rows, extras, run_precision(
                                precision, device)), n_shards=max(1, math.ceil(len(rows) / shard_size)),
                            dtype=options.get("dtype", "float16"), shard_size=shard_size, rank=options.get("rank"),
                            world_size=options.get("world_size"), force=force)
    if finished is not None:
        return finished
    return embed_texts(rows, out, load_model(spec, device, precision), extra_info=extras, force=force, **options)


def _embed_texts(rows, out, encoder, *, batch_size, shard_size, dtype, extra_info, rank, world_size) -> EmbedSummary:
    rank, world_size = worker_slot(rank, world_size)
    extra = text_run_info(rows, extra_info, encoder.precision_info())
    writer = StoreWriter(out, kind="text", model=encoder.spec.as_dict(), dim=encoder.embed_dim, dtype=dtype,
                         shard_size=shard_size, extra_info=extra)
    n_shards = max(1, math.ceil(len(rows) / shard_size))
    mine, todo = _plan(writer, n_shards, rank, world_size)
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


def read_image_input(arg: str):
    """(records, sources, shard bounds, store info extras) for `embed images ARG`: a manifest (or bare
    paths, or ``-``), or webdataset tars (``.tar`` names, brace-expanded)."""
    from vlmtools.formats import read_manifest, source_name
    from vlmtools.wds import is_tar_input, tar_inputs

    if is_tar_input(arg):
        tars = tar_inputs(arg)
        return tars.records, tars.sources, tars.bounds, {"input_shards": len(tars.tars)}
    records = read_manifest(arg)
    if not records:
        raise BadInput(f"{source_name(arg)}: no images listed")
    return records, None, None, {}


def _start_workers(records, sources, bounds, out: str, spec, device: str, *, batch_size: int = 64,
                   workers: int | None = None, shard_size: int = 10000, rank: int | None = None,
                   world_size: int | None = None, retry_errors: bool = False, force: bool = False,
                   decode: str = "auto", draft: bool = True, **_) -> _Prefetch | None:
    """Decode workers for the shards this run will embed, started from the model's config (its transform
    is all they need) before the model loads; None where the config does not say (the run starts them
    after the load, as before)."""
    from pathlib import Path

    from vlmtools.models import config_preprocess, resolve_device

    device = resolve_device(device)
    workers = default_workers(device) if workers is None else workers
    if workers == 0:
        return None
    console.loading("torch and open_clip, and starting the decode workers")
    preprocess = config_preprocess(spec)
    if preprocess is None:
        return None
    path, _ = decode_path(decode, device, preprocess)
    size = next(t.size for t in preprocess.transforms if hasattr(t, "size"))  # the Resize step: the image size
    rank, world_size = worker_slot(rank, world_size)
    ranges = _shard_ranges(len(records), shard_size, bounds)
    store = Path(out)

    def done(k: int) -> bool:
        stem = formats.shard_stem(k)
        return not force and (store / formats.emb_name(stem)).exists() and not (
            retry_errors and (store / f"errors-{stem}.jsonl").exists())

    todo = [k for k in range(len(ranges)) if k % world_size == rank and not done(k)]
    plan = _LoaderPlan(_shard_batches(todo, ranges, batch_size), repr(preprocess).replace("\n", " "),
                       path == "gpu", (size if isinstance(size, int) else size[0]) if draft else None, workers,
                       device.startswith("cuda"))
    return _Prefetch(sources if sources is not None else [r["path"] for r in records], preprocess, plan)


def embed_image_input(arg: str, out: str, spec, *, device: str = "auto", precision: str = "amp",
                      load_encoder: Callable | None = None, **options) -> EmbedSummary:
    """`embed images`: read the input (a bad one fails before the model loads); say "nothing to do" from the
    store alone when this run finished before; else start the decode workers, load the model (``spec`` on
    ``device`` at ``precision``, or ``load_encoder()``) meanwhile, and embed. The model loads in this
    thread: loading it in another one was tried and dropped, as Ctrl-C during the load then aborted the
    process inside torch (SIGABRT); the workers ignore Ctrl-C and are stopped here."""
    from vlmtools.models import load_model

    start = time.perf_counter()
    records, sources, bounds, extras = read_image_input(arg)
    run_info = image_run_info(records, sources, extras, run_precision(precision, device))
    read = time.perf_counter()
    shard_size = options.get("shard_size", 10000)
    finished = finished_run(out, kind="image", spec=spec, run_info=run_info,
                            n_shards=len(_shard_ranges(len(records), shard_size, bounds)),
                            dtype=options.get("dtype", "float16"), shard_size=shard_size, rank=options.get("rank"),
                            world_size=options.get("world_size"), force=options.get("force", False),
                            retry_errors=options.get("retry_errors", False))
    if finished is not None:
        finished.timings = {"read_input": round(read - start, 3)}
        return finished
    prefetch = _start_workers(records, sources, bounds, out, spec, device, **options)
    started = time.perf_counter()
    try:
        formats.failpoint("embed.load_model")
        encoder = load_encoder() if load_encoder is not None else load_model(spec, device, precision)
        loaded = time.perf_counter()
        summary = embed_images(records, out, encoder, sources=sources, shard_bounds=bounds, extra_info=extras,
                               run_info=run_info, prefetch=prefetch, **options)
    finally:
        if prefetch is not None:
            prefetch.close()
    summary.timings = {"read_input": round(read - start, 3), "start_workers": round(started - read, 3),
                       "load_model": round(loaded - started, 3), **summary.timings}
    return summary
