"""Mutation testing of the scientific and data core, one module at a time (issue 24). Not run in CI: slow.

    benchmarks/mutation.sh [MODULE...]        # e.g. vlmtools/classify.py; none: every module configured

For each module, mutmut (3.x, the `mutation` extra) mutates that file only and runs the tests of its area
(pyproject.toml's [tool.vlmtools.mutation]; mutmut's shared settings are [tool.mutmut]). Each run happens in
a scratch copy of the checkout (.mutation/NAME/, ignored by git), so that modules never share mutmut's
state and the checkout is never touched. Prints one line per module:

    MODULE  generated  killed  timeout  survived  no-tests  equivalent  score

killed counts mutants a test failed on; a timeout (the mutant made a test hang) counts as caught too;
no-tests are mutants in code that none of the area's tests runs (they survive); equivalent are surviving
mutants that tests/MUTANTS.md declares equivalent or not worth a test, each with its reason. The score is
(killed + timeout) / (generated - equivalent). The surviving mutants' names are written to
.mutation/NAME/survivors.txt (`cd .mutation/NAME && mutmut show MUTANT` prints one's diff).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"
COPIED = ("vlmtools", "tests", "pyproject.toml", "README.md", "man")


def load_config() -> tuple[dict, dict[str, list[str]]]:
    """(mutmut's shared settings, {module path: its area's pytest arguments})."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return data["tool"]["mutmut"], data["tool"]["vlmtools"]["mutation"]["modules"]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def scratch_pyproject(text: str, settings: dict) -> str:
    """pyproject.toml with its [tool.mutmut] table replaced by ``settings``."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip() == "[tool.mutmut]"
        if not skipping:
            kept.append(line)
    table = "".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items())
    return "".join(kept).rstrip("\n") + "\n\n[tool.mutmut]\n" + table


def declared_equivalent() -> set[str]:
    """Mutant names that tests/MUTANTS.md declares equivalent or not worth a test (`name` in a table row)."""
    path = ROOT / "tests" / "MUTANTS.md"
    if not path.exists():
        return set()
    return set(re.findall(r"^\|\s*`([\w.]+__mutmut_\d+)`", path.read_text(encoding="utf-8"), re.M))


def run_module(module: str, tests: list[str], shared: dict, children: int) -> dict:
    name = module.removesuffix(".py").replace("/", ".")
    work = SCRATCH / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for item in COPIED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, work / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, work / item)
    settings = {**shared, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}
    (work / "pyproject.toml").write_text(
        scratch_pyproject((ROOT / "pyproject.toml").read_text(encoding="utf-8"), settings), encoding="utf-8")
    mutmut = [sys.executable, "-m", "mutmut"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VLMTOOLS_PROGRESS": "0"}
    started = time.monotonic()
    with open(work / "mutmut.log", "w") as log:
        subprocess.run([*mutmut, "run", "--max-children", str(children)], cwd=work, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=False)
        subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
    seconds = time.monotonic() - started
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    log_text = (work / "mutmut.log").read_text(errors="replace")
    if not stats_file.exists() or "failed to collect stats" in log_text or "Failed to run clean test" in log_text:
        # the area's tests fail without any mutant: a score would be meaningless
        raise SystemExit(f"{module}: the area's tests did not pass unmutated; see {work / 'mutmut.log'}")
    stats = json.loads(stats_file.read_text())
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                             text=True, check=False).stdout
    status = dict(re.findall(r"^\s*([\w.]+__mutmut_\d+): (.+)$", results, re.M))
    surviving = sorted(m for m, s in status.items() if s.strip() in ("survived", "no tests"))
    (work / "survivors.txt").write_text("".join(f"{m}\n" for m in surviving))
    equivalent = len(set(surviving) & declared_equivalent())
    caught = stats["killed"] + stats["timeout"]
    measured = stats["total"] - stats["skipped"] - equivalent
    return {"module": module, "generated": stats["total"], "killed": stats["killed"], "timeout": stats["timeout"],
            "survived": stats["survived"], "no_tests": stats["no_tests"], "suspicious": stats["suspicious"],
            "equivalent": equivalent, "score": caught / measured if measured else float("nan"),
            "seconds": round(seconds), "survivors": surviving}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module paths (default: every one configured)")
    parser.add_argument("--children", type=int, default=1, help="mutmut's parallel test processes (default 1)")
    args = parser.parse_args()
    shared, areas = load_config()
    unknown = [m for m in args.modules if m not in areas]
    if unknown:
        raise SystemExit(f"not configured in [tool.vlmtools.mutation]: {', '.join(unknown)} "
                         f"(configured: {', '.join(areas)})")
    header = f"{'module':32} {'generated':>9} {'killed':>6} {'timeout':>7} {'survived':>8} {'no-tests':>8} " \
             f"{'equivalent':>10} {'score':>6} {'time':>6}"
    print(header, flush=True)
    rows = []
    for module in args.modules or list(areas):
        row = run_module(module, areas[module], shared, args.children)
        rows.append(row)
        print(f"{module:32} {row['generated']:>9} {row['killed']:>6} {row['timeout']:>7} {row['survived']:>8} "
              f"{row['no_tests']:>8} {row['equivalent']:>10} {row['score']:>6.1%} {row['seconds']:>5}s", flush=True)
    SCRATCH.mkdir(exist_ok=True)
    (SCRATCH / "scores.jsonl").open("a").write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
