"""The study figures the reproduction scripts compare with (examples/cub/study_NNN.tsv) are the seed
documents' tables: each table is quoted here as the seed prints it, parsed, and compared cell by cell
with the data file. Where the seeds are on disk (../shared/seeds, or $VLMTOOLS_SEEDS_DIR), each quote is
also checked to be in its seed, byte for byte. And examples/compare.py: ours beside the study's."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "examples" / "cub"
COMPARE = ROOT / "examples" / "compare.py"

# ----------------------------------------------------------------------------- the seeds' tables, quoted

SEED_000 = "000_cd8d1fc85bd9e1dd.txt"
QUOTES_000 = {
    "top-1": """Zero-Shot Accuracy

モデルサイズ	提案手法	CBDの再現値	CLIP
ViT-B/32	54.04	53.14	52.00
ViT-B/16	58.78	57.77	56.42
ViT-L/14	65.22	64.69	63.07
ViT-L/14@336px	66.10	65.40	63.29
""",
    "top-5": """Zero-Shot Top-5 Accuracy

モデルサイズ	提案手法	CBDの再現値	CLIP
ViT-B/32	84.35	84.17	82.59
ViT-B/16	87.45	87.33	84.85
ViT-L/14	92.44	92.01	90.44
ViT-L/14@336px	92.39	92.10	90.42
""",
    "top-1 supplementary": """Zero-Shot Accuracy

モデルサイズ	提案手法	凡例のみ変えた場合	CBD
ViT-B/32	54.04	53.57	53.14
ViT-B/16	58.78	58.46	57.77
ViT-L/14	65.22	64.60	64.69
ViT-L/14@336px	66.10	65.65	65.40
""",
    "top-5 supplementary": """Zero-Shot Top-5 Accuracy

モデルサイズ	提案手法	凡例のみ変えた場合	CLIP
ViT-B/32	84.35	84.24	84.17
ViT-B/16	87.45	87.66	87.33
ViT-L/14	92.44	92.22	92.01
ViT-L/14@336px	92.39	91.96	92.10
""",
}

SEED_001 = "001_c1b10a6933c097d0.txt"
# The first full table (class-balanced ratios; Hirano's figures in brackets). Later slides repeat it with
# typos, which the data file does not follow.
QUOTE_001 = """割合(%) (画像, テキスト)	画像のみ (平野)	画像 + テキスト	
		Reedら (平野)	gpt-3.5-turbo
