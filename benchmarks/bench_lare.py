"""Benchmark: `train lare` and `train lads` against `train probe` alone, on CUB's training scale.

CUB-200-2011's train split is 5,994 images of 200 classes; CoCa ViT-L-14 / CLIP ViT-L-14 embeddings are
768-d. Clustered random unit vectors stand in for them (the cost does not depend on their values) and a
text store holds the class prompts, so no model is loaded. Each method runs once per seed with the
commands' defaults (100 epochs with early stopping on a 10 % val split, batch 256; LARE: K = --samples
boxes' samples, 20 box epochs; LADS: 20 augmenter epochs), through the library functions behind the
commands. Prints one JSON line per (method, seed) and a summary with the ratio to the probe.

    python benchmarks/bench_lare.py                       # 5994 x 768, 200 classes, K = 10, 1 seed
    python benchmarks/bench_lare.py --seeds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_stores(root: Path, n: int, dim: int, classes: int, seed: int = 0):
    import numpy as np

    from vlmtools.classify import clip_texts
    from vlmtools.store import write_arrays

    model = {"name": "bench-model", "pretrained": "none"}
    rng = np.random.default_rng(seed)
    names = [f"class{c:03d}" for c in range(classes)]
    centres = rng.normal(size=(classes, dim))
    y = np.arange(n) % classes
    x = centres[y] + 1.5 * rng.normal(size=(n, dim))
    write_arrays(root / "images", x, [{"id": str(i), "label": names[c]} for i, c in enumerate(y)], kind="image",
                 model=model)
    texts = [t for p in ("a photo of a {}.", "a painting of a {}.") for t in clip_texts(names, [p])]
    write_arrays(root / "texts", rng.normal(size=(len(texts), dim)), [{"id": str(i), "text": t}
                 for i, t in enumerate(texts)], kind="text", model=model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5994)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from vlmtools.console import set_quiet
    from vlmtools.heads.lads import train_lads
    from vlmtools.heads.lare import train_lare
    from vlmtools.heads.linear import train_probe
    from vlmtools.heads.loop import FitOptions

    torch.set_num_threads(args.threads)
    set_quiet(True)
    times: dict[str, list[float]] = {"probe": [], "lare": [], "lads": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_stores(root, args.images, args.dim, args.classes)
        for seed in range(args.seeds):
            opts = FitOptions(seed=seed, device=args.device)
            runs = {
                "probe": lambda: train_probe(root / "images", root / "probe", options=opts),
                "lare": lambda: train_lare(root / "images", root / "lare", options=opts, samples=args.samples,
                                           text_store=root / "texts"),
                "lads": lambda: train_lads(root / "images", root / "lads", options=opts, text_store=root / "texts"),
            }
            for name, run in runs.items():
                t0 = time.perf_counter()
                summary = run()
                dt = time.perf_counter() - t0
                times[name].append(dt)
                print(json.dumps({"method": name, "seed": seed, "seconds": round(dt, 2),
                                  "epochs": summary["epochs"], "train_rows": summary["train_rows"]}), flush=True)
    probe = statistics.median(times["probe"])
    out = {"images": args.images, "dim": args.dim, "classes": args.classes, "samples": args.samples,
           "threads": args.threads, "seeds": args.seeds,
           **{f"{k}_s": round(statistics.median(v), 2) for k, v in times.items()},
           **{f"{k}_over_probe": round(statistics.median(v) / probe, 2) for k, v in times.items() if k != "probe"}}
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
