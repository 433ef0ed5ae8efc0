"""Scores of a predictions file: top-1/top-5, mean per-class recall, per-class accuracy, grouped tables;
paired comparison of two files with McNemar's test; confusion-matrix and per-class plots.

Accuracies are fractions (0..1) in the NDJSON output, named as CLIP_benchmark names them (acc1, acc5,
mean_per_class_recall) and rounded to 4 decimals (0.01 %), and percentages in the tables on stderr.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence


from vlmtools import formats
from vlmtools.console import info
from vlmtools.errors import BadInput

MISSING = "-"  # group value of a record that lacks the --by key


def hit_at(rec: dict, k: int) -> bool:
    return any(t["class"] == rec["label"] for t in rec["topk"][:k])


EVAL_FORMAT = formats.EVAL_FORMAT
COMPARE_FORMAT = formats.COMPARE_FORMAT
DIGITS = 4  # fractions in the output: 0.01 % steps, finer than any test set this tool meets resolves


def summarize(records: Sequence[dict], *, per_class: bool = True) -> dict:
    """Counts and accuracies of labelled predictions. acc5 is None when some prediction lists fewer
    than 5 classes (fewer than 5 classes, or classify -k below 5)."""
    n = len(records)
    correct = sum(r["pred"] == r["label"] for r in records)
    has_top5 = all(len(r["topk"]) >= 5 for r in records)
    top5 = sum(hit_at(r, 5) for r in records) / n if has_top5 and n else None
    by_class: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, top-1 correct, top-5 correct
    for r in records:
        row = by_class[r["label"]]
        row[0] += 1
        row[1] += r["pred"] == r["label"]
        row[2] += has_top5 and hit_at(r, 5)
    recalls = [c / m for m, c, _ in by_class.values()]
    out = {
        "n": n,
        "correct": correct,
        "classes": len(by_class),
        "acc1": correct / n if n else None,
        "acc5": top5,
        "mean_per_class_recall": sum(recalls) / len(recalls) if recalls else None,
    }
    if per_class:
        out["per_class"] = [
            {"class": cls, "n": m, "correct": c, "acc1": c / m, "acc5": c5 / m if has_top5 else None}
            for cls, (m, c, c5) in sorted(by_class.items())]
    return out


def evaluate(records: Sequence[dict], by: Sequence[str] = ()) -> dict:
    """The summary of all records, plus one (per-class-free) summary per value of each ``by`` key."""
    result = summarize(records)
    if result["acc5"] is None:
        result["acc5_note"] = "omitted: some predictions list fewer than 5 classes"
    groups: dict[str, dict] = {}
    for key in by:
        if not any(key in r for r in records):
            keys = sorted({k for r in records for k in r} - set(formats.PREDICTION_KEYS))
            raise BadInput(f"--by {key}: no prediction has this key (keys available: {', '.join(keys) or 'none'})")
        split: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            split[str(r.get(key, MISSING))].append(r)
        groups[key] = {value: summarize(rs, per_class=False) for value, rs in sorted(split.items())}
    if groups:
        result["groups"] = groups
    return result


def confusion_matrix(records: Sequence[dict]):
    """(class names, (C, C) int matrix of counts: row = true class, column = predicted class).
    Classes: the labels, sorted, then predicted classes that are no label."""
    import numpy as np

    labels = sorted({r["label"] for r in records})
    classes = labels + sorted({r["pred"] for r in records} - set(labels))
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, ([index[r["label"]] for r in records], [index[r["pred"]] for r in records]), 1)
    return classes, matrix


# ----------------------------------------------------------------------------- paired comparison

def mcnemar(only_a: int, only_b: int) -> dict:
    # scipy.stats.binomtest would do the exact p in one call, but scipy is no dependency and this is exact
    """McNemar's test on the discordant pairs: exact two-sided binomial p (valid for any count) and the
    continuity-corrected chi-square (the usual large-sample form)."""
    n = only_a + only_b
    if n == 0:
        return {"discordant": 0, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    p_exact = min(1.0, 2 * tail / (1 << n))  # int / int is correctly rounded even for huge n
    chi2 = (abs(only_a - only_b) - 1) ** 2 / n if abs(only_a - only_b) > 1 else 0.0
    return {"discordant": n, "p_exact": p_exact, "chi2": chi2, "p_chi2": math.erfc(math.sqrt(chi2 / 2))}


def compare(a: Sequence[dict], b: Sequence[dict], names: tuple[str, str] = ("A", "B")) -> tuple[dict, list[dict]]:
    """Pair two labelled predictions files by image id -> (summary, rows where the predictions differ)."""
    from vlmtools.console import warn

    b_by_id = {r["id"]: r for r in b}
    pairs = [(r, b_by_id[r["id"]]) for r in a if r["id"] in b_by_id]
    if not pairs:
        raise BadInput(f"{names[0]} and {names[1]} share no image id; they are predictions for different images")
    if len(pairs) < max(len(a), len(b)):
        warn(f"comparing the {len(pairs)} images present in both ({names[0]}: {len(a)}, {names[1]}: {len(b)})")
    counts = Counter()
    diff = []
    for ra, rb in pairs:
        if ra["label"] != rb["label"]:
            raise BadInput(f"image {ra['id']!r}: label {ra['label']!r} in {names[0]} but {rb['label']!r} in {names[1]}")
        ca, cb = ra["pred"] == ra["label"], rb["pred"] == rb["label"]
        counts[(ca, cb)] += 1
        if ra["pred"] != rb["pred"]:
            row = {"id": ra["id"], "path": ra.get("path"), "label": ra["label"],
                   "pred_a": ra["pred"], "pred_b": rb["pred"], "correct_a": ca, "correct_b": cb}
            diff.append({k: v for k, v in row.items() if v is not None})
    n = len(pairs)
    only_a, only_b = counts[(True, False)], counts[(False, True)]
    acc_a = (counts[(True, True)] + only_a) / n
    acc_b = (counts[(True, True)] + only_b) / n
    summary = {
        "n": n, "a": {"name": names[0], "acc1": acc_a}, "b": {"name": names[1], "acc1": acc_b},
        "difference": acc_b - acc_a,
        "both_correct": counts[(True, True)], "only_a_correct": only_a, "only_b_correct": only_b,
        "both_wrong": counts[(False, False)], "predictions_differ": len(diff),
        "mcnemar": mcnemar(only_a, only_b),
    }
    return summary, diff


# ----------------------------------------------------------------------------- reports

def rounded(obj, digits: int = DIGITS):
    """Floats rounded for output (counts stay exact; p-values keep 3 significant digits)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: (float(f"{v:.3g}") if k.startswith("p_") and isinstance(v, float) else rounded(v, digits))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def provenance(path, records: Sequence[dict]) -> dict:
    """Where a result comes from: the predictions file, and the method, model and store that classify
    recorded in every line (omitted when the lines disagree or lack them), and this vlmtools."""
    import vlmtools

    out = {"predictions": formats.source_name(path)}
    for key in formats.RUN_KEYS:
        values = {str(r.get(key)) for r in records}
        if len(values) == 1 and records and records[0].get(key) is not None:
            out[key] = records[0][key]
    out["vlmtools_version"] = vlmtools.__version__
    return out


