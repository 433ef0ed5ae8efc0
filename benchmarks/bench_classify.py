"""Benchmark: classify scoring on CUB's scale, once text embeddings exist.

CUB-200-2011's test split is 5,794 images and 200 classes; CBD descriptors average about 7 per class.
Random unit vectors stand in for the embeddings (scoring cost does not depend on their values). Reports
the median of --repeat runs of:
  score     image x descriptor products and the per-class aggregation (cbd) / image x class (clip)
  topk      top-k classes per image
  explain   the predicted class's descriptors ranked per image (vectorised gather + sort)
  records   all of the above plus building the JSON records and serializing them (what classify writes)
  command   `classify_store` end to end on stores written to disk (read stores, text store lookup,
            score, write predictions to /dev/null), model never loaded

    python benchmarks/bench_classify.py                  # d=512 (ViT-B-32/16) and d=768 (ViT-L-14)
    python benchmarks/bench_classify.py --images 5794 --classes 200 --per-class 7 --dim 512

--scale N runs `classify_store` (cbd, text store, predictions to /dev/null) over an N-image store written
shard by shard, in a child process, and reports its seconds and peak RSS: what bounds memory is that image
rows are scored chunk by chunk from the memory-mapped shards.

    python benchmarks/bench_classify.py --scale 200000 --classes 1000 --dim 512

--peer numpy runs the whole `vlmtools classify` command from stores on disk (a fresh process, as a user
runs it: image store + text store, default options) against a numpy script that loads the same shards,
multiplies and takes the argmax, interleaved, --runs times; it prints the wall time and peak RSS of each
process, the ratios (of the minima and of the medians), top-1 and whether the predictions are identical.

    python benchmarks/bench_classify.py --peer numpy --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit(rng, n, d):
    import numpy as np

    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench(n_images: int, n_classes: int, per_class: int, dim: int, k: int, repeat: int) -> dict:
    import numpy as np

    from vlmtools import classify as C
    from vlmtools.formats import PredictionLines

    rng = np.random.default_rng(0)
    counts = rng.integers(max(1, per_class - 2), per_class + 3, size=n_classes)  # 5..9 around 7
    classes = [f"class {i:03d}" for i in range(n_classes)]
    records = {c: {"class": c, "descriptors": [f"trait {j} of {c}" for j in range(n)]}
               for c, n in zip(classes, counts)}
    dset = C.build_descriptor_set(classes, records)
    images = unit(rng, n_images, dim)
    meta = [{"id": str(i), "path": f"/data/{i}.jpg", "label": classes[i % n_classes]} for i in range(n_images)]
    cbd = C.Classifier(classes, "cbd", dset=dset, desc_emb=unit(rng, len(dset.texts), dim))
    clip = C.Classifier(classes, "clip", class_emb=unit(rng, n_classes, dim))
    lines = PredictionLines({"image": None, "text": None}, {"method": "cbd", "model": "m", "store": "s"})

    def written(clf):  # what classify_store writes per image
        return [lines.line(*row) for row in clf.predict(images, meta, k=k)]

    scores, sims = cbd.score(images)
    pred = C.top_k(scores, k)[0][:, 0]
    out = {
        "images": n_images, "classes": n_classes, "descriptors": len(dset.texts), "dim": dim,
        "cbd_score_s": timed(lambda: cbd.score(images), repeat),
        "cbd_topk_s": timed(lambda: C.top_k(scores, k), repeat),
        "cbd_explain_s": timed(lambda: C.rank_descriptors(sims, dset.offsets, pred), repeat),
        "cbd_records_s": timed(lambda: written(cbd), repeat),
        "clip_score_s": timed(lambda: clip.score(images), repeat),
        "clip_records_s": timed(lambda: written(clip), repeat),
    }

    from vlmtools.store import write_arrays

    with tempfile.TemporaryDirectory() as tmp:
        model = {"name": "bench-model", "pretrained": "none"}
        write_arrays(f"{tmp}/images", images, meta, kind="image", model=model, dtype="float16")
        class_of = np.repeat(np.arange(n_classes), dset.counts)
        rows = [{"id": str(i), "text": t, "class": classes[class_of[i]], "descriptor": d, "kind": "object", "wrap": "cbd"}
                for i, (t, d) in enumerate(zip(dset.texts, dset.descriptors))]
        write_arrays(f"{tmp}/text", cbd.desc_emb, rows, kind="text", model=model, dtype="float16",
                     extra_info={"source": "descriptors", "wrap": "cbd"})
        out["cbd_command_s"] = timed(lambda: C.classify_store(f"{tmp}/images", os.devnull, text_store=f"{tmp}/text",
                                                              k=k, use_cache=False), max(1, repeat // 2))
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}


def write_scale_stores(tmp: str, n_images: int, n_classes: int, per_class: int, dim: int) -> None:
    import numpy as np

    from vlmtools import classify as C
    from vlmtools.store import StoreWriter, write_arrays

    rng = np.random.default_rng(0)
    classes = [f"class {i:04d}" for i in range(n_classes)]
    records = {c: {"class": c, "descriptors": [f"trait {j} of {c}" for j in range(per_class)]} for c in classes}
    dset = C.build_descriptor_set(classes, records)
    model = {"name": "bench-model", "pretrained": "none"}
    shard = 50_000
    writer = StoreWriter(f"{tmp}/images", kind="image", model=model, dim=dim, dtype="float16", shard_size=shard)
    for k, start in enumerate(range(0, n_images, shard)):
        n = min(shard, n_images - start)
        meta = [{"id": str(i), "path": f"/data/{i}.jpg", "label": classes[i % n_classes]} for i in range(start, start + n)]
        writer.write_shard(k, unit(rng, n, dim), meta)
    writer.finalize()
    class_of = np.repeat(np.arange(n_classes), dset.counts)
    rows = [{"id": str(i), "text": t, "class": classes[class_of[i]], "descriptor": d, "kind": "object", "wrap": "cbd"}
            for i, (t, d) in enumerate(zip(dset.texts, dset.descriptors))]
    write_arrays(f"{tmp}/text", unit(rng, len(rows), dim), rows, kind="text", model=model, dtype="float16",
                 extra_info={"source": "descriptors", "wrap": "cbd"})


def scale(n_images: int, n_classes: int, per_class: int, dim: int, k: int) -> dict:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_scale_stores(tmp, n_images, n_classes, per_class, dim)
        written = time.perf_counter() - t0
        child = subprocess.run([sys.executable, __file__, "--classify-child", tmp, "-k", str(k)],
                               capture_output=True, text=True, check=True)
        res = json.loads(child.stdout.strip().splitlines()[-1])
        store_mib = sum(os.path.getsize(os.path.join(tmp, "images", f))
                        for f in os.listdir(os.path.join(tmp, "images"))) / 2**20
    return {"images": n_images, "classes": n_classes, "descriptors": n_classes * per_class, "dim": dim,
            "store_write_s": round(written, 1), "image_store_mib": round(store_mib), **res}


def classify_child(tmp: str, k: int) -> None:
    import resource

    from vlmtools import classify as C

    t0 = time.perf_counter()
    summary = C.classify_store(f"{tmp}/images", os.devnull, text_store=f"{tmp}/text", k=k, use_cache=False)
    print(json.dumps({"classify_s": round(time.perf_counter() - t0, 1), "scoring_s": summary["scoring_seconds"],
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


# The peer: what a researcher writes by hand. clip: one prompt per class, score = image . prompt; cbd:
# mean over each class's descriptor rows (grouped by class in the text store), then the argmax.
PEER_NUMPY = r"""
import glob, json, sys
import numpy as np
img, txt, method, out = sys.argv[1:5]
def load(d):
    return np.concatenate([np.load(f) for f in sorted(glob.glob(d + "/emb-*.npy"))]).astype(np.float32)
