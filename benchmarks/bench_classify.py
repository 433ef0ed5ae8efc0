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
    from vlmtools.formats import dumps_line

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

    scores, sims = cbd.score(images)
    pred = C.top_k(scores, k)[0][:, 0]
    out = {
        "images": n_images, "classes": n_classes, "descriptors": len(dset.texts), "dim": dim,
        "cbd_score_s": timed(lambda: cbd.score(images), repeat),
        "cbd_topk_s": timed(lambda: C.top_k(scores, k), repeat),
        "cbd_explain_s": timed(lambda: C.rank_descriptors(sims, dset.offsets, pred), repeat),
        "cbd_records_s": timed(lambda: [dumps_line(r) for r in cbd.predict(images, meta, k=k)], repeat),
        "clip_score_s": timed(lambda: clip.score(images), repeat),
        "clip_records_s": timed(lambda: [dumps_line(r) for r in clip.predict(images, meta, k=k)], repeat),
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
    args = ap.parse_args()
    os.environ.setdefault("VLMTOOLS_QUIET", "1")
    from vlmtools.console import set_quiet

    set_quiet(True)
    if args.classify_child:
        classify_child(args.classify_child, args.k)
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