def result_lines(result: dict, origin: dict, per_class: bool = False) -> list[dict]:
    """The NDJSON rows of `vlmtools eval`: the summary with its provenance, one row per group value of
    each --by key, and with ``per_class`` one row per class."""
    head = {"format": EVAL_FORMAT, "kind": "summary", **{k: v for k, v in result.items()
                                                          if k not in ("per_class", "groups")}, **origin}
    rows = [head]
    for key, groups in result.get("groups", {}).items():
        rows += [{"kind": "group", "by": key, "value": value, **g} for value, g in groups.items()]
    if per_class:
        rows += [{"kind": "class", **row} for row in result["per_class"]]
    return [rounded(r) for r in rows]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


# Table titles, headers and cells given as str are parsed as rich markup; file names, class names, ids and
# group values are user data, so they go in as Text (a name like "img[draft]" or "[/bold]" stays as written).

def report(result: dict, title: str = "") -> None:
    """The summary (and grouped) tables on stderr."""
    from rich.table import Table
    from rich.text import Text

    if title:  # a line of its own, never broken (a file path stays whole for grep), not the table's title
        info(title)
    table = Table()
    for col in ("images", "classes", "top-1 %", "top-5 %", "mean per-class recall %"):
        table.add_column(col, justify="right")
    table.add_row(str(result["n"]), str(result["classes"]), _pct(result["acc1"]), _pct(result["acc5"]),
                  _pct(result["mean_per_class_recall"]))
    info(table)
    for key, groups in result.get("groups", {}).items():
        gt = Table(title=Text(f"by {key}"), title_justify="left")
        gt.add_column(Text(key), justify="left")
        for col in ("images", "classes", "top-1 %", "top-5 %", "mean per-class recall %"):
            gt.add_column(col, justify="right")
        for value, g in groups.items():
            gt.add_row(Text(value), str(g["n"]), str(g["classes"]), _pct(g["acc1"]), _pct(g["acc5"]),
                       _pct(g["mean_per_class_recall"]))
        info(gt)