def meta(d):
    return [json.loads(line) for f in sorted(glob.glob(d + "/meta-*.jsonl")) for line in open(f)]
X, T, rows = load(img), load(txt), meta(txt)
T /= np.linalg.norm(T, axis=1, keepdims=True)
sims = X @ T.T
if method == "clip":
    names = [r["class"] for r in rows]
    pred = sims.argmax(1)
else:
    cls = [r["class"] for r in rows]
    starts = [i for i in range(len(cls)) if i == 0 or cls[i] != cls[i - 1]]
    names = [cls[i] for i in starts]
    pred = (np.add.reduceat(sims, starts, axis=1) / np.diff(starts + [len(cls)])).argmax(1)
with open(out, "w") as fh:
    fh.writelines(f"{r['id']}\t{names[p]}\n" for r, p in zip(meta(img), pred))
"""


def write_peer_stores(tmp: str, n_images: int, n_classes: int, per_class: int, dim: int) -> None:
    """CUB-sized stores with some structure (images near their class's centre, so top-1 means something):
    an image store, a descriptor text store (cbd) and a one-prompt-per-class text store (clip)."""
    import numpy as np

    from vlmtools import classify as C
    from vlmtools.store import write_arrays

    rng = np.random.default_rng(0)
    classes = [f"class {i:03d}" for i in range(n_classes)]
    counts = rng.integers(max(1, per_class - 2), per_class + 3, size=n_classes)
    records = {c: {"class": c, "descriptors": [f"trait {j} of {c}" for j in range(n)]} for c, n in zip(classes, counts)}
    dset = C.build_descriptor_set(classes, records)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, size=n_images)
    model = {"name": "ViT-B-32", "pretrained": "openai"}
    meta = [{"id": str(i), "path": f"/data/{i}.jpg", "label": classes[c], "split": "test"} for i, c in enumerate(labels)]
    write_arrays(f"{tmp}/images", centres[labels] + 3.5 * rng.normal(size=(n_images, dim)), meta, kind="image",
                 model=model, dtype="float16")
    class_of = np.repeat(np.arange(n_classes), dset.counts)
    rows = [{"id": str(i), "text": t, "class": classes[class_of[i]], "descriptor": d, "kind": "object", "wrap": "cbd"}
            for i, (t, d) in enumerate(zip(dset.texts, dset.descriptors))]
    write_arrays(f"{tmp}/descriptors", centres[class_of] + 2 * rng.normal(size=(len(rows), dim)), rows, kind="text",
                 model=model, dtype="float16", extra_info={"source": "descriptors", "wrap": "cbd"})
    prompts = C.clip_texts(classes, ["a photo of a {}."])
    write_arrays(f"{tmp}/prompts", centres + rng.normal(size=(n_classes, dim)),
                 [{"id": str(i), "text": t, "class": c} for i, (t, c) in enumerate(zip(prompts, classes))],
                 kind="text", model=model, dtype="float16", extra_info={"source": "texts"})


# A child's peak RSS counts the memory of the process it was forked from (until its exec), so children are
# started from this small launcher, not from the benchmark (which holds numpy and the stores' arrays).
LAUNCHER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mib": usage.ru_maxrss / 1024, "rc": os.waitstatus_to_exitcode(status)}))
"""


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds) of one child process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res['rc']}):\n{proc.stderr}")
    return res["wall"], res["rss_mib"], res["cpu"]


