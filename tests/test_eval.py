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
