"""Method x domain accuracy tables over several runs (seeds): study 004's Table 1.

`vlmtools eval table NAME=PRED.jsonl ... --by domain`: every predictions file is one run of the method
NAME (repeat NAME once per seed); a cell is the mean top-1 over a method's runs on the images whose
manifest key (--by) has the column's value, with the standard deviation over runs (numpy's np.std,
ddof=0, as the study's "(± ...)"; a method with one run, e.g. zero-shot, has no ±).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

from vlmtools import formats
from vlmtools.errors import BadInput

ALL = "all"


def parse_runs(runs: Sequence[str]) -> list[tuple[str, str]]:
    """["NAME=FILE", ...] -> [(name, file)]."""
    out = []
    for run in runs:
        name, sep, path = run.partition("=")
        if not sep or not name or not path:
            raise BadInput(f"{run!r}: expected NAME=PREDICTIONS.jsonl (e.g. lare=preds/lare-seed0.jsonl)")
        out.append((name, path))
    if not out:
        raise BadInput("no runs given: pass NAME=PREDICTIONS.jsonl arguments")
    return out


def parse_columns(columns: Sequence[str]) -> list[tuple[str, str]]:
    """["LABEL=VALUE", ...] -> [(label, value)]; a bare VALUE is its own label."""
    out = []
    for col in columns:
        label, sep, value = col.partition("=")
        if not sep:
            label = value = col
        if not label or not value:
            raise BadInput(f"--column {col!r}: expected LABEL=VALUE (e.g. in-domain=photo)")
        out.append((label, value))
    return out


def run_accuracies(path: str, by: str | None) -> dict[str, float]:
    """{column value: top-1} of one predictions file: per value of ``by`` and "all"."""
    from vlmtools.evaluate import read_labelled

    records = read_labelled(path)
    if by is not None and not any(by in r for r in records):
        raise BadInput(f"{path}: no prediction has the key {by!r} (the manifest key to split by)")
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        for key in (ALL, str(r.get(by, "-")) if by is not None else None):
            if key is not None:
                hits[key][0] += r["pred"] == r["label"]
                hits[key][1] += 1
    return {k: c / n for k, (c, n) in hits.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def build_table(runs: Sequence[str], *, by: str | None = None, columns: Sequence[str] = ()) -> dict:
    """{"columns": [label], "rows": [{"method", "runs", "cells": {label: {"mean", "std", "n"} | None}}]}.
    Accuracies are fractions. Columns: --column LABEL=VALUE in order, else every value of ``by`` (sorted),
    else "all"."""
    pairs = parse_runs(runs)
    cols = parse_columns(columns)
    per_method: dict[str, list[dict[str, float]]] = {}
    for name, path in pairs:
        per_method.setdefault(name, []).append(run_accuracies(path, by))
    if not cols:
        values = sorted({v for accs in per_method.values() for a in accs for v in a if v != ALL}) if by else []
        cols = [(v, v) for v in values] or [(ALL, ALL)]
    elif by is None and any(v != ALL for _, v in cols):
        raise BadInput("--column VALUE needs --by KEY (the manifest key whose values are the columns)")
    rows = []
    for name, accs in per_method.items():
        cells = {}
        for label, value in cols:
            vals = [a[value] for a in accs if value in a]
            if vals and len(vals) < len(accs):
                raise BadInput(f"method {name!r}: only {len(vals)} of its {len(accs)} runs have images with "
                               f"{by}={value}; the runs must be predictions for the same images")
            m, s = mean_std(vals) if vals else (None, None)
            cells[label] = {"mean": m, "std": s, "n": len(vals)} if vals else None
        rows.append({"method": name, "runs": len(accs), "cells": cells})
    if all(row["cells"][label] is None for row in rows for label, _ in cols):
        shown = ", ".join(v for _, v in cols)
        raise BadInput(f"no run has images with {by} = {shown}")
    return {"by": by, "columns": [label for label, _ in cols], "rows": rows}


def cell_text(cell: dict | None) -> str:
    """"87.01 (±0.04)" in percent; one run: "87.01"; no images: "-"."""
    if cell is None:
        return "-"
    if cell["n"] == 1:
        return f"{100 * cell['mean']:.2f}"
    return f"{100 * cell['mean']:.2f} (±{100 * cell['std']:.2f})"


def write_table(table: dict, output="-", *, json_lines: bool = False) -> None:
    """TSV (method, runs, one column per label; cells as cell_text) or NDJSON (one object per method)."""
    with formats.open_output(output) as fh:
        if json_lines:
            for row in table["rows"]:
                fh.write(formats.dumps_line({"method": row["method"], "runs": row["runs"], "by": table["by"],
                                             "cells": row["cells"]}))
            return
        fh.write("\t".join(["method", "runs", *table["columns"]]) + "\n")
        for row in table["rows"]:
            fh.write("\t".join([row["method"], str(row["runs"]),
                                *(cell_text(row["cells"][c]) for c in table["columns"])]) + "\n")


def table_file(runs: Sequence[str], *, by: str | None = None, columns: Sequence[str] = (), output="-",
               json_lines: bool = False) -> dict:
    """`vlmtools eval table`: every input read and checked before anything is written."""
    table = build_table(runs, by=by, columns=columns)
    write_table(table, output, json_lines=json_lines)
    return table