(100, 0)	85.07 (84.80)	—	—
(90, 10)	85.26 (84.67)	83.87 (85.05)	84.05
(80, 20)	84.95 (83.55)	83.13 (84.55)	82.90
(70, 30)	84.71 (82.55)	81.57 (84.16)	81.62
(60, 40)	84.48 (80.48)	80.85 (83.33)	80.01
(50, 50)	84.23 (79.81)	77.64 (82.52)	78.68
(40, 60)	83.66 (77.82)	76.10 (80.84)	76.56
(30, 70)	83.38 (73.33)	72.05 (67.50)	72.47
(20, 80)	82.83 (67.24)	68.08 (61.25)	67.24
(10, 90)	81.88 (53.92)	57.47 (49.12)	57.96
(0, 100)	—	24.12 (27.67)	23.78
"""
# Hirano's own table, earlier in the slides: the bracketed figures above.
QUOTE_001_HIRANO = """割合(画像, テキスト)	画像のみ	画像 + テキスト
(100 ,0)	84.80	—
(90, 10)	84.67	85.05
(80, 20)	83.55	84.55
(70, 30)	82.55	84.16
(60, 40)	80.48	83.33
(50, 50)	79.81	82.52
(40, 60)	77.82	80.84
(30, 70)	73.33	67.50
(20, 80)	67.24	61.25
(10, 90)	53.92	49.12
(0, 100)	—	27.67
"""

SEED_003 = "003_9a56fde1ef6fe799.txt"
QUOTE_003_METHODS = """↑ RISE [Petsiuk, BMVC18] 0.390±0.014 0.604±0.007 0.086±0.002 0.522±0.005 F-CAM [Belharbi+, WACV22] \
0.550±0.017 0.681±0.008 0.034±0.001 0.647±0.008 Ours 0.693±0.002 0.704±0.007 0.007±0.003 0.697±0.004"""
QUOTE_003_ABLATION = """ID Score ↑ (i) ✓ 0.477±0.019 0.595±0.054 0.020±0.012 0.575±0.045 (ii) ✓ \
0.495±0.008 0.717±0.009 0.014±0.004 0.702±0.011 (iii) ✓ ✓ 0.693±0.007 0.704±0.012 0.007±0.002 0.697±0.011"""

SEED_004 = "004_9e859439dcb312d0.txt"
QUOTE_004 = """CLIP(zero-shot)	63.27	54.71
CoCa(zero-shot)	73.63	65.05
CLIP(fine-tuning)	$86.39(\\pm 0.03)$	$64.40(\\pm 0.16)$
CoCa(fine-tuning)	$86.98(\\pm 0.16)$	$71.56(\\pm 0.12)$
LADS	$86.31(\\pm 0.15)$	$65.90(\\pm 0.15)$
LARE	$87.01(\\pm 0.04)$	$72.98(\\pm 0.16)$"""

NUM = r"\d+\.\d+"


def study(number: str) -> dict:
    """{(table, row, column): (value, sd)} of examples/cub/study_NNN.tsv, as the strings written there."""
    with open(STUDIES / f"study_{number}.tsv", encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh if line.strip() and not line.startswith("#")]
    assert rows[0] == ["table", "row", "column", "value", "sd"]
    cells = {(t, r, c): (v, sd) for t, r, c, v, sd in rows[1:]}
    assert len(cells) == len(rows) - 1, "a cell appears twice"
    return cells


def grid(quote: str) -> dict[str, list[str]]:
    """Tab-separated rows of a quoted table: {first field: the other fields}."""
    return {p[0]: p[1:] for p in (line.split("\t") for line in quote.strip("\n").split("\n")[1:]) if len(p) > 1}


# ----------------------------------------------------------------------------- figures = the seeds'

def test_study_000_figures_are_the_slides_tables():
    cells = study("000")
    models = ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    expect = {}
    for table in ("top-1", "top-5"):
        main = grid(QUOTES_000[table].split("\n", 2)[2])
        supp = grid(QUOTES_000[f"{table} supplementary"].split("\n", 2)[2])
        assert list(main) == list(supp) == models
        for m in models:
            proposal, cbd, clip = main[m]
            s_proposal, exemplar, s_third = supp[m]
            # the supplementary tables repeat the proposal and CBD (its top-5 third column is labelled
            # "CLIP" but holds CBD's figures): each is in the data file once
            assert (s_proposal, s_third) == (proposal, cbd)
            expect.update({(table, m, "CLIP"): clip, (table, m, "CBD"): cbd,
                           (table, m, "exemplar only"): exemplar, (table, m, "exemplar + habitat"): proposal})
    assert {k: v for k, (v, _) in cells.items()} == expect
    assert {sd for _, sd in cells.values()} == {"-"}


def test_study_001_figures_are_the_slides_table():
    cells = study("001")
    rows = grid(QUOTE_001.split("\n", 1)[1])
    hirano = grid(QUOTE_001_HIRANO)
    assert len(rows) == len(hirano) == 11
    expect = {}
    for (ratio, (image, reed, gpt)), (h_ratio, (h_image, h_reed)) in zip(rows.items(), hirano.items()):
        a, b = (int(x) for x in re.findall(r"\d+", ratio))
        assert (a, b) == tuple(int(x) for x in re.findall(r"\d+", h_ratio)) and a + b == 100
        key = f"({a}, {b})"
        for column, text in (("image only", image), ("+ Reed", reed)):
            if text != "—":
                ours_fig, bracket = re.fullmatch(rf"({NUM}) \(({NUM})\)", text).groups()
                expect[("top-1", key, column)] = ours_fig
                expect[("top-1", key, f"{column} (Hirano)")] = bracket
        if gpt != "—":
            expect[("top-1", key, "+ gpt-3.5-turbo")] = gpt
        # the bracketed figures are Hirano's own table
        assert expect.get(("top-1", key, "image only (Hirano)"), "—") == h_image
        assert expect.get(("top-1", key, "+ Reed (Hirano)"), "—") == h_reed
    assert {k: v for k, (v, _) in cells.items()} == expect


def _pm_cells(quote: str, rows: list[str]) -> dict:
    """Labels followed by four 'v±sd' figures in a flattened slide table."""
    out = {}
    for label, found in zip(rows, re.split(r"\s(?:RISE \[|F-CAM \[|Ours |\((?:i|ii|iii)\)[ ✓]+)", quote)[1:]):
        figures = re.findall(rf"({NUM})±({NUM})", found)
        assert len(figures) == 4, (label, found)
        out[label] = figures
    assert len(out) == len(rows)
    return out


def test_study_003_figures_are_the_slides_tables():
    cells = study("003")
    columns = ["mIoU", "insertion", "deletion", "ID score"]
    expect = {}
    for table, quote, rows in (("methods", QUOTE_003_METHODS, ["RISE", "F-CAM", "ALA (ours)"]),
                               ("ablation", QUOTE_003_ABLATION,
                                ["(i) AEA, no SBN", "(ii) SBN, no AEA", "(iii) AEA + SBN"])):
        for row, figures in _pm_cells(quote, rows).items():
            for column, pair in zip(columns, figures):
                expect[(table, row, column)] = pair
    assert cells == expect
    # ID score = insertion - deletion, as the slides define it, to the printed precision, except RISE's
    # row, whose printed ID score is 0.004 above its insertion - deletion (0.604 - 0.086 = 0.518)
    for (table, row, column), (value, _) in cells.items():
        if column == "ID score":
            ins, dele = float(cells[(table, row, "insertion")][0]), float(cells[(table, row, "deletion")][0])
            slack = 0.0045 if row == "RISE" else 0.0015
            assert float(value) == pytest.approx(ins - dele, abs=slack)
            assert row != "RISE" or float(value) - (ins - dele) == pytest.approx(0.004)


def test_study_004_figures_are_the_papers_table():
    cells = study("004")
    expect = {}
    for line in QUOTE_004.split("\n"):
        method, *figures = line.split("\t")
        row = re.sub(r"\(", " (", method)
        for column, text in zip(("in-domain", "out-of-domain"), figures):
            m = re.fullmatch(rf"\$?({NUM})(?:\(\\pm ({NUM})\))?\$?", text)
            expect[("Table 1", row, column)] = (m.group(1), m.group(2) or "-")
    assert len(expect) == 12 and cells == expect


def _seeds_dir() -> Path | None:
    for d in (os.environ.get("VLMTOOLS_SEEDS_DIR"), ROOT.parent / "shared" / "seeds",
              ROOT.parent.parent / "shared" / "seeds"):
        if d and Path(d, "README.md").is_file():
            return Path(d)
    return None


@pytest.mark.parametrize("seed, quotes", [
    (SEED_000, list(QUOTES_000.values())), (SEED_001, [QUOTE_001, QUOTE_001_HIRANO]),
    (SEED_003, [QUOTE_003_METHODS, QUOTE_003_ABLATION]), (SEED_004, [QUOTE_004])])
def test_quotes_are_the_seeds_text(seed, quotes):
    seeds = _seeds_dir()
    if seeds is None:
        pytest.skip("the seed documents are not on this machine (../shared/seeds, $VLMTOOLS_SEEDS_DIR)")
    text = (seeds / seed).read_text(encoding="utf-8")
    for quote in quotes:
        assert quote in text, quote[:60]


# ----------------------------------------------------------------------------- compare.py

def run_compare(*args):
    return subprocess.run([sys.executable, str(COMPARE), *map(str, args)], capture_output=True, text=True)


def test_compare_puts_ours_beside_the_study_with_runs_and_differences(tmp_path):
    studyf = tmp_path / "study.tsv"
    studyf.write_text("# a comment\ntable\trow\tcolumn\tvalue\tsd\n"
                      "T\tLARE\tin\t87.01\t0.04\nT\tLARE\tout\t72.98\t0.16\nT\tCLIP\tin\t63.27\t-\n"
                      "U\tx\tmIoU\t0.693\t0.002\n")
    ours = tmp_path / "ours.tsv"
    ours.write_text("T\tLARE\tin\t86.00\nT\tLARE\tin\t88.00\nT\textra\tin\t50\nU\tx\tmIoU\t0.5\n"
                    "T\tLARE\tout\t-\n")
    out, txt = tmp_path / "table.tsv", tmp_path / "table.txt"
    res = run_compare(studyf, ours, "-o", out, "--text", txt, "--title", "demo")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8"), delimiter="\t"))
    got = [(r["table"], r["row"], r["column"], r["ours"], r["ours_sd"], r["runs"], r["study"], r["study_sd"],
            r["difference"]) for r in rows]
    assert got == [
        ("T", "LARE", "in", "87.00", "1.00", "2", "87.01", "0.04", "-0.01"),   # mean and sd (ddof 0) of 2 runs
        ("T", "LARE", "out", "-", "-", "0", "72.98", "0.16", "-"),             # no figure of ours
        ("T", "CLIP", "in", "-", "-", "0", "63.27", "-", "-"),                 # not run
        ("T", "extra", "in", "50.00", "-", "1", "-", "-", "-"),               # ours only, after its table
        ("U", "x", "mIoU", "0.500", "-", "1", "0.693", "0.002", "-0.193"),     # the study's precision
    ]
    assert res.stdout == txt.read_text(encoding="utf-8")
    lines = res.stdout.split("\n")
    assert lines[0] == "demo"
    lare = next(line for line in lines if line.startswith("LARE") and " in " in line)
    assert lare.split() == ["LARE", "in", "87.00", "±", "1.00", "(n=2)", "87.01", "±", "0.04", "-0.01"]
    # aligned: within a table every line's figures end at the same column
    block = lines[lines.index("T") + 1:lines.index("U") - 1]
    assert len({len(line) for line in block if not line.endswith("-")}) == 1


@pytest.mark.parametrize("study_text, ours_text, message", [
    ("T\tr\tc\t1.0\n", "", "expected 5 tab-separated fields"),
    ("T\tr\tc\tx\t-\n", "", "'x' is not a number"),
    ("T\tr\tc\t1.0\t-\nT\tr\tc\t2.0\t-\n", "", "appears twice"),
    ("T\tr\tc\t1.0\t-\n", "T\tr\tc\n", "expected 4 tab-separated fields"),
])
def test_compare_bad_input_names_the_line(tmp_path, study_text, ours_text, message):
    (tmp_path / "s.tsv").write_text(study_text)
    (tmp_path / "o.tsv").write_text(ours_text)
    res = run_compare(tmp_path / "s.tsv", tmp_path / "o.tsv", "-o", tmp_path / "t.tsv")
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "t.tsv").exists()
