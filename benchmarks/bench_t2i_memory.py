#!/usr/bin/env python3
"""Peak memory of `vlmtools train t2i --arch qformer` at COCO's size: an image store of N_IMAGES rows and a
text store of N_CAPTIONS captions (random embeddings, COCO-like caption texts; what is measured is memory,
not accuracy), trained for one epoch with the packaged micro CLIP's text tower on the CPU.

    python benchmarks/bench_t2i_memory.py WORKDIR [--images 118287] [--captions 530000] [--epochs 1]

Prints one JSON line: the sizes, the run's seconds and its peak resident memory (ru_maxrss of the child
process that trains), and what holding every caption's token features at once would take for the micro
CLIP (context 32, width 96, float16) and for ViT-L-14 (77 x 768). Writes the stores once (reused).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("a man woman dog cat bus train plate pizza table street sign red blue small large sitting standing "
         "next to on of the with in front near two people riding holding white black green field").split()


def make_stores(work: Path, n_images: int, n_captions: int) -> None:
    import numpy as np

    from vlmtools.store import write_arrays

    model = {"name": "vlmtools-micro", "pretrained": "vlmtools"}
    rng = np.random.default_rng(0)
    if not (work / "images" / "info.json").exists():
        meta = [{"id": str(i), "path": f"/coco/{i:012d}.jpg"} for i in range(n_images)]
        write_arrays(work / "images", rng.normal(size=(n_images, 128)).astype(np.float32), meta, kind="image",
                     model=model)
    if not (work / "captions" / "info.json").exists():
        image_of = rng.integers(0, n_images, n_captions)
        lengths = rng.integers(8, 16, n_captions)
        meta = [{"id": str(k), "image_id": str(int(image_of[k])),
                 "text": " ".join(rng.choice(WORDS, int(lengths[k])))} for k in range(n_captions)]
        write_arrays(work / "captions", rng.normal(size=(n_captions, 128)).astype(np.float32), meta, kind="text",
                     model=model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work")
    ap.add_argument("--images", type=int, default=118287)
    ap.add_argument("--captions", type=int, default=530000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_stores(work, args.images, args.captions)
    cmd = [sys.executable, "-m", "vlmtools", "train", "t2i", str(work / "captions"), "--images",
           str(work / "images"), "--arch", "qformer", "-o", str(work / "t2i"), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--device", "cpu", "--json"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode:
        sys.stderr.write(res.stderr)
        return res.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    summary = json.loads(res.stdout.splitlines()[-1])
    print(json.dumps({
        "images": args.images, "captions": args.captions, "epochs": args.epochs, "batch_size": args.batch_size,
        "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2),
        "retrieval": summary.get("retrieval"),
        "all_token_features_gib": {"vlmtools-micro": round(args.captions * 32 * 96 * 2 / 2**30, 2),
                                   "ViT-L-14": round(args.captions * 77 * 768 * 2 / 2**30, 2)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