def report_compare(summary: dict, diff: Sequence[dict], show: int = 10) -> None:
    from rich.table import Table
    from rich.text import Text

    a, b = summary["a"]["name"], summary["b"]["name"]
    # the names head no column (long file names would squeeze the numbers): A and B, named above it
    info(f"A = {a}\nB = {b}\n{summary['n']} images in both")
    t = Table()
    for col in ("A top-1 %", "B top-1 %", "B - A", "only A right", "only B right", "McNemar p (exact)"):
        t.add_column(Text(col), justify="right", no_wrap=col[0] in "AB")
    m = summary["mcnemar"]
    t.add_row(_pct(summary["a"]["acc1"]), _pct(summary["b"]["acc1"]), f"{100 * summary['difference']:+.2f}",
              str(summary["only_a_correct"]), str(summary["only_b_correct"]), f"{m['p_exact']:.3g}")
    info(t)
    verdict = "is unlikely to be chance (p < 0.05)" if m["p_exact"] < 0.05 else "could well be chance (p >= 0.05)"
    info(f"the difference {verdict}; {summary['predictions_differ']} images get different predictions")
    if diff and show > 0:
        d = Table(title=f"first {min(show, len(diff))} disagreements", title_justify="left")
        for col in ("id", "label", "A", "B"):
            d.add_column(Text(col))
        for row in diff[:show]:
            d.add_row(Text(row["id"]), Text(row["label"]),
                      Text(row["pred_a"], style="green" if row["correct_a"] else ""),
                      Text(row["pred_b"], style="green" if row["correct_b"] else ""))
        info(d)


def write_per_class_csv(path, result: dict) -> None:
    with formats.open_output(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["class", "n", "correct", "acc1", "acc5"])
        for row in result["per_class"]:
            top5 = row["acc5"]
            writer.writerow([row["class"], row["n"], row["correct"], f"{row['acc1']:.{DIGITS}f}",
                             "" if top5 is None else f"{top5:.{DIGITS}f}"])


# ----------------------------------------------------------------------------- plots

# A plot's PNG says what it shows in its text chunks: "Title" (its title, e.g. the method, model, n and
# predictions file) and "Description" (the kind of plot, PLOT_KINDS), which `vlmtools report` reads to
# caption it and file it under its section.
PLOT_KINDS = ("eval", "train", "explain", "map")


