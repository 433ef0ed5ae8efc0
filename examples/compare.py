#!/usr/bin/env python3
"""Ours beside the study's, row by row: the table every reproduction script ends with.

    python3 examples/compare.py ROWS.tsv [-o TABLE.tsv]

ROWS.tsv (tab-separated, '#' lines are comments) has one line per (table, model, row, metric):

    table   model   row   metric   study   results

metric is acc1 or acc5 (keys of the summary row of `vlmtools eval -o FILE`, fractions); study is the
study's figure in percent, or '-' when it has none; results is one `vlmtools eval -o` file, or several separated by
',' (draws of a random control: ours is their mean, and the spread is their standard deviation).
Missing result files leave the row's ours empty. Prints each table (ours, study, ours - study) on
stdout and writes them all as one TSV. Standard library only: runs wherever the scripts run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

COLUMNS = ["table", "model", "row", "metric", "ours", "spread", "runs", "study", "difference"]


def ours(results: str, metric: str) -> tuple[float | None, float | None, int]:
    """(mean in percent, standard deviation or None, number of result files found)."""
    values = []
    for path in filter(None, results.split(",")):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                value = json.loads(fh.readline()).get(metric)  # the summary row of eval's NDJSON
            if value is not None:
                values.append(100 * value)
    if not values:
        return None, None, 0
    spread = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), spread, len(values)


def fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", help="ROWS.tsv: table, model, row, metric, study, results")
    ap.add_argument("-o", "--output", help="write the table as TSV here")
    args = ap.parse_args(argv)
    out_rows = []
    with open(args.rows, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 6:
                sys.exit(f"{args.rows}:{lineno}: expected 6 tab-separated fields, got {len(parts)}")
            table, model, row, metric, study, results = parts
            mean, spread, runs = ours(results, metric)
            ref = None if study.strip() in ("", "-") else float(study)
            diff = None if mean is None or ref is None else mean - ref
            out_rows.append({"table": table, "model": model, "row": row, "metric": metric, "ours": fmt(mean),
                             "spread": fmt(spread), "runs": runs, "study": fmt(ref), "difference": fmt(diff, True)})
    width = max([len(r["row"]) for r in out_rows] + [3])
    shown = None
    for r in out_rows:
        if (r["table"], r["metric"]) != shown:
            shown = (r["table"], r["metric"])
            print(f"\n{r['table']} ({r['metric']}, %)")
            print(f"{'model':<16}{'row':<{width + 2}}{'ours':>8}{'study':>8}{'diff':>8}")
        extra = f"  (mean of {r['runs']}, sd {r['spread']})" if r["runs"] > 1 else ""
        print(f"{r['model']:<16}{r['row']:<{width + 2}}{r['ours']:>8}{r['study']:>8}{r['difference']:>8}{extra}")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:  # plain TSV: no field holds a tab or a newline
            fh.write("\t".join(COLUMNS) + "\n")
            fh.writelines("\t".join(str(r[c]) for c in COLUMNS) + "\n" for r in out_rows)
        os.replace(tmp, args.output)
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
