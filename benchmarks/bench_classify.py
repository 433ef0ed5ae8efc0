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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5794)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=7)
    ap.add_argument("--dim", type=int, action="append", help="embedding width(s) [default: 512 and 768]")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("VLMTOOLS_QUIET", "1")
    from vlmtools.console import set_quiet

    set_quiet(True)
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
