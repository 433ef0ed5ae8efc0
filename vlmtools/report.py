"""`vlmtools report RUN_DIR`: one static HTML page of a run directory's results.

It reads what the other commands wrote there, found by content, not by name: eval NDJSON
(vlmtools.eval/1: the results table and the --by groups), eval compare rows (vlmtools.compare/1),
predictions files (evaluated on the spot when no eval file names them, and the source of the gallery of
explained wrong answers, drawn as `explain text --plots` draws them) and the PNG plots under RUN_DIR,
in sections by kind (evaluation, training, explanation figures, a sample of each maps directory's
overlays, others), the kind read from the PNG's "Description" chunk that vlmtools' plots carry.
Images are embedded (data: URLs), so the page is one file that opens anywhere, without a server. What it
links (PNGs too large to embed) it links by a percent-encoded relative URL, and files that symbolic
links take out of RUN_DIR are neither read nor embedded.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from vlmtools import formats
from vlmtools.errors import BadInput

MAX_PNG_BYTES = 5 << 20  # larger PNGs are linked, not embedded
# How many PNG files each section embeds (a run directory can hold thousands of saliency overlays).
SECTION_LIMITS = {"eval": 40, "train": 40, "explain": 12, "map": 24, "other": 24}
MAPS_PER_DIR = 6  # overlays sampled from each maps directory
SECTION_TITLES = {
    "eval": "Evaluation plots", "train": "Training plots", "explain": "Explanation figures",
    "map": "Saliency maps (a sample)", "other": "Other figures"}

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
    """The first line of a JSON(L) file, parsed strictly; None when it is no JSON (not ours). JSON that
    vlmtools refuses everywhere (duplicate keys, nesting deeper than formats.MAX_DEPTH) is bad input."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(1 << 20)
        return formats.parse_json(line.decode("utf-8"))
    except formats.JsonProblem as exc:
        raise BadInput(f"{path}: {exc}") from None
    except (OSError, ValueError):
        return None


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(root)
        return True
    except ValueError:
        return False


SKIPPED_DIRS = ("__pycache__", "node_modules", "site-packages")


def _not_a_run_dir(path: Path) -> bool:
    """Folders that hold no results: hidden ones (.git, .venv, caches), Python virtual environments
    (a pyvenv.cfg) and package trees (`vlmtools report .` in a checkout must not read a venv's PNGs)."""
    return path.name.startswith(".") or path.name in SKIPPED_DIRS or (path / "pyvenv.cfg").exists()


def _files(run_dir: Path) -> tuple[list[Path], int]:
    """The files under RUN_DIR in name order (hidden folders and virtual environments skipped), and how
    many paths were left out because a symbolic link takes them out of RUN_DIR (their content is not
    read; links to directories are never followed)."""
    root = Path(os.path.realpath(run_dir))
    files, outside = [], 0
    for top, dirs, names in os.walk(run_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _not_a_run_dir(Path(top) / d))
        outside += sum(not _inside(Path(top) / d, root) for d in dirs if os.path.islink(Path(top) / d))
        for name in sorted(names):
            path = Path(top) / name
            if not _inside(path, root):
                outside += 1
            elif path.is_file():
                files.append(path)
    return sorted(files), outside


def _plot_kind(path: Path, maps_dirs: set[Path]) -> str:
    """The section of a PNG: its "Description" text chunk (written by vlmtools' plots), else its name or
    directory (plots written before the chunk, overlays of a maps directory)."""
    if path.parent in maps_dirs:
        return "map"
    try:
        from PIL import Image

        with Image.open(path) as im:  # reads the header and text chunks, not the pixels
            kind = im.info.get("Description")
    except Exception:  # a damaged or non-PNG file named .png: shown under "other", if at all
        kind = None
    if kind in SECTION_LIMITS:
        return kind
    name = path.name
    if name.endswith(("confusion.png", "per_class.png")):
        return "eval"
    if name.endswith(".curve.png") or name == "adapter_sweep.png":
        return "train"
    return "other"


def scan(run_dir: Path) -> dict:
    """The files of a run directory, by what they hold."""
    found = {"eval": [], "compare": [], "predictions": [], "figures": [], "maps": [], "outside": 0}
    files, found["outside"] = _files(run_dir)
    for path in files:
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
            elif head.get("format") == formats.MAPS_FORMAT and path.name == "info.json":
                found["maps"].append(path.parent)
            elif {"id", "pred", "topk"} <= set(head):
                found["predictions"].append(path)
    return found


