"""Nearest neighbours in a store for text, image or stored queries: through the store's FAISS index when
it has a usable one, else exactly (a matrix product over the shards). Used by `vlmtools search`.

Scores are inner products of L2-normalized vectors (cosine similarity); hits are ranked best first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlmtools.errors import BadInput

EXACT_CHUNK = 65_536  # store rows scored at a time in exact search
RERANK_BLOCK_BYTES = 64 * 2**20  # candidate vectors gathered at a time (float32): 327 queries x 100 x 512


# ----------------------------------------------------------------------------- vector search

def _merge_topk(scores, rows, k: int):
    """Keep the k best columns per query row, sorted by score (then row, so ties are deterministic)."""
    import numpy as np

    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


class RunningTopK:
    """Exact top-k by inner product of fixed queries over rows that arrive chunk by chunk (exact search, and
    the ground truth `vlmtools index` measures recall against while it adds the same chunks). Each chunk
    goes through faiss' blocked brute-force kNN (a GEMM plus a heap per query, no (Q x chunk) score matrix
    to sort); the per-chunk winners are merged."""

    def __init__(self, queries, k: int):
        import numpy as np

        self.queries, self.k = np.ascontiguousarray(queries, dtype=np.float32), k
        self.scores = np.zeros((len(queries), 0), dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, chunk, first_row: int) -> None:
        """``chunk``: float32 rows first_row, first_row + 1, ... of the store."""
        import faiss
        import numpy as np

        scores, rows = faiss.knn(self.queries, chunk, min(self.k, chunk.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        self.scores, self.rows = _merge_topk(np.concatenate([self.scores, scores], 1),
                                             np.concatenate([self.rows, rows.astype(np.int64) + first_row], 1), self.k)


def exact_search(reader, queries, k: int):
    """Brute-force top-k by inner product over every store row: (scores, rows), each (Q, min(k, N))."""
    import numpy as np

    top = RunningTopK(queries, k)
    offset = 0
    for emb in reader.emb_shards():
        for start in range(0, emb.shape[0], EXACT_CHUNK):
            top.add(np.ascontiguousarray(emb[start:start + EXACT_CHUNK], dtype=np.float32), offset + start)
        offset += emb.shape[0]
    return top.scores, top.rows


def rerank_exact(reader, queries, rows, k: int):
    """Rescore candidate ``rows`` (Q, C) exactly against the memory-mapped store rows; keep the best k.
    Only the candidates' vectors are read (sorted, a few pages per row; NaN/inf checked on those rows),
    so this works on stores beyond memory. Queries go in blocks of about RERANK_BLOCK_BYTES of gathered
    float32 vectors (queries x candidates x dim), whatever k and the rerank factor are."""
    import numpy as np

    view = reader.row_view(check="rows")
    scores = np.empty(rows.shape, dtype=np.float32)
    step = max(1, RERANK_BLOCK_BYTES // max(1, rows.shape[1] * reader.dim * 4))
    for a in range(0, len(rows), step):
        block = rows[a:a + step]
        vectors = view.take(np.maximum(block, 0).ravel()).reshape(*block.shape, -1)
        scores[a:a + step] = np.matmul(vectors, queries[a:a + step, :, None])[..., 0]
    scores[rows < 0] = -np.inf
    best_s, best_r = _merge_topk(scores, rows, k)
    best_r = np.where(np.isfinite(best_s), best_r, -1)
    return best_s, best_r


def check_search_params(nprobe: int | None, rerank: int | None) -> None:
    for name, value, low in (("--nprobe", nprobe, 1), ("--rerank", rerank, 0)):
        if value is not None and value < low:
            raise BadInput(f"{name} must be at least {low} (got {value})")


def search_vectors(reader, queries, k: int, exact: bool = False, rows=None, loaded=False,
                   nprobe: int | None = None, rerank: int | None = None, extra: int = 0):
    """Top-k store rows for each query vector: (scores, rows, method), method "exact" or the index key.
    ``rows``: search only these store rows (exactly). ``loaded``: an index already loaded by the caller
    (a (index, record) pair, or None for none); by default the store's index is loaded here.
    Rows missing from an approximate result (faiss pads with -1) are dropped by the caller. ``nprobe`` and
    ``rerank`` override the index's saved search parameters: rerank R fetches R*k candidates from the index
    and rescores them exactly from the store (what makes compressed (PQ) indexes accurate). ``extra``: as
    many more hits (and candidates) beside a k-search's own, for a caller that drops some (index tuning
    drops its held-out rows)."""
    import numpy as np

    from vlmtools.index import apply_params, default_rerank, load_index

    if k < 1:
        raise BadInput(f"-k must be at least 1 (got {k})")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != reader.dim:
        raise BadInput(f"query vectors have dim {queries.shape[-1]}, the store {reader.path} has {reader.dim}")
    if rows is not None:  # a subset (--where): exact over its rows, mapped back to store rows
        rows = np.asarray(rows, dtype=np.int64)
        k = min(k, len(rows))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), "exact"
        scores = queries @ np.asarray(reader.embeddings[rows], dtype=np.float32).T
        best_s, best_r = _merge_topk(scores, np.broadcast_to(rows, scores.shape), k)
        return best_s, best_r, "exact"
    k = min(k, len(reader))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), "exact"
    if loaded is False:
        loaded = None if exact else load_index(reader)
    if loaded is None or exact:
        return (*exact_search(reader, queries, k), "exact")
    index, record = loaded
    params = dict(record.get("params", {}))
    if nprobe is not None:
        if "nprobe" not in params:
            raise BadInput(f"--nprobe applies to IVF indexes; {reader.path} has {record['index_key']}")
        params["nprobe"] = nprobe
    if rerank is not None:
        params["rerank"] = rerank
    factor = int(params.pop("rerank", default_rerank(record["index_key"])) or 0)
    candidates = min(len(reader), (k * factor if factor > 1 else k) + extra)
    apply_params(index, params, candidates)
    scores, rows = index.search(queries, candidates)
    rows = rows.astype(np.int64)
    method = record["index_key"]
    if factor >= 1:
        scores, rows = rerank_exact(reader, queries, rows, min(k + extra, candidates))
        method += f", reranked {candidates}"
    return scores, rows, method


# ----------------------------------------------------------------------------- queries

def query_spec(reader, model: str | None = None, pretrained: str | None = None):
    """The model that encodes queries: the store's own unless the user names one, which must match it."""
    from vlmtools.errors import StoreMismatch
    from vlmtools.models import spec_for_store

    try:
        return spec_for_store(reader.info["model"], model, pretrained)
    except StoreMismatch as exc:
        raise StoreMismatch(f"{reader.path}: {exc}") from None


