"""`vlmtools report RUN_DIR`: one static HTML page of a run directory's results.

It reads what the other commands wrote there, found by content, not by name: eval NDJSON
(vlmtools.eval/1: the results table and the --by groups), eval compare rows (vlmtools.compare/1),
predictions files (evaluated on the spot when no eval file names them, and the source of the gallery of
explained wrong answers, drawn as `explain text --plots` draws them) and the PNG plots under RUN_DIR.
Images are embedded (data: URLs), so the page is one file that opens anywhere, without a server.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from vlmtools import formats
from vlmtools.errors import BadInput

MAX_FIGURES = 60  # PNG files embedded from RUN_DIR
MAX_PNG_BYTES = 5 << 20  # larger PNGs are linked, not embedded

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def _first_line(path: Path):
    try:
        with open(path, "rb") as fh:
            line = fh.readline(1 << 20)
        return formats.parse_json(line.decode("utf-8"))  # strict: deep nesting is refused, not a crash
    except formats.JsonProblem as exc:
        from vlmtools.console import warn

        warn(f"{path}: skipped ({exc})")
        return None
    except (OSError, ValueError):  # not JSON (JSONDecodeError, UnicodeDecodeError): not one of ours
        return None


def scan(run_dir: Path) -> dict:
    """The files of a run directory, by what they hold."""
    found = {"eval": [], "compare": [], "predictions": [], "figures": []}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if path.suffix == ".png":
            found["figures"].append(path)
        elif path.suffix in (".jsonl", ".json"):
            head = _first_line(path)
            if not isinstance(head, dict):
                continue
            if head.get("format") == formats.EVAL_FORMAT:
                found["eval"].append(path)
            elif head.get("format") == formats.COMPARE_FORMAT:
                found["compare"].append(path)
            elif {"id", "pred", "topk"} <= set(head):
                found["predictions"].append(path)
    return found


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _table(headers, rows, numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if i >= numeric_from else ''}>{html.escape(str(cell))}</td>" for i, cell in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png_data(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _results(run_dir: Path, found: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """Summary rows (one per evaluated predictions file) and group rows by key."""
    from vlmtools.evaluate import evaluate, provenance, read_labelled, result_lines

    summaries, groups, named = [], {}, set()
    sources = []
    for path in found["eval"]:
        lines = [rec for _, rec in formats.iter_jsonl(path)]
        sources.append((path, lines))
        pred = lines[0].get("predictions")
        if pred:
            named.update({(run_dir / pred).resolve(), Path(pred).resolve()})
    for path in found["predictions"]:
        if path.resolve() in named:
            continue
        try:
            records = read_labelled(path)
        except BadInput:  # unlabelled predictions: nothing to score, the gallery may still use them
            continue
        result = evaluate(records)
        sources.append((path, result_lines(result, provenance(path.relative_to(run_dir), records))))
    for path, lines in sources:
        head = dict(lines[0], file=str(path.relative_to(run_dir)))
        summaries.append(head)
        for row in lines[1:]:
            if row.get("kind") == "group":
                groups.setdefault(row["by"], []).append(dict(row, file=head["file"]))
    return summaries, groups


def _gallery(run_dir: Path, found: dict, limit: int) -> list[tuple[str, str]]:
    """(caption, PNG data URL) of up to ``limit`` explained wrong answers, taken in turn from the
    predictions files (those that also explain the true class first)."""
    from itertools import chain, zip_longest

    from vlmtools.explain.textual import figure

    per_file = []
    for path in found["predictions"]:
        try:
            records = formats.read_predictions(path)
        except BadInput:
            continue
        wrong = [r for r in records if "explanation" in r and r.get("label") is not None
                 and str(r["label"]) != r["pred"]]
        if wrong:
            per_file.append((not any("explanation_true" in r for r in wrong), path, wrong))
    per_file.sort(key=lambda item: item[0])  # stable: files with the true class's explanation first
    turns = chain.from_iterable(zip_longest(*[[(path, r) for r in wrong] for _, path, wrong in per_file]))
    out = []
    for path, rec in (t for t in turns if t is not None):
        if len(out) >= limit:
            break
        if rec.get("path") and not Path(rec["path"]).is_absolute() and (run_dir / rec["path"]).exists():
            rec = dict(rec, path=str(run_dir / rec["path"]))  # synth make's manifests hold relative paths
        buf = io.BytesIO()
        figure(rec).savefig(buf, format="png", bbox_inches="tight")
        caption = f"{path.relative_to(run_dir)}: {rec['id']} — predicted {rec['pred']}, true {rec['label']}"
        out.append((caption, _png_data(buf.getvalue())))
    return out


def build_report(run_dir, *, gallery: int = 12) -> str:
    """The HTML page of RUN_DIR (a string)."""
    import vlmtools

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such directory")
    found = scan(run_dir)
    if not (found["eval"] or found["predictions"] or found["compare"]):
        raise BadInput(f"{run_dir}: no eval results, comparisons or predictions found in it (they come from "
                       f"`vlmtools eval`, `eval compare` and `classify`)")
    summaries, groups = _results(run_dir, found)
    title = f"vlmtools report: {run_dir.resolve().name}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=note>{html.escape(str(run_dir))}; vlmtools {html.escape(vlmtools.__version__)}. "
             f"Accuracies in %.</p>"]
    if summaries:
        parts.append("<h2>Results</h2>")
        parts.append(_table(
            ["file", "predictions", "method", "model", "images", "classes", "acc1 %", "acc5 %",
             "mean per-class recall %"],
            [[s["file"], s.get("predictions", ""), s.get("method", ""), s.get("model", ""), s["n"], s["classes"],
              _pct(s.get("acc1")), _pct(s.get("acc5")), _pct(s.get("mean_per_class_recall"))] for s in summaries],
            numeric_from=4))
        for key, rows in groups.items():
            parts.append(f"<h3>by {html.escape(key)}</h3>")
            parts.append(_table(["file", key, "images", "acc1 %", "acc5 %", "mean per-class recall %"],
                                [[g["file"], g["value"], g["n"], _pct(g.get("acc1")), _pct(g.get("acc5")),
                                  _pct(g.get("mean_per_class_recall"))] for g in rows], numeric_from=2))
    if found["compare"]:
        parts.append("<h2>Comparisons</h2>")
        rows = []
        for path in found["compare"]:
            c = _first_line(path)
            rows.append([str(path.relative_to(run_dir)), c["a"]["name"], c["b"]["name"], c["n"], _pct(c["a"]["acc1"]),
                         _pct(c["b"]["acc1"]), c["only_a_correct"], c["only_b_correct"],
                         f"{c['mcnemar']['p_exact']:.3g}"])
        parts.append(_table(["file", "A", "B", "images", "A acc1 %", "B acc1 %", "only A right", "only B right",
                             "McNemar p (exact)"], rows, numeric_from=3))
    shots = _gallery(run_dir, found, gallery) if gallery > 0 else []
    if shots:
        parts.append("<h2>Explained wrong answers</h2>")
        parts += [f"<figure><img src=\"{data}\" alt=\"{html.escape(cap)}\"><figcaption>{html.escape(cap)}"
                  f"</figcaption></figure>" for cap, data in shots]
    if found["figures"]:
        parts.append("<h2>Figures</h2>")
        for path in found["figures"][:MAX_FIGURES]:
            rel = html.escape(str(path.relative_to(run_dir)))
            if path.stat().st_size > MAX_PNG_BYTES:
                parts.append(f"<p><a href=\"{rel}\">{rel}</a> (too large to embed)</p>")
                continue
            parts.append(f"<figure><img src=\"{_png_data(path.read_bytes())}\" alt=\"{rel}\">"
                         f"<figcaption>{rel}</figcaption></figure>")
        if len(found["figures"]) > MAX_FIGURES:
            parts.append(f"<p class=note>{len(found['figures']) - MAX_FIGURES} more PNG files not shown.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir, output=None, *, gallery: int = 12) -> str:
    """`vlmtools report`: build the page and write it (atomically) to ``output`` (default
    RUN_DIR/report.html; '-' is stdout). Returns where it went."""
    from vlmtools.console import info

    page = build_report(run_dir, gallery=gallery)
    output = str(Path(run_dir) / "report.html") if output is None else output
    with formats.open_output(output) as fh:
        fh.write(page)
    info(f"wrote {'the report to stdout' if output == '-' else output} ({len(page) / 1e6:.1f} MB)")
    return output
