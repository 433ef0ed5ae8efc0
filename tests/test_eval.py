"""`vlmtools eval` and `eval compare`: metrics against independent computations, grouping, McNemar, plots,
CSV, and bad predictions files."""

import csv
import io
import json
import math
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from vlmtools import evaluate as E
from vlmtools.cli.app import app
from vlmtools.formats import prediction_record

runner = CliRunner()
CLASSES = [f"class {i}" for i in range(8)]


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def fake_predictions(n=120, n_classes=8, k=5, seed=0, skill=0.6):
    """Labelled predictions with a random ranking whose top-1 is right with probability ``skill``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(n_classes))
        order = list(rng.permutation(n_classes))
        if rng.random() < skill:
            order.remove(label)
            order.insert(0, label)
        topk = [(CLASSES[c], round(1 - 0.1 * r, 3)) for r, c in enumerate(order[:k])]
        meta = {"id": f"im{i}", "path": f"/x/{i}.jpg", "label": CLASSES[label],
                "domain": "photo" if i % 3 else "painting", "split": "test"}
        out.append(prediction_record(meta, topk[0][0], topk))
    return out


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_metrics_match_numpy():
    recs = fake_predictions()
    res = E.evaluate(recs, by=["domain"])
    labels = np.array([r["label"] for r in recs])
    preds = np.array([r["pred"] for r in recs])
    in5 = np.array([r["label"] in [t["class"] for t in r["topk"][:5]] for r in recs])
    assert res["n"] == len(recs) and res["correct"] == int((labels == preds).sum())
    assert math.isclose(res["acc1"], (labels == preds).mean())
    assert math.isclose(res["acc5"], in5.mean())
    recalls = [(preds[labels == c] == c).mean() for c in np.unique(labels)]
    assert math.isclose(res["mean_per_class_recall"], np.mean(recalls))
    for row in res["per_class"]:
        mask = labels == row["class"]
        assert row["n"] == mask.sum() and math.isclose(row["acc1"], (preds[mask] == row["class"]).mean())
        assert math.isclose(row["acc5"], in5[mask].mean())
    dom = np.array([r["domain"] for r in recs])
    for value, g in res["groups"]["domain"].items():
        mask = dom == value
        assert g["n"] == mask.sum() and math.isclose(g["acc1"], (labels[mask] == preds[mask]).mean())
        assert "per_class" not in g


def test_top5_omitted_with_fewer_than_five_classes():
    recs = fake_predictions(n_classes=4, k=5)
    assert all(len(r["topk"]) == 4 for r in recs)
    res = E.evaluate(recs)
    assert res["acc5"] is None and "acc5_note" in res
    assert all(row["acc5"] is None for row in res["per_class"])


def test_confusion_matrix_counts():
    recs = fake_predictions(n=60)
    classes, m = E.confusion_matrix(recs)
    assert m.sum() == 60
    for r in recs[:10]:
        assert m[classes.index(r["label"]), classes.index(r["pred"])] >= 1
    assert np.trace(m) == sum(r["pred"] == r["label"] for r in recs)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 3), (10, 2), (1, 12), (40, 25)])
def test_mcnemar_exact_is_the_binomial_tail(b, c):
    res = E.mcnemar(b, c)
    n = b + c
    # two-sided exact p: probability, under Binomial(n, 1/2), of a split at least as lopsided as observed
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    lopsided = [p for i, p in enumerate(pmf) if abs(i - n / 2) >= abs(b - n / 2)]
    assert math.isclose(res["p_exact"], min(1.0, sum(lopsided)), rel_tol=1e-9)
    assert res["p_exact"] == E.mcnemar(c, b)["p_exact"]
    if n:
        assert math.isclose(res["chi2"], max(abs(b - c) - 1, 0) ** 2 / n)
        assert 0 <= res["p_chi2"] <= 1


def test_cli_eval_json_csv_plots(tmp_path):
    recs = fake_predictions()
    pred = write(tmp_path / "p.jsonl", recs)
    res = invoke("eval", pred, "--by", "domain", "--csv", tmp_path / "pc.csv", "--plots", tmp_path / "plots",
                 "--per-class")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    rows_out = [json.loads(line) for line in lines]
    expected = E.evaluate(recs, by=["domain"])
    head = rows_out[0]
    assert head["format"] == E.EVAL_FORMAT and head["kind"] == "summary" and head["predictions"] == str(pred)
    assert head["n"] == expected["n"] and head["acc1"] == round(expected["acc1"], 4)
    assert head["mean_per_class_recall"] == round(expected["mean_per_class_recall"], 4)
    groups = [r for r in rows_out if r["kind"] == "group"]
    assert {(g["by"], g["value"]) for g in groups} == {("domain", v) for v in expected["groups"]["domain"]}
    per_class = [r for r in rows_out if r["kind"] == "class"]
    assert [r["class"] for r in per_class] == [r["class"] for r in expected["per_class"]]
    assert all(len(line) == len(line.strip()) and "\n" not in line for line in lines)  # NDJSON, not indented
    assert "top-1 %" in res.stderr and "by domain" in res.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "pc.csv").read_text())))
    assert [r["class"] for r in rows] == [r["class"] for r in per_class]
    from PIL import Image

    for name in ("p.confusion.png", "p.per_class.png"):  # named after the predictions file
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
            assert f"n = {len(recs)}" in im.info["Title"] and "p.jsonl" in im.info["Title"]
    assert "matplotlib.pyplot" not in sys.modules  # plots never touch pyplot (no display, no global state)


def test_cli_eval_default_and_explicit_subcommand_and_stdin(tmp_path):
    pred = write(tmp_path / "p.jsonl", fake_predictions())
    a = invoke("eval", pred)
    b = invoke("eval", "predictions", pred)
    c = invoke("eval", "-", input=pred.read_text())
    d = invoke("eval", "-o", tmp_path / "r.jsonl", pred)
    assert a.exit_code == b.exit_code == c.exit_code == d.exit_code == 0
    assert a.stdout == b.stdout == (tmp_path / "r.jsonl").read_text()
    assert c.stdout == a.stdout.replace(str(pred), "<stdin>")


def test_cli_compare(tmp_path):
    a = fake_predictions(seed=0, skill=0.4)
    b = fake_predictions(seed=0, skill=0.4)
    rng = np.random.default_rng(5)
    for r in b:  # B fixes about half of A's mistakes
        if r["pred"] != r["label"] and rng.random() < 0.5:
            rest = [(t["class"], t["score"]) for t in r["topk"][1:]]
            r.update(prediction_record(r, r["label"], [(r["label"], 1.0)] + rest))
    pa, pb = write(tmp_path / "clip.jsonl", a), write(tmp_path / "cbd.jsonl", b)
    res = invoke("eval", "compare", pa, pb, "--diff", tmp_path / "diff.jsonl")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["format"] == E.COMPARE_FORMAT and out["a"]["predictions"] == str(pa)
    ca = np.array([r["pred"] == r["label"] for r in a])
    cb = np.array([r["pred"] == r["label"] for r in b])
    assert out["a"]["name"] == "clip" and out["b"]["name"] == "cbd"
    assert out["a"]["acc1"] == round(ca.mean(), 4) and out["b"]["acc1"] == round(cb.mean(), 4)
    assert out["only_b_correct"] == int((cb & ~ca).sum()) and out["only_a_correct"] == int((ca & ~cb).sum())
    assert out["mcnemar"] == E.rounded(E.mcnemar(out["only_a_correct"], out["only_b_correct"]))
    diff = [json.loads(line) for line in (tmp_path / "diff.jsonl").read_text().splitlines()]
    assert len(diff) == out["predictions_differ"] == sum(x["pred"] != y["pred"] for x, y in zip(a, b))
    assert all(d["pred_a"] != d["pred_b"] for d in diff)
    assert "McNemar" in res.stderr


def test_compare_pairs_by_id_and_names(tmp_path):
    a = fake_predictions(n=30)
    pa, pb = write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", list(reversed(a[:20])))
    res = invoke("eval", "compare", pa, pb, "--names", "CLIP,CBD")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 20 and out["predictions_differ"] == 0 and out["a"]["name"] == "CLIP"
    assert "present in both" in res.stderr


# ----------------------------------------------------------------------------- bad input

def test_predictions_without_labels(tmp_path):
    recs = fake_predictions(n=5)
    del recs[3]["label"]
    pred = write(tmp_path / "p.jsonl", recs)
    res = invoke("eval", pred, "-o", tmp_path / "r.json", "--csv", tmp_path / "c.csv")
    assert res.exit_code == 2 and f"{pred}:4" in res.stderr and "label" in res.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "c.csv").exists()


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"id": "x", "label": "a"}', '"pred"'),
    ('{"id": "x", "label": "a", "pred": "a", "topk": []}', '"topk"'),
    ('{"id": "x", "label": "a", "pred": "a", "topk": [{"class": "b", "score": 1}]}', "topk starts with"),
    ('{"id": "im0", "label": "a", "pred": "a", "topk": [{"class": "a", "score": 1}]}', "duplicate id"),
])
def test_malformed_predictions(tmp_path, line, message):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps(fake_predictions(n=1)[0]) + "\n" + line + "\n")
    res = invoke("eval", pred)
    assert res.exit_code == 2 and f"{pred}:2" in res.stderr and message in res.stderr
    assert res.stdout == ""


def test_bad_group_key_and_disjoint_compare(tmp_path):
    pred = write(tmp_path / "p.jsonl", fake_predictions(n=10))
    res = invoke("eval", pred, "--by", "habitat")
    assert res.exit_code == 2 and "--by habitat" in res.stderr and "domain" in res.stderr
    other = fake_predictions(n=10)
    for r in other:
        r["id"] = "x" + r["id"]
    res = invoke("eval", "compare", pred, write(tmp_path / "q.jsonl", other), "-o", tmp_path / "s.json")
    assert res.exit_code == 2 and "share no image id" in res.stderr and not (tmp_path / "s.json").exists()
    res = invoke("eval", tmp_path / "missing.jsonl")
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_markup_in_names_is_shown_as_written(tmp_path):
    """Class names, ids, group values and display names are data, not rich markup (nor mathtext)."""
    names = ["[/bold]", "img[draft]", "a $\\frac{x$ b", "[red]x"]
    recs = fake_predictions(n=40, n_classes=4, k=4)
    for r in recs:
        rename = {f"class {i}": n for i, n in enumerate(names)}
        r.update(prediction_record({**r, "label": rename[r["label"]], "domain": "[i]" + r["domain"]},
                                   rename[r["pred"]], [(rename[t["class"]], t["score"]) for t in r["topk"]]))
        r["id"] = f"[/b]{r['id']}"
    pred = write(tmp_path / "p[x].jsonl", recs)
    res = invoke("eval", pred, "--by", "domain", "--plots", tmp_path / "plots", "--per-class")
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert "p[x].jsonl" in err and "[i]photo" in err and "[i]painting" in err
    assert {r["class"] for r in map(json.loads, res.stdout.splitlines()) if r["kind"] == "class"} == set(names)
    other = [dict(r, pred=r["label"], topk=[{"class": r["label"], "score": 1.0}]) for r in recs]
    res = invoke("eval", "compare", pred, write(tmp_path / "q.jsonl", other), "--names", "[/x],img[draft]")
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert "A = [/x] B = img[draft]" in err and "[/b]im" in err
    assert any(n in err for n in names[:2])  # disagreements list the class names as written


def test_integer_labels_of_older_files_are_class_names(tmp_path):
    recs = fake_predictions(n=20, n_classes=3, k=3)
    for r in recs:  # classes "0".."2"; an older classify wrote the manifest's int labels as they were
        r["label"] = int(r["label"].split()[1])
        r["pred"] = r["pred"].split()[1]
        r["topk"] = [{"class": t["class"].split()[1], "score": t["score"]} for t in r["topk"]]
    res = invoke("eval", write(tmp_path / "p.jsonl", recs), "--per-class")
    assert res.exit_code == 0, res.output
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert out[0]["correct"] == sum(r["pred"] == str(r["label"]) for r in recs) > 0
    assert {r["class"] for r in out[1:]} <= {"0", "1", "2"}


# ----------------------------------------------------------------------------- what the numbers, tables and plots say
# (issue 24: behaviours the mutation run of evaluate.py found untested)

def _ranked(label, order, i):
    """A labelled prediction whose ranking is ``order`` (class indices), image i."""
    topk = [(CLASSES[c], round(1 - 0.05 * r, 3)) for r, c in enumerate(order)]
    return prediction_record({"id": f"im{i}", "label": CLASSES[label]}, topk[0][0], topk)


def test_top5_counts_only_the_first_five_of_a_longer_ranking():
    """classify -k 8 lists 8 classes: top-5 accuracy still asks for the label among the first five."""
    recs = [_ranked(0, [1, 2, 3, 4, 5, 0, 6, 7], 0),   # label 6th: a top-5 miss
            _ranked(0, [1, 2, 3, 4, 0, 5, 6, 7], 1),   # label 5th: a top-5 hit
            _ranked(1, [1, 0, 2, 3, 4, 5, 6, 7], 2)]   # right
    res = E.evaluate(recs)
    assert res["acc1"] == 1 / 3 and res["acc5"] == 2 / 3
    assert [(r["class"], r["acc5"]) for r in res["per_class"]] == [(CLASSES[0], 0.5), (CLASSES[1], 1.0)]
    assert res["mean_per_class_recall"] == (0 / 2 + 1 / 1) / 2 and "acc5_note" not in res


def test_top5_note_and_group_of_records_without_the_key():
    recs = fake_predictions(n=12, n_classes=4, k=4)
    del recs[0]["domain"], recs[5]["domain"]
    res = E.evaluate(recs, by=["domain"])
    assert res["acc5"] is None and "fewer than 5 classes" in res["acc5_note"]
    groups = res["groups"]["domain"]
    assert set(groups) == {"-", "photo", "painting"} and groups["-"]["n"] == 2  # MISSING: a group of its own
    assert sum(g["n"] for g in groups.values()) == 12 and all("per_class" not in g for g in groups.values())


def test_mcnemar_small_counts_and_the_chi_square_tail():
    from statistics import NormalDist

    assert E.mcnemar(0, 0) == {"discordant": 0, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    assert E.mcnemar(1, 0) == {"discordant": 1, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    for b, c in [(5, 3), (3, 5), (10, 2), (1, 12), (40, 25)]:
        res = E.mcnemar(b, c)
        n = b + c
        assert res["discordant"] == n and res["chi2"] == (abs(b - c) - 1) ** 2 / n  # Edwards' correction
        # chi-square with 1 degree of freedom: P(X > x) = P(|Z| > sqrt(x)), Z standard normal
        assert math.isclose(res["p_chi2"], 2 * (1 - NormalDist().cdf(math.sqrt(res["chi2"]))), rel_tol=1e-9)


def test_rounded_keeps_three_significant_digits_of_p_values_everywhere():
    raw = {"acc1": 0.123456, "p_exact": 0.000123456, "mcnemar": {"p_chi2": 0.98765, "chi2": 2.0 / 3},
           "rows": [0.987654321, {"p_x": 1.23456e-9, "n": 7}], "name": "p_1"}
    assert E.rounded(raw) == {"acc1": 0.1235, "p_exact": 0.000123, "mcnemar": {"p_chi2": 0.988, "chi2": 0.6667},
                              "rows": [0.9877, {"p_x": 1.23e-9, "n": 7}], "name": "p_1"}
    assert E.rounded([0.123456], 2) == [0.12] and E.rounded({"a": {"b": 0.123456}}, 2) == {"a": {"b": 0.12}}


def test_result_lines_hold_the_summary_groups_and_classes_only_when_asked():
    recs = fake_predictions(n=30)
    result = E.evaluate(recs, by=["domain"])
    rows = E.result_lines(result, {"predictions": "p.jsonl"})
    assert [r["kind"] for r in rows] == ["summary", "group", "group"]
    assert "per_class" not in rows[0] and "groups" not in rows[0] and rows[0]["predictions"] == "p.jsonl"
    with_classes = E.result_lines(result, {}, per_class=True)
    assert [r["class"] for r in with_classes if r["kind"] == "class"] == [r["class"] for r in result["per_class"]]


def test_compare_counts_every_cell_of_the_paired_table():
    def rec(i, label, pred):
        return prediction_record({"id": f"im{i}", "path": f"/x/{i}.jpg", "label": label}, pred, [(pred, 1.0)])

    # (A right, B right): 3 both, 2 only A, 4 only B, 1 both wrong (with different wrong answers)
    a = [rec(i, "x", "x") for i in range(5)] + [rec(i, "x", "y") for i in range(5, 10)]
    b = [rec(i, "x", "x") for i in range(3)] + [rec(i, "x", "y") for i in range(3, 5)] + \
        [rec(i, "x", "x") for i in range(5, 9)] + [rec(9, "x", "z")]
    summary, diff = E.compare(a, b, ("A", "B"))
    assert (summary["both_correct"], summary["only_a_correct"], summary["only_b_correct"], summary["both_wrong"]) \
        == (3, 2, 4, 1)
    assert summary["a"]["acc1"] == 0.5 and summary["b"]["acc1"] == 0.7
    assert math.isclose(summary["difference"], 0.2) and summary["mcnemar"] == E.mcnemar(2, 4)
    assert [d["id"] for d in diff] == ["im3", "im4", "im5", "im6", "im7", "im8", "im9"]
    assert diff[0] == {"id": "im3", "path": "/x/3.jpg", "label": "x", "pred_a": "x", "pred_b": "y",
                       "correct_a": True, "correct_b": False}
    b[0]["label"] = "w"
    with pytest.raises(E.BadInput, match=r"image 'im0': label 'x' in A but 'w' in B"):
        E.compare(a, b, ("A", "B"))
    with pytest.raises(E.BadInput, match="^left and right share no image id"):
        E.compare(a, [dict(r, id="z" + r["id"]) for r in b], ("left", "right"))


def test_compare_warns_only_when_some_images_are_in_one_file(tmp_path):
    recs = fake_predictions(n=20)
    pa = write(tmp_path / "a.jsonl", recs)
    res = invoke("eval", "compare", pa, write(tmp_path / "b.jsonl", recs[::-1]))
    assert res.exit_code == 0 and "present in both" not in res.stderr
    res = invoke("eval", "compare", pa, write(tmp_path / "c.jsonl", recs[:15]), "--names", "one,two")
    assert "comparing the 15 images present in both (one: 20, two: 15)" in " ".join(res.stderr.split())


def test_compare_files_where_names_stdin_and_output(tmp_path):
    recs = fake_predictions(n=30)
    other = fake_predictions(n=30, seed=1)
    (tmp_path / "x").mkdir()
    pa, pb = write(tmp_path / "p.jsonl", recs), write(tmp_path / "x" / "p.jsonl", other)
    for r in other:  # same images and labels, other predictions
        r["label"] = next(q["label"] for q in recs if q["id"] == r["id"])
    write(pb, other)
    res = invoke("eval", "compare", pa, pb, "--where", "domain=painting", "-o", tmp_path / "s.jsonl")
    assert res.exit_code == 0, res.output
    [out] = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    paintings = sum(r["domain"] == "painting" for r in recs)
    assert out["n"] == paintings and out["where"] == ["domain=painting"]
    assert "present in both" not in res.stderr  # --where selects in both files
    assert (out["a"]["name"], out["b"]["name"]) == ("A:p", "B:p")  # same stems: told apart
    assert out["a"]["predictions"] == str(pa) and out["b"]["predictions"] == str(pb)
    res = invoke("eval", "compare", "-", pb, input=pa.read_text())  # one of the two may be stdin
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["a"]["predictions"] == "<stdin>"
    res = invoke("eval", "compare", "-", "-", input=pa.read_text())
    assert res.exit_code == 2 and "only one of the two predictions files can be stdin" in res.stderr
    res = invoke("eval", "compare", pa, pb, "--where", "domain=sketch")
    assert res.exit_code == 2 and f"{pa}: no prediction matches --where domain=sketch" in res.stderr


def test_compare_report_lists_ten_disagreements_and_says_whether_it_is_chance(tmp_path, wide_console):
    recs = fake_predictions(n=60, skill=0.3)
    better = [prediction_record(r, r["label"], [(r["label"], 1.0)]) for r in recs]  # B is always right
    pa, pb = write(tmp_path / "a.jsonl", recs), write(tmp_path / "b.jsonl", better)
    res = invoke("eval", "compare", pa, pb)
    out = json.loads(res.stdout)
    assert "is unlikely to be chance (p < 0.05)" in res.stderr and "first 10 disagreements" in res.stderr
    rows = _table_rows(res.stderr)
    assert rows[0] == ["A top-1 %", "B top-1 %", "B - A", "only A right", "only B right", "McNemar p (exact)"]
    assert rows[1] == [f"{100 * out['a']['acc1']:.2f}", "100.00", f"{100 * out['difference']:+.2f}", "0",
                       str(out["only_b_correct"]), f"{out['mcnemar']['p_exact']:.3g}"]
    assert rows[2] == ["id", "label", "A", "B"]
    wrong = [r for r in recs if r["pred"] != r["label"]][:10]
    assert rows[3:] == [[r["id"], r["label"], r["pred"], r["label"]] for r in wrong]
    res = invoke("eval", "compare", pa, pa)
    assert "could well be chance (p >= 0.05)" in res.stderr and "disagreements" not in res.stderr
    assert "disagreements" not in invoke("eval", "compare", pa, pb, "--show", 0).stderr
    assert _table_rows(invoke("eval", "compare", pa, pb, "--show", 1).stderr)[3:] == [rows[3]]


def _table_rows(stderr):
    """The cells of every row of the rich tables on stderr (header rows included)."""
    return [[c.strip() for c in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
            for line in stderr.splitlines() if "│" in line or "┃" in line]


@pytest.fixture
def wide_console(monkeypatch):
    """stderr tables laid out 200 columns wide: one line per row, whatever the terminal."""
    from vlmtools import console

    monkeypatch.setattr(console.console, "_width", 200)


def test_eval_tables_show_the_numbers_of_the_summary_and_of_each_group(tmp_path, wide_console):
    recs = fake_predictions(n=40)
    res = invoke("eval", write(tmp_path / "p.jsonl", recs), "--by", "domain")
    result = E.evaluate(recs, by=["domain"])
    rows = _table_rows(res.stderr)
    head = ["images", "classes", "top-1 %", "top-5 %", "mean per-class recall %"]
    assert rows[0] == head and rows[2] == head[:0] + ["domain"] + head
    assert rows[1] == ["40", str(result["classes"]), f"{100 * result['acc1']:.2f}", f"{100 * result['acc5']:.2f}",
                       f"{100 * result['mean_per_class_recall']:.2f}"]
    for row, (value, g) in zip(rows[3:], result["groups"]["domain"].items()):
        assert row == [value, str(g["n"]), str(g["classes"]), f"{100 * g['acc1']:.2f}", f"{100 * g['acc5']:.2f}",
                       f"{100 * g['mean_per_class_recall']:.2f}"]
    assert "by domain" in res.stderr
    few = invoke("eval", write(tmp_path / "q.jsonl", fake_predictions(n=10, n_classes=4, k=4)))
    assert _table_rows(few.stderr)[1][3] == "-"  # no top-5 with 4 classes


def test_eval_where_titles_the_table_and_the_plots(tmp_path):
    recs = fake_predictions(n=30)
    for r in recs:
        r.update(method="cbd", model="vlmtools-micro")
    pred = write(tmp_path / "run.jsonl", recs)
    res = invoke("eval", pred, "--where", "domain=photo", "--plots", tmp_path / "a" / "b", "-o", tmp_path / "r.jsonl")
    assert res.exit_code == 0, res.output
    photos = sum(r["domain"] == "photo" for r in recs)
    assert f"{pred} (cbd, vlmtools-micro) where domain=photo" in res.stderr  # the title, whole on its line
    [head] = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]  # no class rows
    assert head["n"] == photos and head["where"] == ["domain=photo"] and head["method"] == "cbd"
    from PIL import Image

    for name in ("run.confusion.png", "run.per_class.png"):
        with Image.open(tmp_path / "a" / "b" / name) as im:
            assert im.info["Software"] == "vlmtools" and im.info["Description"] == "eval"
            assert f"cbd · vlmtools-micro · n = {photos} (domain=photo) {pred}" in im.info["Title"]
            assert " / " not in im.info["Title"]  # one title, over the matrix (not the colour bar's)
    assert f"wrote {tmp_path / 'a' / 'b' / 'run.confusion.png'}" in res.stderr
    res = invoke("eval", pred, "--where", "domain=sketch")
    assert res.exit_code == 2 and f"{pred}: no prediction matches --where domain=sketch" in res.stderr
    # a second eval into the same directory replaces the plots
    assert invoke("eval", pred, "--plots", tmp_path / "a" / "b", "-o", tmp_path / "r.jsonl").exit_code == 0
    assert "where" not in json.loads((tmp_path / "r.jsonl").read_text())


def test_titles_name_the_file_what_made_it_and_the_selection():
    origin = {"method": "cbd", "model": "m", "predictions": "p.jsonl"}
    assert E.table_title("p.jsonl", origin, ["domain=photo", "split=test"]) == \
        "p.jsonl (cbd, m) where domain=photo split=test"
    assert E.table_title("-", {}) == "<stdin>"
    assert E.plot_subtitle(origin, 12, ["a=b", "c=d"]) == "cbd · m · n = 12 (a=b c=d)\np.jsonl"
    assert E.plot_subtitle({"model": "m"}, 3) == "m · n = 3\n"
    assert [E.plot_name(p) for p in ("-", "d/run.jsonl", "run.json", "x.y", ".jsonl")] == \
        ["stdin", "run", "run", "x.y", ".jsonl"]


def test_provenance_keeps_only_what_every_line_agrees_on(tmp_path):
    import vlmtools

    recs = fake_predictions(n=4)
    for r in recs:
        r.update(method="cbd", model="m", store="s")
    recs[2]["store"] = "t"
    out = E.provenance(tmp_path / "p.jsonl", recs)
    assert out == {"predictions": str(tmp_path / "p.jsonl"), "method": "cbd", "model": "m",
                   "vlmtools_version": vlmtools.__version__}
    assert E.provenance("-", []) == {"predictions": "<stdin>", "vlmtools_version": vlmtools.__version__}
    assert E.provenance("-", recs[:1])["store"] == "s"  # one line agrees with itself


def test_per_class_csv_columns_and_blank_top5(tmp_path):
    E.write_per_class_csv(tmp_path / "a.csv", E.evaluate(fake_predictions(n=20, n_classes=4, k=4)))
    E.write_per_class_csv(tmp_path / "b.csv", E.evaluate(fake_predictions(n=20)))
    a = (tmp_path / "a.csv").read_bytes().decode().split("\n")  # bytes: "\r\n" would show
    assert a[0] == "class,n,correct,acc1,acc5" and a[1].endswith(",") and "\r" not in a[1]
    b = list(csv.DictReader(io.StringIO((tmp_path / "b.csv").read_text())))
    assert all(len(r["acc5"]) == 6 and float(r["acc5"]) >= float(r["acc1"]) for r in b)  # 4 decimals


def test_confusion_figure_shows_each_true_class_row_as_fractions(tmp_path):
    from PIL import Image

    classes = ["a", "b", "$\\frac{x}$"]  # a predicted-only class with a "$" pair: text, never mathtext
    matrix = np.array([[3, 1, 0], [0, 0, 1], [0, 0, 0]])
    fig = E.confusion_figure(classes, matrix)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.75, 0.25, 0], [0, 0, 1], [0, 0, 0]])
    assert ax.images[0].get_clim() == (0, 1)  # colours mean the same fraction in every plot
    even = E.confusion_figure(["a", "b"], np.array([[1, 1], [1, 1]])).axes[0].images[0]
    assert even.get_clim() == (0, 1)  # also where no fraction is 0 or 1
    assert [t.get_text() for t in ax.get_xticklabels()] == classes == [t.get_text() for t in ax.get_yticklabels()]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert fig.axes[1].get_ylabel() == "fraction of the true class"  # the colour bar
    E.plot_confusion(tmp_path / "c.png", classes, matrix)  # draws: a "$" pair would fail as mathtext
    E.plot_per_class(tmp_path / "p.png", [{"class": c, "n": 1, "acc1": 0.5} for c in classes])
    with Image.open(tmp_path / "c.png") as im:
        assert im.info["Title"] == "confusion matrix (rows normalized)" and "Description" not in im.info


def test_confusion_figure_of_many_classes_numbers_the_axes_and_keys_every_class():
    n = 2 * int(24 * 72 / 11) + 5  # more names than one column of the key holds: three columns
    classes = [f"class {i:03d} " + "long " * 10 for i in range(n)]
    fig = E.confusion_figure(classes, np.eye(n, dtype=int))
    ax = fig.axes[0]
    step = n // 40
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(0, n, step)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(0, n, step)]
    assert "see the key" in ax.get_xlabel() and "see the key" in ax.get_ylabel()
    key = [t.get_text().split("\n") for t in fig.texts]
    assert len(key) == 3 and sum(map(len, key)) == n
    lines = [line for column in key for line in column]
    assert [int(line.split()[0]) for line in lines] == list(range(n))
    assert all(len(line) <= 4 + 2 + 40 and line.endswith("…") for line in lines)  # names shortened to 40
    xs = [t.get_position()[0] for t in fig.texts]
    assert xs == sorted(xs) and xs[0] > 0.9  # beside the matrix, left to right


def test_the_class_key_starts_above_key_above_classes(tmp_path):
    names = [f"c{i}" for i in range(E.KEY_ABOVE)]
    ax = E.confusion_figure(names, np.eye(len(names), dtype=int)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names  # up to KEY_ABOVE: names on the axes
    names = [f"c{i}" for i in range(E.KEY_ABOVE)] + ["$\\frac{x}$"]
    fig = E.confusion_figure(names, np.eye(len(names), dtype=int))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(i) for i in range(len(names))]  # every one
    assert fig.texts and "$\\frac{x}$" in fig.texts[0].get_text()
    E._save(fig, tmp_path / "k.png")  # drawn: the key's "$" pair is text, not mathtext
    ax = E.confusion_figure([f"c{i}" for i in range(80)], np.eye(80, dtype=int)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(0, 80, 2)]  # at most ~40 ticks


def test_per_class_plot_sorts_the_bars_and_shows_percent(tmp_path, monkeypatch):
    rows = [{"class": "b", "n": 4, "acc1": 0.5}, {"class": "a", "n": 2, "acc1": 1.0}, {"class": "c", "n": 1, "acc1": 0.25}]
    E.plot_per_class(tmp_path / "p.png", rows, subtitle="cbd · n = 7")
    figures = []
    monkeypatch.setattr(E, "_save", lambda fig, path, kind=None: figures.append(fig))
    E.plot_per_class(tmp_path / "q.png", rows)
    ax = figures[0].axes[0]
    assert [p.get_width() for p in ax.patches] == [25.0, 50.0, 100.0]  # percent, worst at the bottom
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c (1)", "b (4)", "a (2)"]
    assert ax.get_xlim() == (0, 100) and ax.get_ylim() == (-0.5, 2.5)  # the whole scale, every bar whole
    assert ax.get_xlabel() == "top-1 accuracy %" and ax.get_title() == "per-class accuracy (images per class in brackets)"
    from PIL import Image

    with Image.open(tmp_path / "p.png") as im:
        assert im.info["Description"] == "eval" and "cbd · n = 7" in im.info["Title"]


def test_library_defaults_of_eval_and_compare(tmp_path, capsys, monkeypatch):
    """The library's defaults are the command's: no per-class rows, plots named eval.*, 10 disagreements shown,
    and no data printed to a terminal (a hint instead)."""
    recs = fake_predictions(n=40, skill=0.3)
    pa = write(tmp_path / "a.jsonl", recs)
    pb = write(tmp_path / "b.jsonl", [prediction_record(r, r["label"], [(r["label"], 1.0)]) for r in recs])
    rows = E.evaluate_file(pa, output=tmp_path / "r.jsonl")
    assert [r["kind"] for r in rows] == ["summary"]
    result = E.evaluate(recs)
    assert [p.name for p in E.write_plots(tmp_path / "plots", recs, result)] == ["eval.confusion.png", "eval.per_class.png"]
    capsys.readouterr()
    E.compare_files(pa, pb, output=tmp_path / "s.jsonl")
    assert "first 10 disagreements" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    E.evaluate_file(pa)
    assert "(the NDJSON rows: pipe the output" in capsys.readouterr().err
    E.compare_files(pa, pb)
    out = capsys.readouterr()
    assert out.out == "" and "(the NDJSON row: pipe the output" in out.err
    assert set(tmp_path.iterdir()) == before  # "-" is stdout: no file written
