"""Benchmark: an IVF-PQ index over a large store against exact search (recall@10, queries/s, build time,
peak memory of the build).

Builds a synthetic store of N x DIM clustered unit vectors (a mixture of C Gaussian clusters: nearest
neighbours have structure, as real embeddings do; uniform random vectors have none), writes it shard by
shard (memory stays at one shard), builds the index in a child process (so that its peak RSS is the
build's own) with `vlmtools.index.build_index`, then searches held-out queries exactly and through the
index at several nprobe values, with and without exact reranking from the store.

    python benchmarks/bench_index.py --n 1000000 --dim 512 --max-memory 4G          # the auto key
    python benchmarks/bench_index.py --n 100000 --store /tmp/s100k            # keeps the store for reruns

The build tunes the search parameters for --target-recall (vlmtools' default 0.95); "tuned" is that
setting searched with fresh queries (not store rows), beside what the build measured on its held-out rows.

--peer autofaiss builds the same store with autofaiss (which picks its key by memory and tunes nprobe or
efSearch for the most recall within 10 ms per query), --runs builds of each, interleaved, each in a child
process (wall time, peak RSS), then searches both indexes with the same fresh queries, interleaved, and
prints recall@10 and queries/s of each and the ratios. autofaiss pins numpy < 2, so it may live in another
environment: --peer-python names its interpreter (default: this one).

    python benchmarks/bench_index.py --n 200000 --peer autofaiss --peer-python /tmp/afvenv/bin/python
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
                            "--max-memory", args.max_memory, "--target-recall", str(args.target_recall)],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


# autofaiss as its README runs it on one machine (the store's directory of .npy shards is its numpy input)
AUTOFAISS = r"""
import json, os, resource, sys, time
from autofaiss import build_index
store, out, max_memory = sys.argv[1:4]
t = time.perf_counter()
_, infos = build_index(embeddings=store, index_path=out + "/knn.index", index_infos_path=out + "/infos.json",
                       max_index_memory_usage=max_memory, current_memory_available="8G", metric_type="ip",
                       verbose=30)