def peer_numpy(n_images: int, n_classes: int, per_class: int, dim: int, runs: int) -> list[dict]:
    import sys

    # as installed: byte-compiled modules (a sandbox's PYTHONDONTWRITEBYTECODE=1 recompiles ours every run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["VLMTOOLS_QUIET"] = "1"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_peer_stores(tmp, n_images, n_classes, per_class, dim)
        for method, texts in (("clip", "prompts"), ("cbd", "descriptors")):
            ours_out, peer_out = f"{tmp}/ours-{method}.jsonl", f"{tmp}/peer-{method}.tsv"
            ours_cmd = [sys.executable, "-m", "vlmtools", "classify", f"{tmp}/images", "--text-store",
                        f"{tmp}/{texts}", "--method", method, "-o", ours_out]
            peer_cmd = [sys.executable, "-c", PEER_NUMPY, f"{tmp}/images", f"{tmp}/{texts}", method, peer_out]
            ours, peer = [], []
            timed_process(ours_cmd, env), timed_process(peer_cmd, env)  # warm-up: page cache, byte code
            for _ in range(runs):  # interleaved: load changes hit both alike
                ours.append(timed_process(ours_cmd, env))
                peer.append(timed_process(peer_cmd, env))
            preds = {}
            with open(ours_out) as fh:
                for line in fh:
                    rec = json.loads(line)
                    preds[rec["id"]] = (rec["pred"], rec["label"])
            same = correct = 0
            with open(peer_out) as fh:
                for line in fh:
                    i, name = line.rstrip("\n").split("\t")
                    same += preds[i][0] == name
                    correct += preds[i][1] == name
            t_ours, t_peer = [w for w, _, _ in ours], [w for w, _, _ in peer]
            c_ours, c_peer = [c for _, _, c in ours], [c for _, _, c in peer]
            m_ours, m_peer = max(m for _, m, _ in ours), max(m for _, m, _ in peer)
            results.append({
                "method": method, "images": n_images, "texts": texts, "runs": runs,
                "ours_s": [round(t, 3) for t in t_ours], "peer_s": [round(t, 3) for t in t_peer],
                "ratio_min": round(min(t_ours) / min(t_peer), 2),
                "ratio_median": round(statistics.median(t_ours) / statistics.median(t_peer), 2),
                # CPU seconds (user + system): less shaken by other load than wall time
                "ours_cpu_s": [round(t, 3) for t in c_ours], "peer_cpu_s": [round(t, 3) for t in c_peer],
                "cpu_ratio_median": round(statistics.median(c_ours) / statistics.median(c_peer), 2),
                "ours_peak_mib": round(m_ours), "peer_peak_mib": round(m_peer), "memory_ratio": round(m_ours / m_peer, 2),
                "top1": round(100 * sum(p == lab for p, lab in preds.values()) / len(preds), 2),
                "peer_top1": round(100 * correct / len(preds), 2),
                "identical_predictions": f"{same}/{len(preds)}",
            })
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5794)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=7)
    ap.add_argument("--dim", type=int, action="append", help="embedding width(s) [default: 512 and 768]")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale", type=int, help="run classify_store over a store of this many images instead")
    ap.add_argument("--classify-child", help=argparse.SUPPRESS)
    ap.add_argument("--peer", choices=["numpy"], help="whole command vs a numpy script, interleaved")
    ap.add_argument("--runs", type=int, default=5, help="--peer: runs of each")
    args = ap.parse_args()
    os.environ.setdefault("VLMTOOLS_QUIET", "1")
    from vlmtools.console import set_quiet

    set_quiet(True)
    if args.classify_child:
        classify_child(args.classify_child, args.k)
        return
    if args.peer:
        for dim in args.dim or [512]:
            for res in peer_numpy(args.images, args.classes, args.per_class, dim, args.runs):
                print(json.dumps(res))
                print(f"classify --method {res['method']} from stores ({res['images']} images, d={dim}): "
                      f"vlmtools {min(res['ours_s']):.2f} / {statistics.median(res['ours_s']):.2f} s, "
                      f"{res['ours_peak_mib']} MiB; numpy {min(res['peer_s']):.2f} / "
                      f"{statistics.median(res['peer_s']):.2f} s, {res['peer_peak_mib']} MiB; ratio "
                      f"{res['ratio_min']} / {res['ratio_median']} (min / median; CPU time "
                      f"{res['cpu_ratio_median']}), memory {res['memory_ratio']}; "
                      f"top-1 {res['top1']} vs {res['peer_top1']}, identical predictions "
                      f"{res['identical_predictions']}")
        return
    if args.scale:
        for dim in args.dim or [512]:
            print(json.dumps(scale(args.scale, args.classes, args.per_class, dim, args.k)))
        return
    for dim in args.dim or [512, 768]:
        res = bench(args.images, args.classes, args.per_class, dim, args.k, args.repeat)
        print(json.dumps(res))
        print(f"d={dim}: {res['images']} images x {res['classes']} classes x {res['descriptors']} descriptors: "
              f"cbd scoring {1000 * res['cbd_score_s']:.0f} ms, + top-k {1000 * res['cbd_topk_s']:.0f} ms, "
              f"+ explanations {1000 * res['cbd_explain_s']:.0f} ms; with JSON records "
              f"{1000 * res['cbd_records_s']:.0f} ms; whole command from disk {1000 * res['cbd_command_s']:.0f} ms; "
              f"clip scoring {1000 * res['clip_score_s']:.0f} ms")


if __name__ == "__main__":
    main()
