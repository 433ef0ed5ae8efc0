"""FAISS inner-product indexes over a store: choose a factory key, build, save, load (used by `index`, `search`).

An index lives inside its store as index.faiss + index.json (formats.INDEX_FORMAT). Rows are the store's
rows in order, so index row i is store row i. Stores are L2-normalized, so inner product = cosine.

The automatic choice follows autofaiss's reasoning (criteo/autofaiss, get_optimal_index_keys_v2), simplified:
  - fewer than 1,000 rows: Flat (exact; nothing is faster at that size)
  - fewer than 1M rows: HNSW with the largest M <= 32 whose graph fits the memory budget (M >= 8), else
    (beyond 1M rows a graph holds a float32 copy of the store and takes tens of minutes to build on a
    few cores, where IVF-PQ with reranking builds in minutes)
  - fewer than 10,000 rows: Flat (too few rows to train quantizers)
  - fewer than 1M rows: IVF<nlist>,Flat if the uncompressed lists fit
  - otherwise IVF<nlist>[_HNSW32],PQ<m>x4fs: 4-bit fast-scan PQ (m/2 bytes per row, scanned with SIMD
    lookup tables), m = dim/8 or the largest smaller code that fits the budget, with an HNSW coarse
    quantizer from 16,384 lists on; searches rescore rerank*k candidates exactly from the store
    (DEFAULT_RERANK), so the codes only have to shortlist, not rank
  - when no PQ code divides dim or none fits: IVF<nlist>,Flat, else an HNSW graph, if either fits
with nlist ~ 4*sqrt(N) rounded to a power of two (131072 from 300M rows on).
Measured on 1M x 512 (README, benchmarks/bench_index.py): the fast-scan codes with reranking beat
byte-coded PQ64 without it on both recall and speed.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from vlmtools import formats
from vlmtools.console import info, progress, warn
from vlmtools.errors import BadInput

INDEX_FILE = "index.faiss"
INDEX_INFO = "index.json"
DEFAULT_MAX_MEMORY = "4G"
FLAT_BELOW = 1_000
QUANTIZE_FROM = 10_000
IVF_FLAT_BELOW = 1_000_000
HNSW_MAX_M = 32
DEFAULT_EF_SEARCH = 64  # recall@10 ~0.99 for HNSW32 on 5k random 32-d unit vectors (tests/test_index.py)
PQ_CODE_SIZES = (256, 128, 96, 64, 48, 32, 24, 16, 8, 4)
HNSW_COARSE_FROM = 16_384  # lists; below, a flat coarse quantizer costs less than the graph's detour
NPROBE_SHARE_PQ = 128  # default nprobe for PQ indexes: max(16, nlist/128)
DEFAULT_RERANK = 10  # PQ indexes: rescore 10*k candidates from the store (0 turns it off)
ADD_CHUNK = 65_536  # rows converted to float32 and added at a time


# ----------------------------------------------------------------------------- choosing a key

def parse_memory(text: str | int) -> int:
    """'4G', '512M', '1.5GB', '800k' or a byte count -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise BadInput(f"--max-memory {text!r}: expected a size like 4G, 512M or 800K")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise BadInput(f"--max-memory {text!r}: must be positive")
    return value


def nlist_for(n: int) -> int:
    """Number of IVF lists for n rows: ~4*sqrt(n) as a power of two, 131072 for very large n."""
    if n < 300_000_000:  # 4096 lists at 1M rows, 16384 from ~8.4M, 65536 from ~134M
        return max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))
    return 131_072


def _hnsw_m(n: int, dim: int, budget: int) -> int:
    # an HNSW graph costs ~ 4*n*(dim + 2M) bytes: the float32 vectors plus 2M int32 links per row at level 0
    return int(math.floor((budget / (4 * n) - dim) / 2))


def estimate_bytes(key: str, n: int, dim: int) -> int:
    """Rough in-memory size of an index built with ``key`` over n rows (what the budget is compared to)."""
    m = re.search(r"HNSW(\d+)", key.split(",")[0]) if "IVF" not in key else None
    if m:
        return 4 * n * (dim + 2 * int(m.group(1)))
    ivf = re.search(r"IVF(\d+)", key)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", key)
    lists = 4 * dim * int(ivf.group(1)) if ivf else 0
    if pq:
        bits = int(pq.group(2) or 8)
        code = math.ceil(int(pq.group(1)) * bits / 8)
        return n * (code + 8) + lists + 2 ** bits * 4 * dim  # codes + ids, centroids, PQ codebooks
    return n * (4 * dim + (8 if ivf else 0)) + lists


