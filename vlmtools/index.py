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

The search parameters (nprobe, efSearch, rerank) are then tuned to the cheapest that reach a target
recall@k on held-out store rows (`--target-recall`, tune_params), and saved in index.json.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
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
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_RECALL_K = 10
TUNE_QUERIES = 1000  # held-out store rows searched per setting (fewer on huge stores, see tune_query_count)
TUNE_PAIRS = 2 * 10**9  # queries x rows of the ground truth (one exact pass, done while the rows are added)
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
RERANK_LADDER = (0, 2, 5, 10, 20, 50, 100, 200)
PLATEAU = 0.002  # recall gained by one more ladder step below which the scan up that ladder stops


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

    return _rows_at(reader, np.sort(np.random.default_rng(seed).choice(len(reader), size=size, replace=False)))


def _rows_at(reader, picks):
    """Store rows ``picks`` (sorted) as float32, read shard by shard."""
    import numpy as np

    out = np.empty((len(picks), reader.dim), dtype=np.float32)  # filled in place: the sample is held once
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
                seed: int = 0, gpu: bool | None = None, rerank: int | None = None,
                target_recall: float | None = None, recall_k: int = DEFAULT_RECALL_K) -> dict:
    """Build (or keep) the store's index; returns its index.json record.

    An up-to-date index (same key, or ``auto``) is kept unless ``force``; new nprobe/ef_search values are
    saved without a rebuild. A stale one (the store's row count, dim or model changed) is rebuilt with
    ``index_key`` (``auto`` chooses afresh). Replacing a current index with another key needs ``force``.
    A new index's search parameters are tuned to reach ``target_recall`` (None: DEFAULT_TARGET_RECALL; 0:
    no tuning, the defaults) at recall@``recall_k`` on held-out store rows; given nprobe, ef_search and
    rerank stay fixed. An up-to-date index is tuned again when ``target_recall`` is given and differs.
    """
    import faiss
    import numpy as np

    from vlmtools.store import open_store

    reader = open_store(store)
    n, dim = len(reader), reader.dim
    if n == 0:
        raise BadInput(f"{store}: the store is empty; nothing to index")
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search), ("--rerank", rerank),
                        ("--recall-k", recall_k)):
        if value is not None and value < (0 if name == "--rerank" else 1):
            raise BadInput(f"{name} must be at least {0 if name == '--rerank' else 1}")
    if target_recall is not None and not 0 <= target_recall <= 1:
        raise BadInput(f"--target-recall must be between 0 and 1 (got {target_recall}; 0 turns tuning off)")
    key = choose_index_key(n, dim, max_memory) if index_key == "auto" else index_key.strip()
    faiss_path, info_path = index_paths(store)

    old = read_index_info(store)
    if old is not None and not force:
        stale = stale_reasons(old, reader)
        tuned = old.get("tuning") or {}
        if not stale and (index_key == "auto" or old.get("index_key") == key) and target_recall \
                and (tuned.get("target_recall"), tuned.get("k")) != (target_recall, recall_k):
            return _retune(reader, old, target_recall, recall_k, _fixed_params(old["index_key"], nprobe,
                                                                               ef_search, rerank), seed)
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

    target = DEFAULT_TARGET_RECALL if target_recall is None else target_recall
    # the held-out rows' exact neighbours are found while the rows pass by to be added (no second pass)
    probe = RecallProbe(reader, recall_k, seed) if target > 0 and key != "Flat" and n > recall_k + 1 else None
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
    # The held-out rows are added after tuning, so that they are measured as queries from outside the index
    # (a stored row left in an HNSW graph leads a search straight to its neighbours: measured on 200k x 512,
    # 0.953 for such rows against 0.928 for fresh queries). IVF indexes take explicit ids (= store rows);
    # others are wrapped in an IndexIDMap that maps their insertion order back to store rows.
    ids_later = probe is not None and (ivf_of(index) is not None or not on_gpu)
    if ids_later and ivf_of(index) is None:
        index = faiss.IndexIDMap(index)
    added = 0
    with progress(f"indexing {key}", total=n, unit="rows") as bar:
        for emb in reader.emb_shards():
            for start in range(0, emb.shape[0], ADD_CHUNK):
                chunk = np.ascontiguousarray(emb[start:start + ADD_CHUNK], dtype=np.float32)
                if ids_later:
                    ids = np.arange(added, added + chunk.shape[0], dtype=np.int64)
                    keep = ~np.isin(ids, probe.rows)
                    index.add_with_ids(chunk[keep], ids[keep])
                else:
                    index.add(chunk)
                if probe is not None:
                    probe.add(chunk, added)
                added += chunk.shape[0]
                bar.advance(chunk.shape[0])
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    tuned = None
    if probe is not None:
        tuned = tune_params(reader, index, key, probe, target, _fixed_params(key, nprobe, ef_search, rerank),
                            holds_rows=not ids_later)
        if ids_later:
            index.add_with_ids(probe.queries, probe.rows.astype(np.int64))
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
    if tuned is not None:
        record["params"], record["tuning"] = tuned
        report_tuning(record["tuning"], key)
    # index.json goes first and comes back last: an index.faiss without index.json is not an index.
    info_path.unlink(missing_ok=True)
    with formats.atomic_path(faiss_path) as tmp:
        faiss.write_index(index, str(tmp))
        record["faiss_bytes"], record["faiss_sha256"] = tmp.stat().st_size, formats.file_sha256(tmp)
    formats.write_json(info_path, record)
    info(f"{key} over {n} rows (dim {dim}) in {seconds:.1f} s -> {faiss_path}")
    return record


