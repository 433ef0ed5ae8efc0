#!/usr/bin/env python
"""Study 004's few-shot curve (its figure 3) in the offline world: top-1 vs shots per class, LARE vs the
linear probe, on held-out photos (in-domain) and paintings (out-of-domain); micro CLIP.

    python examples/synth/lare_fewshot.py [OUT_DIR] [--shots 1,2,4,8,16] [--seeds 3] [--samples 10]

Uses the world and store of examples/synth/lare.sh in OUT_DIR (default lare-synth) when they are there,
else makes them. Writes OUT_DIR/fewshot.tsv (shots, method, runs, in/out-of-domain mean and std, %) and
OUT_DIR/fewshot.png. The probe is `train lare --samples 0` (no boxes: the `train probe` step alone, with
--shots). Runs in-process (the library calls behind the commands) to spare 60 process starts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="lare-synth")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    shots = [int(s) for s in args.shots.split(",")]
    vlm = [sys.executable, "-m", "vlmtools"]
    if not (out / "world" / "world.json").exists():
        subprocess.run(vlm + ["synth", "make", str(out / "world"), "--classes", "20", "--per-class", "60",
                              "--domain", "both", "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    if not (out / "store" / "info.json").exists():
        subprocess.run(vlm + ["embed", "images", str(out / "world" / "manifest.jsonl"), "-o", str(out / "store"),
                              "--model", "vlmtools-micro", "--device", "cpu"], check=True)

    from vlmtools.console import set_quiet
    from vlmtools.heads.lare import train_lare
    from vlmtools.heads.linear import probe_options
    from vlmtools.heads.predict import classify_with_head
    from vlmtools.tables import build_table

    set_quiet(True)
    work = out / "fewshot"
    desc = out / "world" / "descriptors.jsonl"
    rows = []
    for n in shots:
        runs = []
        for seed in range(args.seeds):
            for method, k in (("probe", 0), ("LARE", args.samples)):
                head = work / f"{method}-shots{n}-s{seed}"
                options = probe_options(seed=seed, device="cpu")  # train lare's defaults
                train_lare(out / "store", head, options=options, where=["split=train", "domain=photo"],
                           samples=k, shots=n, descriptors=desc)
                pred = work / f"{head.name}.jsonl"
                classify_with_head(out / "store", head, pred, where=["split=test"], device="cpu")
                runs.append(f"{method}={pred}")
        table = build_table(runs, by="domain", columns=["in-domain=photo", "out-of-domain=painting"])
        for row in table["rows"]:
            c_in, c_out = row["cells"]["in-domain"], row["cells"]["out-of-domain"]
            rows.append((n, row["method"], row["runs"], 100 * c_in["mean"], 100 * c_in["std"],
                         100 * c_out["mean"], 100 * c_out["std"]))
        print(f"shots {n}: " + ", ".join(f"{r[1]} {r[3]:.2f}/{r[5]:.2f}" for r in rows[-2:]), file=sys.stderr)

    from vlmtools import formats

    with formats.open_output(out / "fewshot.tsv") as fh:
        fh.write("shots\tmethod\truns\tin_domain\tin_domain_std\tout_of_domain\tout_of_domain_std\n")
        for r in rows:
            fh.write("\t".join([str(r[0]), r[1], str(r[2])] + [f"{v:.2f}" for v in r[3:]]) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=100)
    for ax, col, title in zip(fig.subplots(1, 2), (3, 5), ("in-domain (photos)", "out-of-domain (paintings)")):
        for method, style in (("probe", "o--"), ("LARE", "s-")):
            pts = [r for r in rows if r[1] == method]
            ax.errorbar([r[0] for r in pts], [r[col] for r in pts], yerr=[r[col + 1] for r in pts], fmt=style,
                        capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, labels=[str(s) for s in shots])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 %")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"LARE vs probe, micro CLIP, mean ± std over {args.seeds} seeds", y=1.03)
    with formats.atomic_path(out / "fewshot.png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    sys.stdout.write((out / "fewshot.tsv").read_text())


if __name__ == "__main__":
    main()