def choose_index_key(n: int, dim: int, max_memory: str | int = DEFAULT_MAX_MEMORY) -> str:
    """The factory key `auto` builds for n rows of dimension dim under a memory budget (see module doc)."""
    budget = parse_memory(max_memory)
    if n < FLAT_BELOW:
        return "Flat"
    m = _hnsw_m(n, dim, budget)
    if m >= 8 and n < IVF_FLAT_BELOW:  # beyond, the graph's build time and float32 copy stop paying off
        return f"HNSW{min(m, HNSW_MAX_M)}"
    if n < QUANTIZE_FROM:
        return "Flat"
    nlist = nlist_for(n)
    if n < IVF_FLAT_BELOW:
        key = f"IVF{nlist},Flat"
        if estimate_bytes(key, n, dim) <= budget:
            return key
    coarse = f"IVF{nlist}" if nlist < HNSW_COARSE_FROM else f"IVF{nlist}_HNSW32"
    codes = [code for code in PQ_CODE_SIZES
             # PQ needs dim divisible by m; 8 dims per 4-bit sub-quantizer at most (finer codes scan slower
             # and reranking makes up the difference), 2 at least
             if dim % code == 0 and (code <= dim // 8 or code == 4) and code <= dim // 2]
    for code in codes:
        key = f"{coarse},PQ{code}x4fs"
        if estimate_bytes(key, n, dim) <= budget:
            return key
    # no PQ code fits or divides dim: uncompressed lists, else a graph, if either fits
    for key in (f"IVF{nlist},Flat", f"HNSW{min(m, HNSW_MAX_M)}" if m >= 8 else None):
        if key and estimate_bytes(key, n, dim) <= budget:
            return key
    if not codes:
        raise BadInput(f"auto: no PQ code divides dim {dim} and no uncompressed index of {n} rows fits in "
                       f"--max-memory {max_memory}; raise --max-memory or pass --index-key "
                       f"(e.g. IVF{nlist},SQ8)")
    smallest = f"{coarse},PQ{codes[-1]}x4fs"
    raise BadInput(f"no index of {n} rows x {dim} dims fits in --max-memory {max_memory} "
                   f"(the smallest, {smallest}, needs ~{estimate_bytes(smallest, n, dim) / 2**30:.1f} GiB); "
                   f"raise --max-memory")


# ----------------------------------------------------------------------------- search parameters

def has_pq_codes(key: str) -> bool:
    """Whether an index stores PQ codes (IVF...,PQ64, PQ32x4fs; not an OPQ transform before Flat lists)."""
    return re.search(r"(?:^|,)PQ\d", key) is not None


def default_rerank(key: str) -> int:
    """The rerank factor for an index.json without one (indexes built before it was saved)."""
    return DEFAULT_RERANK if has_pq_codes(key) else 0


def default_params(key: str, nprobe: int | None = None, ef_search: int | None = None,
                   rerank: int | None = None) -> dict:
    """Search-time parameters saved in index.json: nprobe for IVF indexes (and the HNSW coarse quantizer's
    efSearch), efSearch for HNSW indexes, rerank (exact rescoring of rerank*k candidates from the store)
    (by default DEFAULT_RERANK for PQ codes, which rank coarsely; 0 turns it off)."""
    ivf = re.search(r"IVF(\d+)", key)
    pq = has_pq_codes(key)
    if rerank is None and pq:
        rerank = DEFAULT_RERANK
    params: dict = {"rerank": rerank} if rerank is not None else {}
    if ivf:
        nlist = int(ivf.group(1))
        # PQ lists are scanned fast and reranked: fewer lists suffice; exact (Flat) lists probe more
        share = NPROBE_SHARE_PQ if pq else 16
        params["nprobe"] = min(nlist, nprobe or max(16, nlist // share))
        if "_HNSW" in key:
            params["quantizer_efSearch"] = max(ef_search or DEFAULT_EF_SEARCH, 2 * params["nprobe"])
    elif "HNSW" in key:
        params["efSearch"] = ef_search or DEFAULT_EF_SEARCH
    if nprobe is not None and not ivf:
        warn(f"--nprobe applies to IVF indexes only; ignored for {key}")
    return params


def apply_params(index, params: dict, k: int = 1) -> None:
    """Set search parameters; efSearch is raised to 2k so that deep result lists stay accurate."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name == "rerank":  # applied by search.search_vectors, not by faiss
            continue
        if name in ("efSearch", "quantizer_efSearch"):
            value = max(int(value), 2 * k)
        space.set_index_parameter(index, name, value)


# ----------------------------------------------------------------------------- building

def _use_gpu(requested: bool | None) -> bool:
    import faiss

    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if requested and not available:
        raise BadInput("--gpu: this faiss has no GPU support or sees no CUDA device (pip install vlmtools[gpu])")
    return available if requested is None else requested


def _to_gpu(index):
    """Move an index to GPU 0 for training/adding; indexes faiss cannot move (HNSW) stay on the CPU."""
    import faiss

    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), True
    except (RuntimeError, AttributeError):
        return index, False


def _sample_rows(reader, size: int, seed: int):
    """A seeded uniform sample of ``size`` store rows as float32, read shard by shard."""
    import numpy as np

    n = len(reader)
    picks = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = np.empty((size, reader.dim), dtype=np.float32)  # filled in place: the sample is held once
    start = 0
    for emb in reader.emb_shards():
        stop = start + emb.shape[0]
        lo, hi = np.searchsorted(picks, [start, stop])
        if hi > lo:
            out[lo:hi] = emb[picks[lo:hi] - start]
        start = stop
    return out


def _no_polysemous_training(index) -> None:
    """index_factory turns on polysemous training for IVF-PQ, which is only for Hamming-distance filtering
    (off by default at search time) and dominates training: 340 s of 341 for IVF256,PQ64 on 16k x 512
    rows (2 shared cores). Turn it off."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def train_size(key: str, n: int, dim: int | None = None, max_memory: str | int | None = None) -> int:
    """Rows to train on: ~64 per IVF list (faiss wants >= 39), and >= 10k for anything that trains
    (PQ codebooks have 256 centroids each; PCA/OPQ need a fair sample too); never more than the store,
    and (given dim and max_memory) a float32 sample of at most half the memory budget (the sample is
    freed before rows are added; 10^7 x 512 in 4G: 2 GiB of sample, then ~0.4 GiB of codes)."""
    ivf = re.search(r"IVF(\d+)", key)
    size = min(n, max(64 * int(ivf.group(1)) if ivf else 0, QUANTIZE_FROM))
    if dim is not None and max_memory is not None:
        size = min(size, max(QUANTIZE_FROM, parse_memory(max_memory) // 2 // (4 * dim)))
    return size


def index_paths(store: str | Path) -> tuple[Path, Path]:
    store = Path(store)
    return store / INDEX_FILE, store / INDEX_INFO


def build_index(store: str | Path, index_key: str = "auto", max_memory: str | int = DEFAULT_MAX_MEMORY,
                nprobe: int | None = None, ef_search: int | None = None, force: bool = False,
                seed: int = 0, gpu: bool | None = None, rerank: int | None = None) -> dict:
    """Build (or keep) the store's index; returns its index.json record.

    An up-to-date index (same key, or ``auto``) is kept unless ``force``; new nprobe/ef_search values are
    saved without a rebuild. A stale one (the store's row count, dim or model changed) is rebuilt with
    ``index_key`` (``auto`` chooses afresh). Replacing a current index with another key needs ``force``.
    """
    import faiss
    import numpy as np

    from vlmtools.store import open_store

    reader = open_store(store)
    n, dim = len(reader), reader.dim
    if n == 0:
        raise BadInput(f"{store}: the store is empty; nothing to index")
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search), ("--rerank", rerank)):
        if value is not None and value < (0 if name == "--rerank" else 1):
            raise BadInput(f"{name} must be at least {0 if name == '--rerank' else 1}")
    key = choose_index_key(n, dim, max_memory) if index_key == "auto" else index_key.strip()
    faiss_path, info_path = index_paths(store)

    old = read_index_info(store)
    if old is not None and not force:
        stale = stale_reasons(old, reader)
        if not stale and (index_key == "auto" or old.get("index_key") == key):
            fresh = default_params(old["index_key"], nprobe, ef_search, rerank)
            given = {"nprobe"} if nprobe else set()
            given |= {"efSearch", "quantizer_efSearch"} if ef_search else set()
            params = {**old.get("params", {}), **{k: v for k, v in fresh.items() if k in given}}
            if rerank is not None:
                params["rerank"] = rerank
            if (nprobe or ef_search or rerank is not None) and params != old.get("params"):
                old = {**old, "params": params}  # new search parameters need no rebuild
                formats.write_json(info_path, old)
                info(f"{store}: index {old['index_key']} is up to date; search parameters now {params}")
                return old
            info(f"{store}: index {old.get('index_key')} over {n} rows is up to date; nothing to do "
                 f"(--force rebuilds it)")
            return old
        if not stale:
            raise BadInput(f"{store} already has an index ({old.get('index_key')}); pass --force to replace it "
                           f"with {key}")
        info(f"{store}: the index is stale ({'; '.join(stale)}); rebuilding")

    ivf = re.search(r"IVF(\d+)", key)
    if ivf and int(ivf.group(1)) > n:
        raise BadInput(f"--index-key {key}: {ivf.group(1)} lists need at least that many rows to train; "
                       f"the store has {n} (use fewer lists, or auto)")
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise BadInput(f"--index-key {key!r}: faiss cannot build it for dim {dim} "
                       f"({str(exc).strip().splitlines()[-1]})") from None
    _no_polysemous_training(index)
    params = default_params(key, nprobe, ef_search, rerank)
    on_gpu = False
    if _use_gpu(gpu):
        index, on_gpu = _to_gpu(index)
        if not on_gpu:
            warn(f"faiss cannot build {key} on the GPU; building on the CPU")

    started = time.perf_counter()
    n_train = 0
    if not index.is_trained:
        n_train = train_size(key, n, dim, max_memory)
        lists = re.search(r"IVF(\d+)", key)
        if lists and n_train < 39 * int(lists.group(1)):
            warn(f"training {key} on {n_train} rows (< 39 per list) to stay within --max-memory {max_memory}; "
                 f"fewer lists (--index-key) or more memory train better")
        info(f"training {key} on {n_train} sampled rows (seed {seed})")
        index.train(_sample_rows(reader, n_train, seed))
    with progress(f"indexing {key}", total=n, unit="rows") as bar:
        for emb in reader.emb_shards():
            for start in range(0, emb.shape[0], ADD_CHUNK):
                chunk = np.ascontiguousarray(emb[start:start + ADD_CHUNK], dtype=np.float32)
                index.add(chunk)
                bar.advance(chunk.shape[0])
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    if index.ntotal != n:
        raise BadInput(f"{store}: indexed {index.ntotal} rows but the store says {n}; the store is damaged")
    seconds = time.perf_counter() - started

    record = {
        "format": formats.INDEX_FORMAT,
        "index_key": key,
        "requested_key": index_key,
        "metric": "ip",
        "count": int(index.ntotal),
        "dim": dim,
        "store_count": n,
        "store_content_sha256": reader.info.get("content_sha256"),  # the store it was built from
        "model": reader.info.get("model"),
        "params": params,
        "train_size": n_train,
        "seed": seed,
        "max_memory": str(max_memory),
        "gpu": on_gpu,
        "build_seconds": round(seconds, 3),
        "faiss_version": faiss.__version__,
    }
    # index.json goes first and comes back last: an index.faiss without index.json is not an index.
    info_path.unlink(missing_ok=True)
    with formats.atomic_path(faiss_path) as tmp:
        faiss.write_index(index, str(tmp))
        record["faiss_bytes"], record["faiss_sha256"] = tmp.stat().st_size, formats.file_sha256(tmp)
    formats.write_json(info_path, record)
    info(f"{key} over {n} rows (dim {dim}) in {seconds:.1f} s -> {faiss_path}")
    return record


# ----------------------------------------------------------------------------- loading

def read_index_info(store: str | Path) -> dict | None:
    """The store's index.json, or None when the store has no (complete) index."""
    faiss_path, info_path = index_paths(store)
    if not info_path.exists() or not faiss_path.exists():
        return None
    record = formats.read_json(info_path)
    formats.check_format(record, formats.INDEX_FORMAT, str(info_path))
    return record


def stale_reasons(record: dict, reader) -> list[str]:
    """Why an index.json no longer describes the store (empty when it does)."""
    reasons = [f"index {what} {record.get(key)!r}, store {mine!r}"
               for what, key, mine in (("row count", "store_count", len(reader)), ("dim", "dim", reader.dim),
                                       ("model", "model", reader.info.get("model")))
               if record.get(key) != mine]
    if record.get("store_content_sha256") != reader.info.get("content_sha256"):
        reasons.append("built for another store content (copied from another store, or the store was rewritten)")
    return reasons


def load_index(reader):
    """(faiss index, index.json record) for an opened store, or None when there is no usable index.

    A stale index (built when the store had another row count, dimension or model) is not used: the
    caller falls back to exact search, and a warning says how to rebuild it.
    """
    import faiss

    record = read_index_info(reader.path)
    if record is None:
        return None
    problems = stale_reasons(record, reader)
    if problems:
        warn(f"{reader.path}: the index is stale ({'; '.join(problems)}); searching exactly. "
             f"Rebuild it with `vlmtools index {reader.path} --force`.")
        return None
    faiss_path, _ = index_paths(reader.path)
    try:
        index = faiss.read_index(str(faiss_path))
    except RuntimeError as exc:
        raise BadInput(f"{faiss_path}: cannot read the index ({str(exc).strip().splitlines()[-1]}); "
                       f"rebuild it with `vlmtools index {reader.path} --force`") from None
    if index.ntotal != len(reader) or index.d != reader.dim:
        warn(f"{faiss_path}: holds {index.ntotal} rows of dim {index.d}, the store {len(reader)} of dim "
             f"{reader.dim}; searching exactly")
        return None
    return index, record
