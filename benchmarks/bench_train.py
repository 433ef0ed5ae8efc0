"""Benchmark: training heads on CUB's scale with the one training loop (vlmtools.heads.loop.fit).

CUB-200-2011's train split is 5,994 images of 200 classes; ViT-L-14 embeddings are 768-d. Random-ish data
stands in for the embeddings: each class a random unit centre, each row centre + Gaussian noise,
L2-normalized (so accuracy and early stopping behave like a real, learnable problem); 10 class-level
text samples per class for the adapter. Reports (median of --repeat runs, seconds):

  probe_fit       fit() of a linear probe, --epochs fixed (no early stopping), batch 256, on the rows
  plain_loop      the same epochs, batches, AdamW and model in a bare torch loop (no val, no progress)
  ratio           probe_fit / plain_loop (the loop's overhead: per-epoch val accuracy, curve, best copy)
  probe_command   `train probe` end to end from a store on disk (defaults: 100 epochs, patience 10, val 10%),
                  head files written
  adapter_command `train adapter --image-ratio 0.5` end to end (defaults)
  sweep           `train adapter --sweep 1.0,0.9,...,0.0` end to end: 20 heads (defaults)

    python benchmarks/bench_train.py                 # 5994 x 768, 200 classes
    python benchmarks/bench_train.py --rows 5994 --dim 512 --epochs 50 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench_classify import timed  # benchmarks/ is on sys.path when this script runs


def data(rows: int, classes: int, dim: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(rows) % classes
    x = centres[y] + rng.normal(scale=6.0 / np.sqrt(dim), size=(rows, dim))  # noise norm 6, centres 1
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    t_y = np.repeat(np.arange(classes), 10)
    t = centres[t_y] + rng.normal(scale=4.0 / np.sqrt(dim), size=(len(t_y), dim))
    return x, y.astype(np.int64), t.astype(np.float32), t_y


def plain_loop(x, y, n_classes: int, epochs: int, batch: int, lr: float, weight_decay: float, seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch):
            idx = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5994)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=100, help="epochs of the fixed-epoch comparison")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a shared machine suffers "
                    "badly from oversubscription with more)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the 20-head sweep")
    args = ap.parse_args()

    import torch

    from vlmtools import console
    from vlmtools.heads.adapter import sweep_adapter, train_adapter
    from vlmtools.heads.linear import LinearHead, train_probe
    from vlmtools.heads.loop import FitOptions, fit, seeded
    from vlmtools.store import write_arrays

    console.set_quiet(True)
    torch.set_num_threads(args.threads)
    x, y, t, t_y = data(args.rows, args.classes, args.dim)
    fixed = FitOptions(epochs=args.epochs, patience=0, device="cpu")

    def probe_fit():
        with seeded(0):
            head = LinearHead(args.dim, args.classes)
        fit(head, (x, y), None, fixed)

    def plain():
        plain_loop(x, y, args.classes, args.epochs, fixed.batch_size, fixed.lr, fixed.weight_decay, 0)

    plain()  # warm-up: the first optimizer imports torch._dynamo (seconds, once per process)
    result = {"rows": args.rows, "classes": args.classes, "dim": args.dim, "epochs": args.epochs,
              "threads": torch.get_num_threads(), "repeat": args.repeat}
    result["probe_fit_s"] = round(timed(probe_fit, args.repeat), 3)
    result["plain_loop_s"] = round(timed(plain, args.repeat), 3)
    result["ratio"] = round(result["probe_fit_s"] / result["plain_loop_s"], 3)

    with tempfile.TemporaryDirectory() as tmp:
        model = {"name": "ViT-L-14", "pretrained": "openai"}
        meta = [{"id": str(i), "path": f"/cub/{i}.jpg", "label": f"class {c:03d}"} for i, c in enumerate(y)]
        write_arrays(os.path.join(tmp, "img"), x, meta, kind="image", model=model, dtype="float16")
        tmeta = [{"id": f"t{i}", "text": f"sentence {i}", "class": f"class {c:03d}"} for i, c in enumerate(t_y)]
        write_arrays(os.path.join(tmp, "txt"), t, tmeta, kind="text", model=model, dtype="float16")
        img, txt, head = os.path.join(tmp, "img"), os.path.join(tmp, "txt"), os.path.join(tmp, "head")
        defaults = FitOptions(device="cpu")
        epochs = []

        def probe_cmd():
            epochs.append(train_probe(img, head, options=defaults)["epochs"])

        def adapter_cmd():
            epochs.append(train_adapter(img, head, text_store=txt, options=defaults, image_ratio=0.5)["epochs"])

        result["probe_command_s"] = round(timed(probe_cmd, args.repeat), 3)
        result["probe_command_epochs"] = epochs[-1]
        with open(head + ".json") as fh:
            result["probe_val_acc"] = json.load(fh)["metrics"]["val"]["acc"]
        result["adapter_command_s"] = round(timed(adapter_cmd, args.repeat), 3)
        result["adapter_command_epochs"] = epochs[-1]
        if not args.no_sweep:
            t0 = time.perf_counter()
            with open(os.devnull, "w") as devnull:
                rows = sweep_adapter(img, text_store=txt, options=defaults, table=devnull.name)
            result["sweep_s"] = round(time.perf_counter() - t0, 2)
            result["sweep_heads"] = sum((r["image_only"] is not None) + (r["image_text"] is not None) for r in rows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
