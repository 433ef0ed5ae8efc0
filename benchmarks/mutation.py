"""Mutation testing of the scientific and data core, one module at a time (issue 24). Not run in CI: slow.

    benchmarks/mutation.sh [MODULE...]        # e.g. vlmtools/classify.py; none: every module configured
    benchmarks/mutation.sh --rerun MODULE     # after adding tests: rerun only the last run's survivors
    benchmarks/mutation.sh --resume MODULE    # go on with a run that was stopped: its mutants not yet tested

For each module, mutmut (3.x, the `mutation` extra) mutates that file only and runs the tests of its area
(pyproject.toml's [tool.vlmtools.mutation]; mutmut's shared settings are [tool.mutmut]). Each run happens in
a scratch copy of the checkout (.mutation/NAME/, ignored by git), so that modules never share mutmut's
state and the checkout is never touched. Prints one line per module:

    MODULE  generated  killed  timeout  survived  no-tests  equivalent  score

killed counts mutants a test failed on (or crashed on); a timeout (the mutant made a test hang) counts as caught too;
no-tests are mutants in code that none of the area's tests runs (they survive); equivalent are surviving
mutants that tests/MUTANTS.md declares equivalent or not worth a test, each with its reason. The score is
(killed + timeout) / (generated - equivalent). The surviving mutants' names are written to
.mutation/NAME/survivors.txt (`cd .mutation/NAME && mutmut show MUTANT` prints one's diff).

A module listed in [tool.vlmtools.mutation.functions] is measured on those functions only (mutant-name
globs, e.g. "vlmtools.store.xǁStoreWriterǁ*"): the parts the issue names, where the whole file's mutants
would not fit a session. --rerun copies the checkout's tests into the module's scratch copy and reruns
only the mutants that survived there (adding tests kills, never revives, a mutant), then scores the module
again from all its results. --resume tests the mutants a stopped run left "not checked" (and its scratch
copy's tests). --timeout-multiplier overrides mutmut's (CPU-time limit per mutant:
(its tests' time + timeout_constant) x multiplier x 2) for modules whose slow mutants would stall a run.
"""

from __future__ import annotations

import argparse
import fnmatch
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


def load_config() -> tuple[dict, dict[str, list[str]], dict[str, list[str]]]:
    """(mutmut's shared settings, {module path: its area's pytest arguments}, {module path: the mutant-name
    globs of the functions measured, where not all})."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mutation = data["tool"]["vlmtools"]["mutation"]
    return data["tool"]["mutmut"], mutation["modules"], mutation.get("functions", {})


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


def results(work: Path, env: dict, functions: list[str] | None) -> dict[str, str]:
    """{mutant name: mutmut's status} of a scratch copy, the measured functions' mutants only."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True, check=False).stdout
    status = {m: s.strip() for m, s in re.findall(r"^\s*([^\s:]+__mutmut_\d+): (.+)$", out, re.M)}
    if functions:
        status = {m: s for m, s in status.items() if any(fnmatch.fnmatchcase(m, g) for g in functions)}
    return status


def run_module(module: str, tests: list[str], shared: dict, children: int, functions: list[str] | None = None,
               rerun: bool = False, resume: bool = False) -> dict:
    name = module.removesuffix(".py").replace("/", ".")
    work = SCRATCH / name
    mutmut = [sys.executable, "-m", "mutmut"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VLMTOOLS_PROGRESS": "0"}
    if resume:
        if not (work / "mutants").exists():
            raise SystemExit(f"{module}: no stopped run in {work} to go on with")
        names = sorted(m for m, s in results(work, env, functions).items() if s == "not checked")
    elif rerun:
        if not (work / "survivors.txt").exists():
            raise SystemExit(f"{module}: no earlier run in {work} to rerun the survivors of")
        names = (work / "survivors.txt").read_text().split()
        shutil.rmtree(work / "tests")  # the checkout's tests, new ones included
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # which tests run which function: collected again, since changed tests may now reach more functions
        # (mutmut would collect it for new test names only)
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    else:
        names = functions or []
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
    started = time.monotonic()
    with open(work / "mutmut.log", "a" if rerun or resume else "w") as log:
        if names or not (rerun or resume):  # a whole-module run names no mutants: mutmut runs them all
            subprocess.run([*mutmut, "run", "--max-children", str(children), *names], cwd=work, env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=False)
        subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
    seconds = time.monotonic() - started
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    log_text = (work / "mutmut.log").read_text(errors="replace")
    if not stats_file.exists() or "failed to collect stats" in log_text or "Failed to run clean test" in log_text:
        # the area's tests fail without any mutant: a score would be meaningless
        raise SystemExit(f"{module}: the area's tests did not pass unmutated; see {work / 'mutmut.log'}")
    status = results(work, env, functions)
    count = {s: sum(1 for v in status.values() if v == s) for s in
             ("killed", "timeout", "segfault", "survived", "no tests", "suspicious", "skipped", "not checked")}
    surviving = sorted(m for m, s in status.items() if s in ("survived", "no tests"))
    (work / "survivors.txt").write_text("".join(f"{m}\n" for m in surviving))
    equivalent = len(set(surviving) & declared_equivalent())
    caught = count["killed"] + count["timeout"] + count["segfault"]  # a test process that crashed caught it
    measured = len(status) - count["skipped"] - count["not checked"] - equivalent
    return {"module": module, "generated": len(status), "killed": count["killed"] + count["segfault"],
            "timeout": count["timeout"],
            "survived": count["survived"], "no_tests": count["no tests"], "suspicious": count["suspicious"],
            "not_checked": count["not checked"], "equivalent": equivalent,
            "score": caught / measured if measured else float("nan"), "seconds": round(seconds),
            "functions": functions or None, "rerun": rerun, "resume": resume, "survivors": surviving}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module paths (default: every one configured)")
    parser.add_argument("--children", type=int, default=1, help="mutmut's parallel test processes (default 1)")
    parser.add_argument("--rerun", action="store_true", help="rerun only the last run's survivors, with the "
                        "checkout's tests (after adding tests for them)")
    parser.add_argument("--resume", action="store_true", help="go on with a stopped run: test the mutants it "
                        "left not checked")
    parser.add_argument("--timeout-multiplier", type=float, help="override mutmut's timeout_multiplier")
    args = parser.parse_args()
    shared, areas, functions = load_config()
    if args.timeout_multiplier is not None:
        shared = {**shared, "timeout_multiplier": args.timeout_multiplier}
    unknown = [m for m in args.modules if m not in areas]
    if unknown:
        raise SystemExit(f"not configured in [tool.vlmtools.mutation]: {', '.join(unknown)} "
                         f"(configured: {', '.join(areas)})")
    header = f"{'module':32} {'generated':>9} {'killed':>6} {'timeout':>7} {'survived':>8} {'no-tests':>8} " \
             f"{'equivalent':>10} {'score':>6} {'time':>6}"
    print(header, flush=True)
    rows = []
    for module in args.modules or list(areas):
        row = run_module(module, areas[module], shared, args.children, functions.get(module), args.rerun,
                         args.resume)
        rows.append(row)
        print(f"{module:32} {row['generated']:>9} {row['killed']:>6} {row['timeout']:>7} {row['survived']:>8} "
              f"{row['no_tests']:>8} {row['equivalent']:>10} {row['score']:>6.1%} {row['seconds']:>5}s", flush=True)
    SCRATCH.mkdir(exist_ok=True)
    (SCRATCH / "scores.jsonl").open("a").write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
