"""Benchmark: training heads at CUB's scale, ours against peers, interleaved, with held-out accuracy.

CUB-200-2011's train split is 5,994 images of 200 classes, its test split 5,794; ViT-L-14 embeddings are
768-d. Random-ish data stands in for the embeddings: each class a random unit centre, each row centre +
Gaussian noise (norm 6), L2-normalized, train and held-out rows drawn alike; 10 class-level text samples
per class for the adapter; random class prompts in a text store (no model load). Each pair below runs
ours then the peer, --repeat times in turn (so both see the same machine load); it reports the min and
median seconds of each, the ratio ours / peer of the medians, and the held-out top-1 beside every time:

  probe    `train probe` with its defaults, in-process from the store on disk (read, fit, head files
           written) vs --peer sklearn: LogisticRegression() (its defaults: L-BFGS, C = 1) fit on the same
           rows already in memory
  process  the same as whole processes: `vlmtools train probe STORE -o HEAD` vs `python -c` importing
           scikit-learn, reading the store's shard and fitting (imports included)
  loop     fit() with AdamW for --epochs fixed epochs (no early stopping) vs a bare torch loop of the same
           epochs, batches, AdamW and model (the loop's own overhead)
  lare     `train lare --samples K` (defaults) vs a bare torch LARE with the same settings (f_Box, losses,
           10 AdamW box epochs, K samples per box, then torch.optim.LBFGS on the same probe objective)
  adapter  `train adapter --image-ratio 0.5` and the 20-head `--sweep` (ours only)
  lads     `train lads` with its authors' settings (--lads; ours only; minutes on a CPU)

    python benchmarks/bench_train.py --peer sklearn --repeat 3
    python benchmarks/bench_train.py --only probe,lare --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = {"name": "ViT-L-14", "pretrained": "openai"}


def data(rows: int, classes: int, dim: int, seed: int = 0, test_rows: int = 0):
    """(x, y, t, t_y, x_test, y_test): train rows, text samples, held-out rows (same centres)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n):
        y = np.arange(n) % classes
        x = centres[y] + rng.normal(scale=6.0 / np.sqrt(dim), size=(n, dim))  # noise norm 6, centres 1
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y.astype(np.int64)

    x, y = draw(rows)
    t_y = np.repeat(np.arange(classes), 10)
    t = centres[t_y] + rng.normal(scale=4.0 / np.sqrt(dim), size=(len(t_y), dim))
    x_test, y_test = draw(test_rows)
    return x, y, t.astype(np.float32), t_y, x_test, y_test


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


