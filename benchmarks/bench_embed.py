"""Benchmark: `embed images` throughput vs the raw model forward on the same batches.

Reports, from one run on one device: images/s of the full pipeline (decode, preprocess, DataLoader,
encode, write shards), images/s of model.encode_image alone on the same preprocessed batches, and their
ratio. Not a test: timings are noisy, so only the ratio measured in one run is meaningful.

    python benchmarks/bench_embed.py --model vlmtools-tiny --pretrained none --n 512
    python benchmarks/bench_embed.py --model ViT-B-32 --pretrained openai --device cuda --n 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def make_images(directory: Path, n: int, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = directory / f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        records.append({"id": str(i), "path": str(path)})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlmtools-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=512, help="number of synthetic JPEGs")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch

    from vlmtools.console import set_quiet
    from vlmtools.embed import embed_images, load_rgb
    from vlmtools.models import ModelSpec, load_model

    set_quiet(True)
    encoder = load_model(ModelSpec.parse(args.model, args.pretrained), args.device)
    with tempfile.TemporaryDirectory() as tmp:
        records = make_images(Path(tmp), args.n, args.size)
        # Raw forward: the same images, preprocessed ahead of time, in the same batches.
        batches = [torch.stack([encoder.preprocess(load_rgb(r["path"])) for r in records[i:i + args.batch_size]])
                   for i in range(0, len(records), args.batch_size)]
        encoder.encode_image_tensor(batches[0])  # warm-up (allocations, cuDNN autotune)
        if encoder.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            encoder.encode_image_tensor(batch)
        if encoder.device.startswith("cuda"):
            torch.cuda.synchronize()
        raw = args.n / (time.perf_counter() - start)

        start = time.perf_counter()
        summary = embed_images(records, str(Path(tmp) / "store"), encoder, batch_size=args.batch_size,
                               workers=args.workers, shard_size=max(1, args.n // 4))
        pipeline = args.n / (time.perf_counter() - start)
    result = {"model": args.model, "device": encoder.device, "n": args.n, "image_side": args.size,
              "batch_size": args.batch_size, "workers": args.workers, "cpus": os.cpu_count(),
              "embed_images_per_s": round(pipeline, 1), "raw_forward_images_per_s": round(raw, 1),
              "ratio_embed_vs_raw": round(pipeline / raw, 3), "rows": summary.count}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