# ----------------------------------------------------------------------------- tuning for a target recall
# autofaiss tunes efSearch/nprobe for a query-time budget (the most recall within 10 ms per query); here the
# user names the recall, and the cheapest search parameters that reach it are measured on the store itself.

def tune_query_count(n: int) -> int:
    """Held-out queries for n rows: 1000, fewer from 2M rows on (at least 200), never more than n."""
    return min(n, max(200, min(TUNE_QUERIES, TUNE_PAIRS // max(n, 1))))


class RecallProbe:
    """Held-out queries for measuring recall@k on the store itself: a seeded sample of store rows, kept out
    of the index while it is measured (IVF: added only after tuning; HNSW: unlinked from the graph for the
    while, see held_out), each asked for its k nearest rows among the others. Their exact neighbours are
    accumulated chunk by chunk (``add``) while the rows are indexed, or in one pass (``fill``); held-out
    rows are dropped from the truth and from the answers alike."""

    def __init__(self, reader, k: int, seed: int):
        import numpy as np

        from vlmtools.search import RunningTopK

        n = len(reader)
        self.k = k
        self.rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=tune_query_count(n), replace=False))
        self.queries = _rows_at(reader, self.rows)
        # 2k + 1: the k nearest non-held-out rows are among them unless k + 1 held-out rows crowd in
        self.truth = RunningTopK(self.queries, 2 * k + 1)
        self.add = self.truth.add
        self.skip: set[int] = set()  # rows that cannot be held out (an HNSW graph's entry point)
        # where the held-out rows are in the index (a retune), they take answer slots that are then dropped:
        # the query itself, and about k * share of the others; three times that, to be safe (held_in)
        self.extra = 0
        self._extra = 1 + math.ceil(3 * k * len(self.rows) / n)

    def held_in(self, yes: bool) -> None:
        """Whether the index being measured holds the held-out rows: then searches fetch ``extra`` more hits
        and candidates (beside the k and rerank*k of a real search), for the held-out ones dropped."""
        self.extra = self._extra if yes else 0

    def fill(self, reader) -> None:
        import numpy as np

        from vlmtools.search import EXACT_CHUNK

        offset = 0
        with progress("exact search of the held-out rows", total=len(reader), unit="rows") as bar:
            for emb in reader.emb_shards():
                for start in range(0, emb.shape[0], EXACT_CHUNK):
                    self.add(np.ascontiguousarray(emb[start:start + EXACT_CHUNK], dtype=np.float32), offset + start)
                    bar.advance(min(EXACT_CHUNK, emb.shape[0] - start))
                offset += emb.shape[0]

    def recall(self, found) -> float:
        """Mean share of each query's k true neighbours among its first k answers (held-out rows and -1
        padding dropped from both)."""
        held = set(self.rows.tolist())
        hits = total = 0
        for own, truth, got in zip(self.rows.tolist(), self.truth.rows.tolist(), found.tolist()):
            if own in self.skip:
                continue
            truth = [r for r in truth if r not in held][:self.k]
            hits += len(set(truth) & set([r for r in got if r >= 0 and r not in held][:self.k]))
            total += len(truth)
        return hits / max(total, 1)

    def measure(self, reader, index, key: str, params: dict) -> tuple[float, float]:
        """(recall@k, queries/s) of searching the held-out rows with ``params`` as `vlmtools search` would."""
        from vlmtools.search import search_vectors

        started = time.perf_counter()
        _, found, _ = search_vectors(reader, self.queries, self.k, extra=self.extra,
                                     loaded=(index, {"index_key": key, "params": params}))
        seconds = time.perf_counter() - started
        return self.recall(found), len(self.rows) / max(seconds, 1e-9)


def ivf_of(index):
    """The IVF index inside ``index`` (behind OPQ/PCA transforms), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


@contextmanager
def held_out(index, probe: RecallProbe):
    """Tuning an HNSW index that holds the probe's rows (an up-to-date index tuned again): while the block
    runs, every link to them is dropped from the graph (each neighbour list keeps its order, the freed slots
    at its end), so that a search cannot reach them through their own links; restored after. This errs the
    other way (their neighbours lose a link each: measured on 20k x 64, 0.79-0.93 for efSearch 16-64
    against 0.84-0.95 for fresh queries), so a target reached this way holds for fresh queries. Indexes that
    do not hold the rows (a build adds them after tuning) and other kinds: as they are."""
    import faiss
    import numpy as np

    graph = _graph(index)
    if graph is None:
        yield
        return
    idmap, hnsw = graph
    labels = faiss.vector_to_array(idmap.id_map) if idmap is not None else None  # graph node -> store row
    nodes = probe.rows if labels is None else np.flatnonzero(np.isin(labels, probe.rows))
    original = faiss.vector_to_array(hnsw.neighbors)
    layers = faiss.vector_to_array(hnsw.levels).astype(np.int64)  # per node: its layers (level + 1)
    sizes = np.diff(faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64))
    first = np.cumsum(layers) - layers  # each node's first segment
    layer_of = np.arange(int(layers.sum())) - np.repeat(first, layers)
    segment = np.repeat(np.arange(len(layer_of), dtype=np.int32), sizes[layer_of])
    if len(segment) != len(original):
        raise RuntimeError("unexpected HNSW layout")  # a faiss whose graph this code does not know
    drop = (original < 0) | np.isin(original, nodes)
    order = np.lexsort((drop, segment))  # by segment, kept links first, each group in its own order
    links = original[order]
    links[drop[order]] = -1
    del segment, order, drop
    entry = int(hnsw.entry_point)  # the search starts there: it cannot be unlinked
    probe.skip = {entry if labels is None else int(labels[entry])}
    faiss.copy_array_to_vector(links, hnsw.neighbors)
    try:
        yield
    finally:
        faiss.copy_array_to_vector(original, hnsw.neighbors)
        probe.skip = set()


def _ladder(values, top: int) -> list[int]:
    return sorted({v for v in values if v <= top} | {top})


def tune_params(reader, index, key: str, probe: RecallProbe, target: float, fixed: dict,
                holds_rows: bool = True) -> tuple[dict, dict]:
    """The cheapest search parameters whose recall@k on the held-out rows reaches ``target``: (params, the
    tuning record saved in index.json). Recall grows with nprobe, efSearch and rerank, so each is searched
    for its least value that reaches the target; where two trade off (IVF-PQ: lists visited vs candidates
    reranked), the fastest of the settings that reach it wins. ``fixed``: parameters the user set (kept).
    ``holds_rows``: the index holds the held-out rows (see held_out), else they are added after."""
    import contextlib

    probe.held_in(holds_rows and _graph(index) is None)  # unlinked graph rows cannot be reached
    with held_out(index, probe) if holds_rows else contextlib.nullcontext():
        params, record = _tune_params(reader, index, key, probe, target, fixed)
    record["held_out"] = "added after tuning" if not holds_rows else (
        "unlinked from the graph" if _graph(index) is not None else "in the index, dropped from answers")
    return params, record


def _graph(index):
    """(the IndexIDMap or None, the HNSW graph) of an HNSW index (bare or in an IndexIDMap), else None."""
    import faiss

    if ivf_of(index) is not None:
        return None
    outer = faiss.downcast_index(index)
    idmap = outer if isinstance(outer, faiss.IndexIDMap) else None
    hnsw = getattr(faiss.downcast_index(idmap.index) if idmap is not None else outer, "hnsw", None)
    return None if hnsw is None else (idmap, hnsw)


def _tune_params(reader, index, key: str, probe: RecallProbe, target: float, fixed: dict) -> tuple[dict, dict]:
    started = time.perf_counter()
    tried: list[dict] = []

    def measure(params: dict) -> tuple[float, float]:
        recall, qps = probe.measure(reader, index, key, params)
        tried.append({**params, "recall": round(recall, 4), "qps": round(qps, 1)})
        return recall, qps

    def least(values, params_for):
        """The least value reaching the target, or None. Recall grows with the value, and so does the cost,
        about in step with the ladders' steps (x1.5 to x2), so a scan upwards costs 2 to 3 times the answer.
        It stops early when a step adds less than PLATEAU (more of this parameter cannot reach the target:
        what the scan would pay most for)."""
        previous = None
        for value in values:
            recall = measure(params_for(value))[0]
            if recall >= target:
                return value
            if previous is not None and recall - previous < PLATEAU:
                return None
            previous = recall
        return None

    ivf = re.search(r"IVF(\d+)", key)
    pq = has_pq_codes(key)
    reranks = [fixed["rerank"]] if "rerank" in fixed else list(RERANK_LADDER if pq else (0,))
    chosen = None
    if ivf:
        nlist = int(ivf.group(1))
        probes = [fixed["nprobe"]] if "nprobe" in fixed else _ladder([2 ** i for i in range(20)], nlist)

        def params_for(rerank):
            def make(nprobe):
                params = {"nprobe": nprobe, "rerank": rerank}
                if "_HNSW" in key:
                    params["quantizer_efSearch"] = fixed.get("quantizer_efSearch") or max(DEFAULT_EF_SEARCH, 2 * nprobe)
                return params
            return make

        finalists = []
        for rerank in reranks:
            nprobe = least(probes, params_for(rerank))
            if nprobe is not None:
                finalists.append(params_for(rerank)(nprobe))
                probes = [p for p in probes if p <= nprobe]  # more reranking needs no more lists
                if len(finalists) == 2:  # a further rerank step rarely pays: its candidates cost more
                    break
        if len(finalists) > 1:
            for params in finalists:
                measure(params)  # timed again: each counts its faster timing
        if finalists:
            chosen = max(finalists, key=lambda p: max(t["qps"] for t in tried if _same(t, p)))
    elif "HNSW" in key:
        efs = [fixed["efSearch"]] if "efSearch" in fixed else list(EF_LADDER)
        ef = least(efs, lambda ef: {"efSearch": ef, "rerank": reranks[0]})
        chosen = {"efSearch": ef, "rerank": reranks[0]} if ef is not None else None
    else:  # Flat, or codes without lists (PQ32, SQ8): only reranking to choose
        rerank = least(reranks, lambda r: {"rerank": r})
        chosen = {"rerank": rerank} if rerank is not None else None
    reached = chosen is not None
    if not reached:  # the most accurate setting tried, the faster of equals
        best = max(tried, key=lambda t: (t["recall"], t["qps"]))
        chosen = {k: v for k, v in best.items() if k not in ("recall", "qps")}
    final = [t for t in tried if _same(t, chosen)]
    if not pq and "rerank" not in fixed:  # exact distances: nothing to rerank, nothing to save
        chosen = {k: v for k, v in chosen.items() if k != "rerank"}
    record = {"target_recall": target, "k": probe.k, "queries": len(probe.rows), "reached": reached,
              "params": chosen, "recall": final[-1]["recall"], "qps": max(t["qps"] for t in final),
              "seconds": round(time.perf_counter() - started, 1), "tried": tried}
    return chosen, record


def _same(tried: dict, params: dict) -> bool:
    return all(tried.get(k) == v for k, v in params.items())


def report_tuning(record: dict, key: str) -> None:
    shown = ", ".join(f"{k} {v}" for k, v in record["params"].items())
    line = (f"recall@{record['k']} {record['recall']:.3f} at {record['qps']:,.0f} queries/s with {shown} "
            f"({record['queries']} held-out store rows, {len(record['tried'])} setting(s) measured in "
            f"{record['seconds']:.1f} s)")
    if record["reached"]:
        info(f"tuned {key} for recall@{record['k']} >= {record['target_recall']}: {line}")
    else:
        warn(f"{key} does not reach recall@{record['k']} {record['target_recall']} within the settings tried; "
             f"kept the most accurate: {line}. A larger index (--index-key, --max-memory) or a larger --rerank "
             f"reaches more")


def _fixed_params(key: str, nprobe: int | None, ef_search: int | None, rerank: int | None) -> dict:
    """The search parameters the user set, under their index.json names (tuning keeps them)."""
    fixed: dict = {} if rerank is None else {"rerank": rerank}
    if nprobe and "IVF" in key:
        fixed["nprobe"] = nprobe
    if ef_search and "HNSW" in key:
        fixed["quantizer_efSearch" if "IVF" in key else "efSearch"] = ef_search
    return fixed


def _retune(reader, record: dict, target: float, k: int, fixed: dict, seed: int) -> dict:
    """Tune an up-to-date index for another target (one exact pass over the store for the truth)."""
    key = record["index_key"]
    loaded = load_index(reader)
    if loaded is None:
        raise BadInput(f"{reader.path}: cannot load its index to tune it; rebuild it with --force")
    probe = RecallProbe(reader, k, seed)
    probe.fill(reader)
    params, tuning = tune_params(reader, loaded[0], key, probe, target, fixed)
    record = {**record, "params": params, "tuning": tuning}
    formats.write_json(index_paths(reader.path)[1], record)
    report_tuning(tuning, key)
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
