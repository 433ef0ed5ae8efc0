"""Benchmark: an IVF-PQ index over a large store against exact search (recall@10, queries/s, build time,
peak memory of the build).

Builds a synthetic store of N x DIM clustered unit vectors (a mixture of C Gaussian clusters: nearest
neighbours have structure, as real embeddings do; uniform random vectors have none), writes it shard by
shard (memory stays at one shard), builds the index in a child process (so that its peak RSS is the
build's own) with `vlmtools.index.build_index`, then searches held-out queries exactly and through the
index at several nprobe values, with and without exact reranking from the store.

    python benchmarks/bench_index.py --n 1000000 --dim 512 --max-memory 4G          # the auto key
    python benchmarks/bench_index.py --n 100000 --store /tmp/s100k            # keeps the store for reruns
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_store(path: Path, n: int, dim: int, clusters: int, shard: int, seed: int = 0) -> None:
    import numpy as np

    from vlmtools.store import StoreWriter

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    writer = StoreWriter(path, kind="image", model={"name": "synthetic", "pretrained": None}, dim=dim,
                         dtype="float16", shard_size=shard)
    for k, start in enumerate(range(0, n, shard)):
        rows = min(shard, n - start)
        x = sample(rng, centers, rows)
        writer.write_shard(k, x, [{"id": str(i)} for i in range(start, start + rows)])
    writer.finalize()


def sample(rng, centers, rows: int):
    """Points around random cluster centres, noise ~ the centre's norm: cos(point, centre) ~ 0.7."""
    import numpy as np

    dim = centers.shape[1]
    x = centers[rng.integers(0, len(centers), rows)] + rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_in_child(store: Path, args) -> dict:
    """Build the index in a child process, so that its peak RSS is the build's own."""
    child = subprocess.run([sys.executable, __file__, "--build-only", "--store", str(store), "--key", args.key,
                            "--max-memory", args.max_memory], capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--key", default="auto", help="faiss factory key (default: vlmtools' auto choice)")
    parser.add_argument("--max-memory", default="4G")
    parser.add_argument("--nprobe", default="8,16,32,64", help="nprobe values to try (default list)")
    parser.add_argument("--rerank", default="0,10", help="exact reranking factors to try (0 = off; 10 is the PQ default)")
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--store", help="store directory to create or reuse (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--reuse-index", action="store_true", help="search the store's existing index (no build)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from vlmtools.console import set_quiet

    set_quiet(True)
    if args.build_only:  # child process: build and report its own peak RSS
        from vlmtools.index import build_index

        rec = build_index(args.store, index_key=args.key, max_memory=args.max_memory, force=True)
        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(rec))
        return

    import numpy as np

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory()
        args.store = str(Path(tmp.name) / "store")
    store = Path(args.store)
    result: dict = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries,
                    "cpus": len(os.sched_getaffinity(0)), "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    if not (store / "info.json").exists():
        t = time.perf_counter()
        make_store(store, args.n, args.dim, args.clusters, args.shard_size)
        result["store_write_s"] = round(time.perf_counter() - t, 1)

    if args.reuse_index and (store / "index.json").exists():
        build = json.loads((store / "index.json").read_text())
        build["peak_rss_mib"] = None
    else:
        build = build_in_child(store, args)
    result.update(index_key=build["index_key"], train_size=build["train_size"], build_s=build["build_seconds"],
                  build_peak_rss_mib=build["peak_rss_mib"] and round(build["peak_rss_mib"]),
                  index_file_mib=round((store / "index.faiss").stat().st_size / 2**20, 1))

    from vlmtools.search import exact_search, search_vectors
    from vlmtools.store import open_store

    reader = open_store(store)
    rng = np.random.default_rng(1)  # the same centres as the store, fresh points
    centers = np.random.default_rng(0).standard_normal((args.clusters, args.dim)).astype(np.float32)
    queries = sample(rng, centers, args.queries)
    t = time.perf_counter()
    _, truth = exact_search(reader, queries, 10)
    exact_s = time.perf_counter() - t
    result["exact_qps"] = round(args.queries / exact_s, 1)
    rows = []
    for rerank in [int(r) for r in args.rerank.split(",")]:
        for nprobe in [int(p) for p in args.nprobe.split(",")]:
            search_vectors(reader, queries[:10], 10, nprobe=nprobe, rerank=rerank)  # warm (index load, pages)
            t = time.perf_counter()
            _, found, _ = search_vectors(reader, queries, 10, nprobe=nprobe, rerank=rerank)
            s = time.perf_counter() - t
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())])
            qps = args.queries / s
            rows.append({"nprobe": nprobe, "rerank": rerank, "recall_at_10": round(float(recall), 4),
                         "qps": round(qps, 1), "speedup_vs_exact": round(qps / result["exact_qps"], 1)})
    result["search"] = rows
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
