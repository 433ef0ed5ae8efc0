"""`vlmtools demo`: the offline world end to end, as the shell pipeline a user would write.

The steps are plain `vlmtools` argument lists, so the same pipeline is written to OUT/pipeline.sh for
users to read and rerun; the CLI layer executes them in one process (one torch import, not ten).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vlmtools import formats

DEMO_MODEL = ["--model", "vlmtools-micro"]
SCRIPT_HEADER = "#!/bin/sh\n# The pipeline `vlmtools demo` ran, as shell commands (run from this directory).\n"
# Everything a demo writes into OUT: a second run into OUT removes these and nothing else.
DEMO_ENTRIES = ("world", "store", "predictions", "eval", "explanations", "descriptors", "pipeline.sh",
                "results.json", "results.txt", "world.summary.json")


@dataclass
class Step:
    title: str
    argv: list[str]
    stdout: str | None = None   # file (relative to OUT) that receives the command's stdout
    checks: list[str] = field(default_factory=list)

    def shell(self) -> str:
        line = "vlmtools " + " ".join(shlex.quote(a) for a in self.argv)
        return line + (f" > {shlex.quote(self.stdout)}" if self.stdout else "")


# (name, classify arguments): what the demo compares
METHODS = [
    ("clip (class name)", "clip.jsonl", ["--method", "clip", "--classes", "world/classes.txt", "--templates", "photo"]),
    ("cbd (oracle descriptors)", "cbd.jsonl",
     ["--method", "cbd", "--descriptors", "world/descriptors.jsonl", "--text-store", "store/descriptors",
      "--explain-true"]),  # the wrong answers are explained beside the true class's descriptors
    ("cbd, object descriptors only", "cbd-object.jsonl",
     ["--method", "cbd", "--descriptors", "world/descriptors.jsonl", "--text-store", "store/descriptors",
      "--background", "exclude"]),
    # WaffleCLIP's control: random words instead of descriptors (text embedded on the fly, cached).
    ("waffle (random words)", "waffle.jsonl", ["--method", "cbd", "--descriptors", "descriptors/waffle.jsonl",
                                               "--no-cache"]),
]


def pipeline(classes: int, per_class: int, seed: int, device: str) -> list[Step]:
    dev = ["--device", device]
    steps = [
        # --force: rerunning pipeline.sh where it lies rebuilds the same (byte-identical) world
        Step("build the world", ["synth", "make", "world", "--classes", str(classes), "--per-class", str(per_class),
                                 "--domain", "both", "--seed", str(seed), "--force"], stdout="world.summary.json"),
        Step("embed the images", ["embed", "images", "world/manifest.jsonl", "-o", "store/images", *DEMO_MODEL, *dev]),
        Step("embed the descriptors", ["embed", "text", "world/descriptors.jsonl", "-o", "store/descriptors",
                                       *DEMO_MODEL, *dev]),
        Step("random-word descriptors (no LLM)", ["describe", "world/classes.txt", "--style", "waffle",
                                                  "-o", "descriptors/waffle.jsonl"]),
    ]
    for name, out, args in METHODS:
        steps.append(Step(f"classify: {name}", ["classify", "store/images", *args], stdout=f"predictions/{out}"))
    for _, out, _ in METHODS:
        steps.append(Step(f"evaluate {out}", ["eval", f"predictions/{out}", "--by", "domain",
                                              "-o", f"eval/{out}"]))
    steps.append(Step("compare clip with cbd", ["eval", "compare", "predictions/clip.jsonl", "predictions/cbd.jsonl",
                                                "-o", "eval/compare.jsonl"]))
    steps.append(Step("explain three wrong answers", ["explain", "text", "predictions/cbd.jsonl", "--wrong",
                                                      "--limit", "3", "--plots", "explanations"],
                      stdout="explanations/wrong.txt"))
    return steps


def prepare_out(out: Path, classes: int, per_class: int) -> None:
    """Check the arguments and OUT before any work. OUT must be new, empty, or hold an earlier demo, whose
    files (and only those) are then replaced: a second `vlmtools demo OUT` just runs again."""
    import shutil

    from vlmtools.console import info
    from vlmtools.errors import BadInput
    from vlmtools.synth.make import check_arguments

    check_arguments(classes, per_class, "both", 64, 0.3)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: is a file; the demo needs a directory")
    if out.exists() and any(out.iterdir()):
        script = out / "pipeline.sh"
        is_demo = (script.is_file() and script.read_text(errors="replace").startswith(SCRIPT_HEADER)
                   and (out / "world" / "world.json").is_file())
        if not is_demo:
            raise BadInput(f"{out} is not empty and holds no earlier demo (no pipeline.sh written by vlmtools "
                           f"demo and world/world.json); name a new or empty directory (nothing was touched)")
        info(f"{out} holds an earlier demo: replacing its files (other files there stay)")
        for name in DEMO_ENTRIES:
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_script(out: Path, steps: list[Step]) -> Path:
    text = (SCRIPT_HEADER + "set -e\n"
            "mkdir -p predictions eval explanations descriptors\n" + "".join(f"# {s.title}\n{s.shell()}\n" for s in steps))
    path = out / "pipeline.sh"
    with formats.atomic_path(path) as tmp:
        tmp.write_text(text)
    path.chmod(0o755)
    return path


def results_table(out: Path) -> tuple[list[dict], str]:
    """Rows (method, acc1, acc5, per domain) from the eval NDJSON files, and a plain-text table."""
    rows = []
    for name, pred, _ in METHODS:
        lines = [rec for _, rec in formats.iter_jsonl(out / "eval" / pred)]
        report = lines[0]
        domains = {r["value"]: r for r in lines if r.get("kind") == "group" and r.get("by") == "domain"}
        rows.append({"method": name, "n": report["n"], "acc1": report["acc1"], "acc5": report.get("acc5"),
                     "photo": domains.get("photo", {}).get("acc1"),
                     "painting": domains.get("painting", {}).get("acc1")})
    compare = next(rec for _, rec in formats.iter_jsonl(out / "eval" / "compare.jsonl"))

    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.1f}"

    lines = [f"{'method':<30} {'n':>5} {'top-1':>6} {'top-5':>6} {'photo':>6} {'paint':>6}"]
    lines += [f"{r['method']:<30} {r['n']:>5} {pct(r['acc1'])} {pct(r['acc5'])} {pct(r['photo'])} {pct(r['painting'])}"
              for r in rows]
    mc = compare["mcnemar"]
    lines.append(f"clip vs cbd: {compare['only_b_correct']} images right only with cbd, {compare['only_a_correct']} "
                 f"only with clip; McNemar exact p = {mc['p_exact']:.3g}")
    return rows, "\n".join(lines)