def _href(path: Path, page_dir: Path) -> str:
    """A link to ``path`` that can only be a relative URL: the path from the page's directory, every
    character a URL gives meaning to (":" of javascript:, "?", "#", spaces, ...) percent-encoded."""
    from urllib.parse import quote

    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    rel = quote(Path(rel).as_posix(), safe="/")
    return rel if rel.startswith("../") else "./" + rel


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


def _figure_sections(run_dir: Path, found: dict) -> dict[str, list[Path]]:
    """The PNG files by section (SECTION_TITLES), each in name order; overlays of maps directories
    sampled (MAPS_PER_DIR per directory)."""
    maps_dirs = set(found["maps"])
    sections: dict[str, list[Path]] = {kind: [] for kind in SECTION_LIMITS}
    for path in found["figures"]:
        sections[_plot_kind(path, maps_dirs)].append(path)
    per_dir: dict[Path, list[Path]] = {}
    for path in sections["map"]:
        per_dir.setdefault(path.parent, []).append(path)
    sections["map"] = [p for d in sorted(per_dir) for p in per_dir[d][:MAPS_PER_DIR]]
    found["maps_total"] = {d: len(ps) for d, ps in per_dir.items()}
    return sections


def _png_title(path: Path) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get("Title")
    except Exception:
        return None


def _figures_html(run_dir: Path, paths: list[Path], page_dir: Path) -> list[str]:
    parts = []
    for path in paths:
        rel = str(path.relative_to(run_dir))
        title = _png_title(path)
        caption = html.escape(rel) + (f"<br>{html.escape(title)}" if title else "")
        if path.stat().st_size > MAX_PNG_BYTES:
            parts.append(f"<p><a href=\"{html.escape(_href(path, page_dir))}\">{html.escape(rel)}</a> "
                         f"(too large to embed)</p>")
            continue
        parts.append(f"<figure><img src=\"{_png_data(path.read_bytes())}\" alt=\"{html.escape(rel)}\">"
                     f"<figcaption>{caption}</figcaption></figure>")
    return parts


def build_report(run_dir, *, gallery: int = 12, page_dir=None) -> str:
    """The HTML page of RUN_DIR (a string): results, comparisons, then the plots by kind (evaluation,
    training), the explained wrong answers, explanation figures, a sample of saliency maps, other PNGs.
    Links are relative to ``page_dir`` (where the page goes; default RUN_DIR)."""
    import vlmtools

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such directory")
    page_dir = Path(page_dir) if page_dir is not None else run_dir
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
    if found["outside"]:
        parts.append(f"<p class=note>{found['outside']} path(s) reached through symbolic links that leave "
                     f"{html.escape(run_dir.name)} were left out.</p>")
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
    sections = _figure_sections(run_dir, found)
    shots = _gallery(run_dir, found, gallery) if gallery > 0 else []
    for kind in ("eval", "train", "gallery", "explain", "map", "other"):
        if kind == "gallery":
            if shots:
                parts.append("<h2>Explained wrong answers</h2>")
                parts += [f"<figure><img src=\"{data}\" alt=\"{html.escape(cap)}\"><figcaption>"
                          f"{html.escape(cap)}</figcaption></figure>" for cap, data in shots]
            continue
        paths = sections[kind]
        if not paths:
            continue
        limit = SECTION_LIMITS[kind]
        parts.append(f"<h2>{SECTION_TITLES[kind]}</h2>")
        if kind == "map":
            parts.append("<p class=note>" + "; ".join(
                f"{html.escape(str(d.relative_to(run_dir)))}: {min(n, MAPS_PER_DIR)} of {n}"
                for d, n in sorted(found["maps_total"].items())) + " overlays shown.</p>")
        parts += _figures_html(run_dir, paths[:limit], page_dir)
        if len(paths) > limit:
            parts.append(f"<p class=note>{len(paths) - limit} more PNG files of this kind not shown.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir, output=None, *, gallery: int = 12) -> str:
    """`vlmtools report`: build the page and write it (atomically) to ``output`` (default
    RUN_DIR/report.html; '-' is stdout). Returns where it went."""
    from vlmtools.console import info

    output = str(Path(run_dir) / "report.html") if output is None else output
    page_dir = Path(run_dir) if output == "-" else Path(output).parent
    page = build_report(run_dir, gallery=gallery, page_dir=page_dir)
    with formats.open_output(output) as fh:
        fh.write(page)
    info(f"wrote {'the report to stdout' if output == '-' else output} ({len(page) / 1e6:.1f} MB)")
    return output