def _load_images(paths: Sequence[str]):
    from vlmtools.images import read_image

    return [read_image(path, "--image") for path in paths]


def read_query_lines(path: str, what: str = "--text-file") -> list[str]:
    """Queries one per line from a file or ``-`` (stdin); blank lines are skipped."""
    from vlmtools.formats import read_text, source_name

    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise BadInput(f"{what} {source_name(path)}: no queries in it")
    return lines


class Searcher:
    """One store, its index and its query model, loaded once and used for many queries (`search` with
    several queries, and `vlmtools serve`)."""

    def __init__(self, store, model: str | None = None, pretrained: str | None = None, device: str = "auto",
                 exact: bool = False, precision: str = "amp", nprobe: int | None = None,
                 rerank: int | None = None):
        from vlmtools.index import load_index
        from vlmtools.store import open_store

        self.reader = open_store(store)
        self.spec = query_spec(self.reader, model, pretrained)
        self.device, self.precision = device, precision
        self.exact = exact
        check_search_params(nprobe, rerank)
        self.nprobe, self.rerank = nprobe, rerank
        self._loaded = None if exact else load_index(self.reader)
        self._encoder = None
        self._ids = None

    @property
    def method(self) -> str:
        return "exact" if self._loaded is None else self._loaded[1]["index_key"]

    def encoder(self):
        if self._encoder is None:
            from vlmtools.models import load_model

            self._encoder = load_model(self.spec, self.device, self.precision)
        return self._encoder

    def row_of(self, row_id: str) -> int:
        if self._ids is None:
            self._ids = {str(m.get("id", i)): i for i, m in enumerate(self.reader.meta)}
        if str(row_id) not in self._ids:
            raise BadInput(f"--id {row_id}: no row of {self.reader.path} has this id")
        return self._ids[str(row_id)]

    def vectors(self, texts: Sequence[str] = (), images: Sequence = (), ids: Sequence[str] = ()):
        """Query vectors (Q, dim) and their names: texts, image paths (or PIL images), stored row ids.
        The model is loaded (once) only for texts and images."""
        import numpy as np

        if any(not t.strip() for t in texts):
            raise BadInput("--text: empty query text")
        pil_images = _load_images([p for p in images if isinstance(p, (str, Path))])
        pil_images += [p for p in images if not isinstance(p, (str, Path))]
        rows = [self.row_of(i) for i in ids]  # check every id before loading a model
        vectors, names = [], []
        if texts:
            vectors.append(self.encoder().encode_texts(list(texts)))
            names += list(texts)
        if pil_images:
            import torch

            enc = self.encoder()
            batch = torch.stack([enc.preprocess(img) for img in pil_images])
            vectors.append(enc.encode_image_tensor(batch).numpy().astype(np.float32))
            names += [str(p) if isinstance(p, (str, Path)) else f"image {i + 1}" for i, p in enumerate(images)]
        if rows:
            vectors.append(np.asarray(self.reader.embeddings[np.asarray(rows)], dtype=np.float32))
            names += [str(i) for i in ids]
        if not vectors:
            return np.zeros((0, self.reader.dim), np.float32), []
        return np.concatenate(vectors).astype(np.float32), names

    def search(self, vectors, names: Sequence[str], k: int = 10, where: Sequence[str] = ()) -> list[dict]:
        from vlmtools.store import parse_where, select_rows

        rows = None
        if where:
            rows = select_rows(self.reader.meta, parse_where(where))
            if not rows:
                raise BadInput(f"--where {' '.join(where)}: no row of {self.reader.path} matches")
        scores, hit_rows, _ = search_vectors(self.reader, vectors, k, rows=rows, loaded=self._loaded,
                                             nprobe=self.nprobe, rerank=self.rerank)
        return hit_records(self.reader, scores, hit_rows, names)