def bare_lare(x, y, class_emb, *, samples: int, seed: int = 0, box_epochs: int = 10, hidden: int = 128,
              lr: float = 1e-2, weight_decay: float = 1e-4, batch: int = 256, alpha: float = 0.5, l2: float = 1.0):
    """LARE with `train lare`'s default settings in plain torch: f_Box (contain form, GELU, hidden 128) by
    AdamW on the study's loss with the log-side volume term, K uniform samples per box (normalized), then
    torch.optim.LBFGS (strong Wolfe) on mean cross-entropy + l2/(2n) |W|^2 over original + sampled rows.
    Returns the probe (nn.Linear)."""
    import math

    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    xt, yt, t = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(class_emb)
    n, d = xt.shape
    b = float(xt.std(dim=0).mean())
    fc1, fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, 2 * d)
    with torch.no_grad():
        fc2.weight.normal_(0.0, 1e-3)
        fc2.bias.fill_(math.log(math.expm1(b / 2)))

    def boxes(xb):
        out = fc2(F.gelu(fc1(xb)))
        return xb - F.softplus(out[:, :d]) - 1e-6, xb + F.softplus(out[:, d:]) + 1e-6

    opt = torch.optim.AdamW([*fc1.parameters(), *fc2.parameters()], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(box_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb, yb = xt[idx], yt[idx]
            lo, hi = boxes(xb)
            bv = ((torch.log(hi - lo) - math.log(b)) ** 2).sum(1).mean()
            cc = sum(F.cross_entropy(p @ t.T, yb) for p in (hi, lo, (lo + hi) / 2))
            loss = (1 - alpha) * bv + alpha / 3 * cc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        lo, hi = boxes(xt)
        u = torch.rand((n, samples, d), generator=torch.Generator().manual_seed(seed))
        extra = F.normalize((lo[:, None] + u * (hi - lo)[:, None]).reshape(-1, d), dim=1)
    xa, ya = torch.cat([xt, extra]), torch.cat([yt, yt.repeat_interleave(samples)])
    probe = torch.nn.Linear(d, int(y.max()) + 1)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.zero_()
    lbfgs = torch.optim.LBFGS(probe.parameters(), max_iter=100, tolerance_grad=1e-4, history_size=10,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = F.cross_entropy(probe(xa), ya) + l2 / (2 * len(xa)) * (probe.weight ** 2).sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return probe


def interleaved(pairs: dict, repeat: int) -> dict:
    """Run each named callable in turn, ``repeat`` rounds: {name: [seconds, ...]}."""
    times = {name: [] for name in pairs}
    for _ in range(repeat):
        for name, fn in pairs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}


def report(result: dict, key: str, ours: str, peer: str | None, acc: dict) -> None:
    """One line per comparison on stderr: ours / peer / ratio, accuracy beside every time."""
    o = result[key][ours]
    line = f"{key:8s} ours {o['min_s']:.2f}/{o['median_s']:.2f} s (acc {100 * acc[ours]:.2f} %)"
    if peer is not None:
        p = result[key][peer]
        line += (f"  {peer} {p['min_s']:.2f}/{p['median_s']:.2f} s (acc {100 * acc[peer]:.2f} %)  "
                 f"ratio {result[key]['ratio']:.2f}")
    print(line, file=sys.stderr, flush=True)


def head_accuracy(head_path, x, y) -> float:
    import torch

    from vlmtools.heads.base import load_head

    head, _ = load_head(head_path)
    with torch.no_grad():
        return float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5994)
    ap.add_argument("--test-rows", type=int, default=5794, help="held-out rows (CUB's test split)")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=100, help="epochs of the fixed-epoch loop comparison")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a shared machine suffers "
                    "badly from oversubscription with more); the peers get the same (OMP/MKL/OpenBLAS)")
    ap.add_argument("--peer", choices=["sklearn", "none"], default="sklearn",
                    help="the probe's peer (scikit-learn must be installed; it is no vlmtools dependency)")
    ap.add_argument("--only", default="probe,process,loop,lare,adapter",
                    help="comma-separated sections: probe, process, loop, lare, adapter, sweep, lads")
    ap.add_argument("--samples", type=int, default=10, help="LARE's K")
    ap.add_argument("--lads", action="store_true", help="also `train lads` (its authors' 200 + 400 epochs)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    only = set(args.only.split(",")) | ({"lads"} if args.lads else set())

    import numpy as np
    import torch

    from vlmtools import console
    from vlmtools.heads.linear import LinearHead, probe_options, train_probe
    from vlmtools.heads.loop import FitOptions, fit, seeded
    from vlmtools.store import write_arrays

    console.set_quiet(True)
    torch.set_num_threads(args.threads)
    x, y, t, t_y, x_test, y_test = data(args.rows, args.classes, args.dim, test_rows=args.test_rows)
    result = {"rows": args.rows, "test_rows": args.test_rows, "classes": args.classes, "dim": args.dim,
              "threads": args.threads, "repeat": args.repeat, "load_average": os.getloadavg()[0]}
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); min/median of {args.repeat}",
          file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="bench_train.")
    meta = [{"id": str(i), "path": f"/cub/{i}.jpg", "label": f"class {c:03d}"} for i, c in enumerate(y)]
    img, txt = os.path.join(tmp, "img"), os.path.join(tmp, "txt")
    write_arrays(img, x, meta, kind="image", model=MODEL, dtype="float16")
    x_store = x.astype(np.float16).astype(np.float32)  # what the store holds, for the peers
    tmeta = [{"id": f"t{i}", "text": f"sentence {i}", "class": f"class {c:03d}"} for i, c in enumerate(t_y)]
    write_arrays(txt, t, tmeta, kind="text", model=MODEL, dtype="float16")
    head = os.path.join(tmp, "head")

    if "probe" in only:
        acc = {}

        def ours():
            train_probe(img, head, options=probe_options(device="cpu"))
            acc["ours"] = head_accuracy(head, x_test, y_test)

        pairs = {"ours": ours}
        if args.peer == "sklearn":
            from sklearn.linear_model import LogisticRegression

            def peer():
                clf = LogisticRegression().fit(x_store, y)
                acc["sklearn"] = float((clf.predict(x_test) == y_test).mean())

            pairs["sklearn"] = peer
        times = interleaved(pairs, args.repeat)
        result["probe"] = {k: {**summary(v), "acc": round(acc[k], 4)} for k, v in times.items()}
        peer = "sklearn" if args.peer == "sklearn" else None
        if peer:
            result["probe"]["ratio"] = round(statistics.median(times["ours"]) / statistics.median(times[peer]), 2)
        report(result, "probe", "ours", peer, acc)

    if "process" in only and args.peer == "sklearn":
        result["process"] = bench_process(img, head, x_test, y_test, args)

    if "loop" in only:
        fixed = FitOptions(epochs=args.epochs, patience=0, device="cpu")
        acc = {}

        def probe_fit():
            with seeded(0):
                h = LinearHead(args.dim, args.classes)
            fit(h, (x, y), None, fixed)
            with torch.no_grad():
                acc["ours"] = float((h(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

        def plain():
            m = plain_loop(x, y, args.classes, args.epochs, fixed.batch_size, fixed.lr, fixed.weight_decay, 0)
            with torch.no_grad():
                acc["torch"] = float((m(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

        plain()  # warm-up: the first optimizer imports torch._dynamo (a second, once per process)
        times = interleaved({"ours": probe_fit, "torch": plain}, args.repeat)
        result["loop"] = {k: {**summary(v), "acc": round(acc[k], 4)} for k, v in times.items()}
        result["loop"]["ratio"] = round(statistics.median(times["ours"]) / statistics.median(times["torch"]), 2)
        report(result, "loop", "ours", "torch", acc)

    classes = sorted({r["label"] for r in meta})
    if "lare" in only or "lads" in only:
        prompts = write_prompts(tmp, classes, args.dim)
    if "lare" in only:
        result["lare"] = bench_lare(img, tmp, prompts, x, y, x_test, y_test, args, result)
    if "adapter" in only or "sweep" in only:
        result.update(bench_adapter(img, txt, head, x_test, y_test, only))
    if "lads" in only:
        result["lads"] = bench_lads(img, tmp, prompts, x_test, y_test)
    print(json.dumps(result))


def bench_process(img: str, head: str, x_test, y_test, args) -> dict:
    """Whole processes, interleaved: the CLI vs a python script with scikit-learn (imports included)."""
    import glob

    shards = sorted(glob.glob(os.path.join(img, "emb-*.npy")))
    metas = sorted(glob.glob(os.path.join(img, "meta-*.jsonl")))
    if not shards or len(shards) != len(metas):
        return {"skipped": "the store's layout is not emb-*.npy + meta-*.jsonl shards"}
    script = ("import json, numpy as np\nfrom sklearn.linear_model import LogisticRegression\n"
              f"x = np.concatenate([np.load(p) for p in {shards!r}]).astype(np.float32)\n"
              f"y = [json.loads(l)['label'] for p in {metas!r} for l in open(p)]\n"
              "LogisticRegression().fit(x, y)\n")
    acc = {}

    def ours():
        subprocess.run([sys.executable, "-m", "vlmtools", "-q", "train", "probe", img, "-o", head, "--device", "cpu"],
                       check=True)
        acc["ours"] = head_accuracy(head, x_test, y_test)

    def peer():
        subprocess.run([sys.executable, "-c", script], check=True)
        acc["sklearn"] = float("nan")  # the same fit as the in-process peer

    times = interleaved({"ours": ours, "sklearn": peer}, args.repeat)
    out = {k: summary(v) for k, v in times.items()}
    out["ratio"] = round(statistics.median(times["ours"]) / statistics.median(times["sklearn"]), 2)
    print(f"process  ours {out['ours']['min_s']:.2f}/{out['ours']['median_s']:.2f} s (acc {100 * acc['ours']:.2f} %)"
          f"  sklearn {out['sklearn']['min_s']:.2f}/{out['sklearn']['median_s']:.2f} s (the probe's fit)  "
          f"ratio {out['ratio']:.2f}", file=sys.stderr, flush=True)
    return out


def write_prompts(tmp: str, classes: list[str], dim: int) -> str:
    """Random unit class prompts (photo, painting and LADS's class-consistency prompt) in a text store."""
    import numpy as np

    from vlmtools.classify import clip_texts
    from vlmtools.store import write_arrays

    texts = [s for p in ("a photo of a {}.", "a painting of a {}.", "a photo of a {}") for s in clip_texts(classes, [p])]
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(texts), dim))
    path = os.path.join(tmp, "prompts")
    write_arrays(path, emb / np.linalg.norm(emb, axis=1, keepdims=True),
                 [{"id": str(i), "text": s} for i, s in enumerate(texts)], kind="text", model=MODEL)
    return path


def bench_lare(img, tmp, prompts, x, y, x_test, y_test, args, result) -> dict:
    """`train lare` (defaults, K samples) vs the bare torch LARE of the same settings, interleaved."""
    import torch

    from vlmtools.heads import augmented as A
    from vlmtools.heads.data import open_store_for
    from vlmtools.heads.lare import train_lare
    from vlmtools.heads.linear import probe_options
    from vlmtools.store import open_store

    out_head = os.path.join(tmp, "lare")
    reader, spec = open_store_for(img, "image")
    classes = list(dict.fromkeys(m["label"] for m in reader.meta))
    class_emb = A.class_text_embeddings(classes, ["a photo of a {}."], spec, text_store=open_store(prompts, kind="text"))
    x_store = reader.embeddings[:].astype("float32")
    acc, info = {}, {}

    def ours():
        s = train_lare(img, out_head, options=probe_options(device="cpu"), samples=args.samples, text_store=prompts)
        info.update(iterations=s["epochs"], box_mean_side=s["box_mean_side"])
        acc["ours"] = head_accuracy(out_head, x_test, y_test)

    def bare():
        probe = bare_lare(x_store, y, class_emb, samples=args.samples)
        with torch.no_grad():
            acc["torch"] = float((probe(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    times = interleaved({"ours": ours, "torch": bare}, args.repeat)
    out = {k: {**summary(v), "acc": round(acc[k], 4)} for k, v in times.items()}
    out.update(samples=args.samples, ratio=round(statistics.median(times["ours"]) / statistics.median(times["torch"]), 2),
               **info)
    if "probe" in result:
        out["over_probe"] = round(statistics.median(times["ours"]) / result["probe"]["ours"]["median_s"], 1)
        out["probe_acc"] = result["probe"]["ours"]["acc"]
    result_line = dict(result)
    result_line["lare"] = out
    report(result_line, "lare", "ours", "torch", acc)
    return out


def bench_adapter(img, txt, head, x_test, y_test, only) -> dict:
    from vlmtools.heads.adapter import sweep_adapter, train_adapter
    from vlmtools.heads.linear import probe_options

    out = {}
    t0 = time.perf_counter()
    s = train_adapter(img, head, text_store=txt, options=probe_options(device="cpu"), image_ratio=0.5)
    out["adapter"] = {"s": round(time.perf_counter() - t0, 3), "iterations": s["epochs"],
                      "acc": round(head_accuracy(head, x_test, y_test), 4)}
    print(f"adapter  ours {out['adapter']['s']:.2f} s (acc {100 * out['adapter']['acc']:.2f} %, image ratio 0.5)",
          file=sys.stderr, flush=True)
    if "sweep" in only:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            rows = sweep_adapter(img, text_store=txt, options=probe_options(device="cpu"), table=devnull.name)
        out["sweep"] = {"s": round(time.perf_counter() - t0, 2),
                        "heads": sum((r["image_only"] is not None) + (r["image_text"] is not None) for r in rows)}
        print(f"sweep    ours {out['sweep']['s']:.2f} s ({out['sweep']['heads']} heads)", file=sys.stderr, flush=True)
    return out


def bench_lads(img, tmp, prompts, x_test, y_test) -> dict:
    from vlmtools.heads.lads import lads_options, train_lads

    out_head = os.path.join(tmp, "lads")
    t0 = time.perf_counter()
    s = train_lads(img, out_head, options=lads_options(device="cpu"), text_store=prompts)
    out = {"s": round(time.perf_counter() - t0, 2), "best_epoch": s["best_epoch"],
           "acc": round(head_accuracy(out_head, x_test, y_test), 4)}
    print(f"lads     ours {out['s']:.2f} s (acc {100 * out['acc']:.2f} %, authors' settings)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
