#!/usr/bin/env python3
"""Ours beside the study's, cell by cell: the table every reproduction script ends with.

    python3 examples/compare.py STUDY.tsv OURS.tsv [-o TABLE.tsv] [--text TABLE.txt]

STUDY.tsv (one per study, examples/cub/study_NNN.tsv) holds the study's figures as printed, one line per
cell of its tables:  table  row  column  value  sd   (sd '-' where the study gives no ±).
OURS.tsv, written by the script, holds ours in the same unit:  table  row  column  value   — a cell
given on several lines is one run per line (seeds, draws): ours is their mean and ± their standard
deviation (ddof 0, as `vlmtools eval table` and `eval explanations`); a value '-' is a run without a
figure. In both, '#' lines are comments and a first line starting with "table" is a header.

Writes one TSV (columns: table, row, column, ours, ours_sd, runs, study, study_sd, difference; the
difference is ours - study) and prints the same as an aligned table per study table (stdout, and
--text FILE). The rows are the study's cells in its order, then ours that the study has no figure for.
A study cell without ours says '-'. Standard library only: runs wherever the scripts run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

COLUMNS = ["table", "row", "column", "ours", "ours_sd", "runs", "study", "study_sd", "difference"]


def read_tsv(path: str, fields: int) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the data lines; exits with file:line on a malformed one."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if not out and parts[0] == "table":  # the header line
                continue
            if len(parts) != fields:
                sys.exit(f"{path}:{lineno}: expected {fields} tab-separated fields, got {len(parts)}")
            out.append((lineno, parts))
    return out


def number(text: str, where: str) -> float | None:
    text = text.strip()
    if text in ("", "-"):
        return None
    try:
        return float(text)
    except ValueError:
        sys.exit(f"{where}: {text!r} is not a number")


def decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def read_study(path: str) -> tuple[dict, list, dict]:
    """({(table, row, column): (value, sd)}, the keys in order, {table: decimals of its figures})."""
    cells, order, digits = {}, [], {}
    for lineno, (table, row, column, value, sd) in read_tsv(path, 5):
        key = (table, row, column)
        if key in cells:
            sys.exit(f"{path}:{lineno}: {table} / {row} / {column} appears twice")
        cells[key] = (number(value, f"{path}:{lineno}"), number(sd, f"{path}:{lineno}"))
        order.append(key)
        digits.setdefault(table, decimals(value))
    return cells, order, digits


def read_ours(path: str) -> tuple[dict, list]:
    runs: dict = {}
    for lineno, (table, row, column, value) in read_tsv(path, 4):
        v = number(value, f"{path}:{lineno}")
        runs.setdefault((table, row, column), [])
        if v is not None:
            runs[(table, row, column)].append(v)
    return runs, list(runs)


def compare(study_path: str, ours_path: str) -> tuple[list[dict], dict]:
    study, order, digits = read_study(study_path)
    ours, ours_order = read_ours(ours_path)
    keys = []
    for table in dict.fromkeys([k[0] for k in order] + [k[0] for k in ours_order]):
        keys += [k for k in order if k[0] == table]
        keys += [k for k in ours_order if k[0] == table and k not in study]  # ours only, after its table
    rows = []
    for key in dict.fromkeys(keys):
        d = digits.get(key[0], 2)
        ref, ref_sd = study.get(key, (None, None))
        values = ours.get(key, [])
        mean = statistics.fmean(values) if values else None
        sd = statistics.pstdev(values) if len(values) > 1 else None
        fmt = lambda x, sign="": "-" if x is None else f"{x:{sign}.{d}f}"  # noqa: E731
        rows.append({"table": key[0], "row": key[1], "column": key[2], "ours": fmt(mean), "ours_sd": fmt(sd),
                     "runs": len(values), "study": fmt(ref), "study_sd": fmt(ref_sd),
                     "difference": fmt(None if mean is None or ref is None else mean - ref, "+")})
    return rows, digits


def aligned(rows: list[dict], title: str = "") -> str:
    """One block per table: row, column, ours (±sd), study (±sd), difference; columns padded."""
    def cell(value: str, sd: str) -> str:
        return value if sd == "-" else f"{value} ± {sd}"

    lines = [title] if title else []
    for table in dict.fromkeys(r["table"] for r in rows):
        block = [r for r in rows if r["table"] == table]
        grid = [["row", "column", "ours", "study", "difference"]] + [
            [r["row"], r["column"], cell(r["ours"], r["ours_sd"]) + (f" (n={r['runs']})" if r["runs"] > 1 else ""),
             cell(r["study"], r["study_sd"]), r["difference"]] for r in block]
        widths = [max(len(g[i]) for g in grid) for i in range(5)]
        lines += ["", table]
        for g in grid:
            lines.append("  ".join([g[0].ljust(widths[0]), g[1].ljust(widths[1])]
                                   + [g[i].rjust(widths[i]) for i in (2, 3, 4)]).rstrip())
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="the study's figures: table, row, column, value, sd")
    ap.add_argument("ours", help="ours: table, row, column, value (one line per run)")
    ap.add_argument("-o", "--output", help="write the TSV here")
    ap.add_argument("--text", help="also write the aligned table here")
    ap.add_argument("--title", default="", help="a first line for the aligned table")
    args = ap.parse_args(argv)
    rows, _ = compare(args.study, args.ours)
    text = aligned(rows, args.title)
    sys.stdout.write(text)
    if args.output:  # plain TSV: no field holds a tab or a newline
        write_atomic(args.output, "\t".join(COLUMNS) + "\n"
                     + "".join("\t".join(str(r[c]) for c in COLUMNS) + "\n" for r in rows))
    if args.text:
        write_atomic(args.text, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