def store_queries(query_store: str, spec):
    """Every row of another store (same model) as a query: (vectors, row ids)."""
    from vlmtools.store import open_store

    queries = open_store(query_store, spec=spec)
    if len(queries) == 0:
        raise BadInput(f"--store {query_store}: the query store is empty")
    return queries.embeddings, [str(m.get("id", i)) for i, m in enumerate(queries.meta)]


# ----------------------------------------------------------------------------- results

def hit_records(reader, scores, rows, names: Sequence[str]) -> list[dict]:
    """One record per (query, hit): {"query"? , "rank", "score", **the hit row's metadata}. The query
    field is present only when there are several queries."""
    meta = reader.meta
    several = len(names) > 1
    out = []
    for qi, name in enumerate(names):
        rank = 0
        for score, row in zip(scores[qi], rows[qi]):
            if row < 0:  # faiss pads short result lists with -1
                continue
            rank += 1
            head = {"query": name} if several else {}
            # a cosine, computed in float32 from the stored rows; a float16 row's norm is 1 only to about 1e-3,
            # so a self-match can come out a hair above 1 (1.000116): clipped to [-1, 1]
            head.update(rank=rank, score=round(min(1.0, max(-1.0, float(score))), 6))
            out.append({**head, **{k: v for k, v in meta[row].items() if k not in head}})
    return out


def search(store: str | Path, texts: Sequence[str] = (), images: Sequence[str] = (),
           query_store: str | None = None, k: int = 10, model: str | None = None, pretrained: str | None = None,
           device: str = "auto", exact: bool = False, ids: Sequence[str] = (), where: Sequence[str] = (),
           precision: str = "amp", nprobe: int | None = None, rerank: int | None = None) -> list[dict]:
    """Search a store: encode the queries with its model (loaded once for all of them), find the k nearest
    rows for each (among the rows matching ``where``), return hits."""
    import numpy as np

    from vlmtools.console import info

    if k < 1:
        raise BadInput(f"-k must be at least 1 (got {k})")
    if not (texts or images or query_store or ids):
        raise BadInput("no query: give --text TEXT (or - for lines on stdin), --text-file FILE, --image PATH, "
                       "--id ID or --store QUERY_STORE")
    check_search_params(nprobe, rerank)
    searcher = Searcher(store, model, pretrained, device, exact=exact, precision=precision, nprobe=nprobe,
                        rerank=rerank)
    vectors, names = searcher.vectors(texts, images, ids)
    if query_store:
        more, more_names = store_queries(query_store, searcher.spec)
        vectors, names = np.concatenate([vectors, np.asarray(more, np.float32)]), names + more_names
    hits = searcher.search(vectors, names, k, where)
    n = len(searcher.reader)
    info(f"{len(names)} quer{'y' if len(names) == 1 else 'ies'}, top {min(k, n)} of {n} rows "
         f"({'exact' if where else searcher.method})")
    return hits