infos = json.load(open(out + "/infos.json"))
print(json.dumps({"build_s": time.perf_counter() - t, "index_key": infos["index_key"],
                  "index_param": infos["index_param"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peer_autofaiss(store: Path, args, queries, truth) -> dict:
    """Builds of ours and autofaiss', interleaved; then both indexes searched with the same queries."""
    import statistics

    import faiss
    import numpy as np

    from vlmtools.search import search_vectors
    from vlmtools.store import open_store

    ours_b, peer_b = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.runs):
            ours_b.append(build_in_child(store, args))
            child = subprocess.run([args.peer_python, "-c", AUTOFAISS, str(store), out, args.max_memory],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"autofaiss failed:\n{child.stderr[-3000:]}")
            peer_b.append(json.loads(child.stdout.strip().splitlines()[-1]))
        peer_index = faiss.read_index(out + "/knn.index")
    faiss.ParameterSpace().set_index_parameters(peer_index, peer_b[-1]["index_param"])
    reader = open_store(store)
    k = 10

    def recall(found):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist())]))

    def ours():
        return search_vectors(reader, queries, k)[1]

    def peer():
        return peer_index.search(queries, k)[1]

    ours(), peer()  # warm: index load, pages
    ours_t, peer_t = [], []
    for _ in range(args.search_runs):  # interleaved
        for fn, times in ((ours, ours_t), (peer, peer_t)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ours_found, peer_found = ours(), peer()
    q = len(queries)
    ours_qps, peer_qps = [q / t for t in ours_t], [q / t for t in peer_t]
    tuning = ours_b[-1].get("tuning") or {}
    return {
        "ours": {"index_key": ours_b[-1]["index_key"], "params": ours_b[-1]["params"],
                 "build_s": [round(b["build_seconds"], 1) for b in ours_b],
                 "peak_rss_mib": max(round(b["peak_rss_mib"]) for b in ours_b),
                 "tuned_recall_held_out_rows": tuning.get("recall"), "tuning_s": tuning.get("seconds"),
                 "recall_at_10": round(recall(ours_found), 4),
                 "qps": [round(x) for x in ours_qps]},
        "autofaiss": {"index_key": peer_b[-1]["index_key"], "index_param": peer_b[-1]["index_param"],
                      "build_s": [round(b["build_s"], 1) for b in peer_b],
                      "peak_rss_mib": max(round(b["peak_rss_mib"]) for b in peer_b),
                      "recall_at_10": round(recall(peer_found), 4), "qps": [round(x) for x in peer_qps]},
        "build_ratio_min_median": [round(min(b["build_seconds"] for b in ours_b) / min(b["build_s"] for b in peer_b), 2),
                                   round(statistics.median(b["build_seconds"] for b in ours_b)
                                         / statistics.median(b["build_s"] for b in peer_b), 2)],
        "qps_ratio_max_median": [round(max(ours_qps) / max(peer_qps), 2),
                                 round(statistics.median(ours_qps) / statistics.median(peer_qps), 2)],
    }


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
    parser.add_argument("--target-recall", type=float, default=0.95, help="the build's --target-recall (0: no tuning)")
    parser.add_argument("--peer", choices=["autofaiss"], help="compare with autofaiss (builds and searches)")
    parser.add_argument("--peer-python", default=sys.executable, help="--peer: the interpreter that has autofaiss")
    parser.add_argument("--runs", type=int, default=2, help="--peer: builds of each, interleaved")
    parser.add_argument("--search-runs", type=int, default=5, help="--peer: timed searches of each, interleaved")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from vlmtools.console import set_quiet

    set_quiet(True)
    if args.build_only:  # child process: build and report its own peak RSS
        from vlmtools.index import build_index

        rec = build_index(args.store, index_key=args.key, max_memory=args.max_memory, force=True,
                          target_recall=args.target_recall)
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

    if args.peer:
        from vlmtools.search import exact_search
        from vlmtools.store import open_store

        centers = np.random.default_rng(0).standard_normal((args.clusters, args.dim)).astype(np.float32)
        queries = sample(np.random.default_rng(1), centers, args.queries)
        _, truth = exact_search(open_store(store), queries, 10)
        result.update(peer_autofaiss(store, args, queries, truth))
        print(json.dumps(result))
        o, a = result["ours"], result["autofaiss"]
        print(f"{args.n} x {args.dim}, {args.clusters} clusters: vlmtools {o['index_key']} {o['params']} built in "
              f"{min(o['build_s'])}-{max(o['build_s'])} s (peak {o['peak_rss_mib']} MiB), recall@10 {o['recall_at_10']} "
              f"(held-out rows at build: {o['tuned_recall_held_out_rows']}), {max(o['qps']):,} queries/s; autofaiss "
              f"{a['index_key']} {a['index_param']} built in {min(a['build_s'])}-{max(a['build_s'])} s (peak "
              f"{a['peak_rss_mib']} MiB), recall@10 {a['recall_at_10']}, {max(a['qps']):,} queries/s; build ratio "
              f"{result['build_ratio_min_median']} (min, median), queries/s ratio {result['qps_ratio_max_median']} "
              f"(best, median)")
        if tmp is not None:
            tmp.cleanup()
        return
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
    search_vectors(reader, queries[:10], 10)  # warm
    t = time.perf_counter()
    _, found, _ = search_vectors(reader, queries, 10)  # the saved (tuned) parameters, as `vlmtools search`
    s = time.perf_counter() - t
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())])
    result["tuned"] = {"params": build["params"], "recall_at_10": round(float(recall), 4),
                       "held_out_rows_recall": (build.get("tuning") or {}).get("recall"),
                       "tuning_s": (build.get("tuning") or {}).get("seconds"),
                       "qps": round(args.queries / s, 1), "speedup_vs_exact": round(args.queries / s / result["exact_qps"], 1)}
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
