"""Benchmark: `embed images` rates, in one run on one device, for --decode cpu and gpu:

  whole    images / wall seconds of a whole `python -m vlmtools embed images` process (imports, model
           build and load, input read, workers, loop, finalize)
  loop     images / seconds of the embedding loop (the run's own summary line)
  decode   decode + preprocess alone: cpu = PIL in DataLoader workers (as embed runs it); gpu = file bytes
           read in workers, batched torchvision decode_jpeg + tensor preprocessing on the device
  model    model forward alone, on preprocessed batches already in (pinned) host memory

Images are photo-like JPEGs (smooth colour fields and soft shapes, not noise, which no JPEG decoder sees
in real data), 500x375 by default as in the issue. Without a CUDA device the gpu rows say "unmeasured";
--gpu-path-on-cpu also times the gpu path's tensor pipeline on the CPU (what the tests check for equivalence).

--repeat N interleaves N model-only timings with N whole runs (load changes hit both alike) and reports
each run's loop/model ratio and their median; --baseline-python PY also runs the whole command with
another interpreter (another checkout's venv: the code before a change), interleaved with ours.

    python benchmarks/bench_embed.py --model vlmtools-micro --n 2000
    python benchmarks/bench_embed.py --model ViT-B-32 --pretrained none --n 512 --batch-size 128 --repeat 3
    python benchmarks/bench_embed.py --model ViT-B-32 --pretrained none --device cuda --n 20000 --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the vlmtools command sets it (before torch loads)
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(directory: Path, n: int, w: int, h: int, distinct: int = 64) -> Path:
    """n photo-like JPEGs (``distinct`` different ones, repeated: generating is not what is measured)."""
    import numpy as np

    from vlmtools.synth.render import photo_like

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(min(n, distinct)):
        buf = io.BytesIO()
        photo_like(rng, w, h, shapes=8).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    lines = []
    for i in range(n):
        path = directory / f"{i:06d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        lines.append(json.dumps({"id": str(i), "path": str(path)}) + "\n")
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


def decode_rate(records, encoder, decode: str, batch_size: int, workers: int) -> float:
    """Images/s of decoding + preprocessing alone, through the run's own loader and decode stage."""
    import torch

    from vlmtools.embed import _BatchDecoder, _collate, _decoded_batches, _ImageDataset, prefetch_for, resolve_decode

    path, tensor_pre = resolve_decode(decode, encoder)
    cuda = encoder.device.startswith("cuda")
    sources = [r["path"] for r in records]
    loader = torch.utils.data.DataLoader(
        _ImageDataset(sources, encoder.preprocess, encoder.image_size, raw_jpeg=path == "gpu"),
        batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=cuda,
        prefetch_factor=prefetch_for(workers) if workers else None)
    to_batch = _BatchDecoder(encoder, tensor_pre, encoder.image_size)
    start = time.perf_counter()
    n = 0
    for _, indices, tensor, _ in _decoded_batches(loader, to_batch, path == "gpu" or cuda, encoder.device):
        if tensor is not None and cuda:
            tensor = tensor.to(encoder.device, non_blocking=True)  # the cpu path's copy is part of its cost
        n += len(indices)
    if cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import what `embed images` imports (torch, open_clip, ...)."""
    code = ("import time; t = time.perf_counter(); import torch, torchvision, open_clip, vlmtools.embed, "
            "vlmtools.cli.app; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def min_cosine(a: Path, b: Path) -> float:
    import numpy as np

    from vlmtools.store import open_store

    x, y = open_store(a), open_store(b)
    assert [m["id"] for m in x.meta] == [m["id"] for m in y.meta]
    return float((np.asarray(x.embeddings, np.float32) * np.asarray(y.embeddings, np.float32)).sum(1).min())


def model_rate(records, encoder, batch_size: int) -> float:
    import torch

    from vlmtools.images import load_rgb

    one = torch.stack([encoder.preprocess(load_rgb(records[i]["path"], encoder.image_size))
                       for i in range(min(batch_size, len(records)))])
    if encoder.device.startswith("cuda"):
        one = one.pin_memory()
    batches = max(1, len(records) // len(one))
    encoder.encode_image_tensor(one)  # warm-up (allocations, autotune)
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode_image_tensor(one)
    return batches * len(one) / (time.perf_counter() - start)


def whole_run(manifest: Path, out: Path, args, decode: str, python: str = sys.executable) -> tuple[float, dict]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh store each run: the whole embedding is what is timed
    cmd = [python, "-m", "vlmtools", "embed", "images", str(manifest), "-o", str(out), "--decode", decode,
           "--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size), "--json",
           "--shard-size", str(max(1, args.n // 4))]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    start = time.perf_counter()
    # run from the store's folder: `python -m vlmtools` from a checkout would import that checkout's code
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLMTOOLS_QUIET": "1"},
                          cwd=out.parent)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"embed failed: {done.stderr}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlmtools-micro")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: embed's own choice (core count)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct images among the n (repeated)")
    parser.add_argument("--decodes", default="cpu,gpu", help="decode paths to run, comma-separated")
    parser.add_argument("--gpu-path-on-cpu", action="store_true", help="without CUDA, time the gpu path's "
                        "tensor pipeline on the CPU too")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--repeat", type=int, default=1, help="model-only and whole runs, interleaved, this many times")
    parser.add_argument("--baseline-python", help="also run the whole command with this interpreter, interleaved")
    args = parser.parse_args()

    from vlmtools.console import set_quiet
    from vlmtools.embed import available_cpus, default_workers
    from vlmtools.formats import read_manifest
    from vlmtools.models import ModelSpec, load_model

    set_quiet(True)
    encoder = load_model(ModelSpec.parse(args.model, args.pretrained), args.device)
    cuda = encoder.device.startswith("cuda")
    workers = args.workers if args.workers is not None else default_workers(encoder.device)
    device_name = "cpu"
    if cuda:
        import torch

        device_name = torch.cuda.get_device_name(0)
    result = {"model": args.model, "device": encoder.device, "device_name": device_name, "n": args.n,
              "image": f"{args.width}x{args.height}", "batch_size": args.batch_size, "workers": workers,
              "cpus": available_cpus(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "rows": []}
    result["import_s"] = round(import_seconds(), 2)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_images(Path(tmp), args.n, args.width, args.height, args.distinct)
        records = read_manifest(manifest)
        stores = {}
        for decode in args.decodes.split(","):
            if decode == "gpu" and not cuda and not args.gpu_path_on_cpu:
                result["rows"].append({"decode": "gpu", "note": "unmeasured, no GPU lent"})
                continue
            stores[decode] = Path(tmp) / f"store-{decode}"
            runs, baseline = [], []
            for _ in range(args.repeat):  # interleaved: model alone, the whole command, the baseline's
                model = model_rate(records, encoder, args.batch_size)
                runs.append((model, *whole_run(manifest, stores[decode], args, decode)))
                if args.baseline_python:
                    baseline.append((model, *whole_run(manifest, Path(tmp) / "baseline", args, decode,
                                                       args.baseline_python)))
            model, wall, summary = runs[-1]
            loop = summary["per_second"]
            stages = summary.get("timings", {})
            ratios = [s["per_second"] / m for m, _, s in runs]
            row = {"decode": decode if cuda or decode == "cpu" else "gpu path on cpu",
                   "whole_per_s": round(args.n / wall, 1), "loop_per_s": loop,
                   "decode_per_s": round(decode_rate(records, encoder, decode, args.batch_size, workers), 1),
                   "model_per_s": round(model, 1), "whole_s": round(wall, 2), "loop_s": summary["seconds"],
                   "loop_share_of_wall": round(summary["seconds"] / wall, 3),
                   "loop_vs_model": round(loop / model, 3), "timings": stages,
                   # interpreter start, imports and argument checks: the wall time no stage accounts for
                   "before_stages_s": round(wall - sum(v for k, v in stages.items() if k != "first_batch"), 2)}
            if args.repeat > 1:
                row.update(loop_vs_model_runs=[round(r, 3) for r in ratios],
                           loop_vs_model_median=round(statistics.median(ratios), 3),
                           whole_s_runs=[round(w, 2) for _, w, _ in runs])
            if baseline:
                b_ratios = [s["per_second"] / m for m, _, s in baseline]
                row["baseline"] = {"loop_vs_model_runs": [round(r, 3) for r in b_ratios],
                                   "loop_vs_model_median": round(statistics.median(b_ratios), 3),
                                   "whole_s_runs": [round(w, 2) for _, w, _ in baseline],
                                   "timings": baseline[-1][2].get("timings", {})}
            result["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if "cpu" in stores and "gpu" in stores:
            result["min_cosine_cpu_vs_gpu"] = round(min_cosine(stores["cpu"], stores["gpu"]), 6)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