def _save(fig, path: Path, *, kind: str | None = None) -> None:
    titles = [t.get_text() for ax in fig.axes for t in (ax.title,) if t.get_text()]
    metadata = {"Software": "vlmtools", **({"Title": " / ".join(titles).replace("\n", " ")} if titles else {}),
                **({"Description": kind} if kind else {})}
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight", metadata=metadata)


KEY_ABOVE = 60  # classes beyond which the confusion plot numbers its axes and adds a class key


def plot_confusion(path, classes: Sequence[str], matrix) -> None:
    _save(confusion_figure(classes, matrix), Path(path))


def confusion_figure(classes: Sequence[str], matrix):
    """Row-normalized confusion matrix (each row: where the images of one true class went); above
    KEY_ABOVE classes the axes are numbered and a class key stands beside the matrix."""
    import numpy as np
    from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display needed

    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(4.0, 0.22 * n + 2), 24.0)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= KEY_ABOVE:
        # parse_math=False: a "$" in a class name is text, not matplotlib mathtext
        ax.set_xticks(range(n), labels=classes, rotation=90, fontsize=7, parse_math=False)
        ax.set_yticks(range(n), labels=classes, fontsize=7, parse_math=False)
    else:  # names would be unreadable on the axes: numbers there, and a class key beside the matrix
        step = max(1, n // 40)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks, labels=[str(i) for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, labels=[str(i) for i in ticks], fontsize=6)
        per_column = int(side * 72 / 11)  # lines of 8 pt text that fit the figure's height
        columns = [classes[i:i + per_column] for i in range(0, n, per_column)]
        for c, names in enumerate(columns):
            fig.text(0.98 + c * 3.2 / (side + 1), 0.95, "\n".join(
                f"{c * per_column + i:>4}  {textwrap.shorten(name, 40, placeholder='…')}"
                for i, name in enumerate(names)), va="top", ha="left", fontsize=8, family="monospace",
                transform=fig.transFigure, parse_math=False)
        ax.set_xlabel("predicted class (number: see the key)")
        ax.set_ylabel("true class (number: see the key)")
    ax.set_title("confusion matrix (rows normalized)")
    return fig


def plot_per_class(path, per_class: Sequence[dict], subtitle: str = "") -> None:
    """Horizontal bars of per-class top-1 accuracy, best at the top."""
    from matplotlib.figure import Figure

    rows = sorted(per_class, key=lambda r: (r["acc1"], r["class"]))
    n = len(rows)
    fig = Figure(figsize=(7, min(max(2.5, 0.18 * n + 1), 40)), dpi=100)
    ax = fig.subplots()
    ax.barh(range(n), [100 * r["acc1"] for r in rows], color="#4c72b0")
    ax.set_yticks(range(n), labels=[f"{r['class']} ({r['n']})" for r in rows], fontsize=6 if n > 40 else 8,
                  parse_math=False)
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy %")
    ax.set_ylim(-0.5, n - 0.5)
    ax.set_title("per-class accuracy (images per class in brackets)" + (f"\n{subtitle}" if subtitle else ""),
                 fontsize=9 if subtitle else None)
    _save(fig, Path(path), kind="eval")


def plot_name(path) -> str:
    """What a predictions file's plots are called: its name without .jsonl ("stdin" for -)."""
    name = Path(str(path)).name
    return "stdin" if str(path) == "-" else (name.removesuffix(".jsonl").removesuffix(".json") or name)


def plot_subtitle(origin: dict, n: int, where: Sequence[str] = ()) -> str:
    """Which predictions a plot shows: method, model, images (and the --where selection), file."""
    parts = [str(origin[k]) for k in ("method", "model") if origin.get(k)]
    parts.append(f"n = {n}" + (f" ({' '.join(where)})" if where else ""))
    return " · ".join(parts) + f"\n{origin.get('predictions', '')}"


def write_plots(out_dir, records: Sequence[dict], result: dict, *, name: str = "eval",
                subtitle: str = "") -> list[Path]:
    """NAME.confusion.png and NAME.per_class.png in ``out_dir`` (NAME: the predictions file's, so that the
    plots of several evals share a directory), titled with ``subtitle``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, matrix = confusion_matrix(records)
    paths = [out_dir / f"{name}.confusion.png", out_dir / f"{name}.per_class.png"]
    fig = confusion_figure(classes, matrix)
    if subtitle:
        fig.axes[0].set_title(f"confusion matrix (rows normalized)\n{subtitle}", fontsize=9)
    _save(fig, paths[0], kind="eval")
    plot_per_class(paths[1], result["per_class"], subtitle=subtitle)
    return paths


# ----------------------------------------------------------------------------- the commands

def read_labelled(path) -> list[dict]:
    """Labelled predictions, labels as class names (older files may hold 3 for the class "3")."""
    records = formats.read_predictions(path, require_label=True)
    for r in records:
        r["label"] = str(r["label"])
    return records


def select(records: list[dict], where: Sequence[str], source) -> list[dict]:
    """The predictions whose manifest KEY=VALUE (--where, as in classify); BadInput when none are left."""
    if not where:
        return records
    from vlmtools.store import parse_where, select_rows

    chosen = [records[i] for i in select_rows(records, parse_where(where))]
    if not chosen:
        raise BadInput(f"{formats.source_name(source)}: no prediction matches --where {' '.join(where)}")
    return chosen


def table_title(path, origin: dict, where: Sequence[str] = ()) -> str:
    """The table's title: the file, what made it, and the selection."""
    made = ", ".join(str(origin[k]) for k in ("method", "model") if origin.get(k))
    return formats.source_name(path) + (f" ({made})" if made else "") + (f" where {' '.join(where)}" if where else "")


def evaluate_file(path, *, by: Sequence[str] = (), output="-", csv_out=None, plot_dir=None,
                  per_class: bool = False, where: Sequence[str] = ()) -> list[dict]:
    """`vlmtools eval`: read, evaluate, tables on stderr, NDJSON rows (stdout by default, but not to a
    terminal, where the table says it all), CSV and plots."""
    from vlmtools.console import data_to_terminal, hint_data_elsewhere

    records = select(read_labelled(path), where, path)
    result = evaluate(records, by)
    origin = provenance(path, records)
    if where:
        origin["where"] = list(where)
    report(result, title=table_title(path, origin, where))
    rows = result_lines(result, origin, per_class=per_class)
    if csv_out is not None:
        write_per_class_csv(csv_out, result)
    if plot_dir is not None:
        for p in write_plots(plot_dir, records, result, name=plot_name(path),
                             subtitle=plot_subtitle(origin, len(records), where)):
            info(f"wrote {p}")
    if data_to_terminal(output):
        hint_data_elsewhere()
    else:
        formats.write_jsonl(output, rows)
    return rows


def compare_files(path_a, path_b, *, output="-", diff_out=None, show: int = 10,
                  names: tuple[str, str] | None = None, where: Sequence[str] = ()) -> dict:
    """`vlmtools eval compare A B`."""
    from vlmtools.console import data_to_terminal, hint_data_elsewhere

    if str(path_a) == "-" and str(path_b) == "-":
        raise BadInput("only one of the two predictions files can be stdin")
    a, b = select(read_labelled(path_a), where, path_a), select(read_labelled(path_b), where, path_b)
    names = names or (Path(str(path_a)).stem, Path(str(path_b)).stem)
    if names[0] == names[1]:
        names = (f"A:{names[0]}", f"B:{names[1]}")
    summary, diff = compare(a, b, names)
    report_compare(summary, diff, show)
    summary["a"].update(provenance(path_a, a))
    summary["b"].update(provenance(path_b, b))
    summary = rounded({"format": COMPARE_FORMAT, **summary})
    if where:
        summary["where"] = list(where)
    if diff_out is not None:
        formats.write_jsonl(diff_out, diff)
    if data_to_terminal(output):
        hint_data_elsewhere("the NDJSON row")
    else:
        formats.write_jsonl(output, [summary])
    return summary
