"""Every table the commands print keeps its numbers at 80 columns (a pipe, a log, a narrow terminal), even
with long file, class and method names: a number is never wrapped, cut or squeezed to nothing."""

import io
import re

import pytest
from rich.console import Console

from vlmtools import console

LONG = "a-predictions-file-with-a-rather-long-descriptive-name-from-a-sweep.jsonl"
LONG_CLASS = "Black footed Albatross of the northern Pacific (juvenile plumage)"


@pytest.fixture
def at80(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=buf, force_terminal=False, width=80))
    monkeypatch.setattr(console, "_quiet", False)
    return buf


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+(?![\w.])", text))


def assert_intact(out: str, expected: set[str]) -> None:
    assert all(len(line) <= 80 for line in out.splitlines() if re.search("[│┃━─]", line)), out
    missing = sorted(expected - _numbers(out))
    assert not missing, f"numbers lost at 80 columns: {missing}\n{out}"


def test_eval_tables(at80):
    from tests.test_eval import fake_predictions
    from vlmtools.evaluate import evaluate, report

    records = fake_predictions(n=60)
    for r in records:
        r["domain"] = LONG_CLASS if r["domain"] == "photo" else r["domain"]
    result = evaluate(records, ["domain"])
    report(result, title=f"{LONG} (probe:probe-seed-0, vlmtools-micro (pretrained=vlmtools)) where split=test")
    expected = {f"{100 * result['acc1']:.2f}", f"{100 * result['mean_per_class_recall']:.2f}"}
    expected |= {f"{100 * g['acc1']:.2f}" for g in result["groups"]["domain"].values()}
    assert_intact(at80.getvalue(), expected)


def test_eval_compare_table(at80):
    from tests.test_eval import fake_predictions
    from vlmtools.evaluate import compare, report_compare

    a, b = fake_predictions(n=60), fake_predictions(n=60, seed=0, skill=0.9)
    summary, diff = compare(a, b, (LONG[:40], LONG[:30] + "-b"))
    report_compare(summary, diff, show=3)
    expected = {f"{100 * summary['a']['acc1']:.2f}", f"{100 * summary['b']['acc1']:.2f}",
                f"{100 * summary['difference']:+.2f}"}
    assert_intact(at80.getvalue(), expected)


def test_eval_explanations_table_has_short_labels_and_a_legend(at80):
    from vlmtools.explain.visual import summary_table

    long = "ala head_config=9:d3f175 head_training=8:132bdd head_classes=10:94efc1"
    methods = [{"method": "ala", "label": long, "runs": 3, "maps": ["maps/ala-a", "maps/ala-b", "maps/ala-c"],
                "iou": 0.27512, "insertion": 0.49611, "deletion": 0.26834, "id_score": 0.22777,
                "iou_std": 0.0581, "insertion_std": 0.0001, "deletion_std": 0.0049, "id_score_std": 0.0062},
               {"method": "ala", "label": long.replace("d3f175", "0a1b2c"), "runs": 1, "maps": ["maps/ala-x"],
                "iou": 0.3, "insertion": 0.5, "deletion": 0.2, "id_score": 0.3},
               {"method": "gradcam", "label": "gradcam layer=2", "runs": 1, "maps": ["maps/gc"],
                "iou": 0.29, "insertion": 0.495, "deletion": 0.284, "id_score": 0.211}]
    summary_table({"steps": "ceil(H·W/224) px per step", "threshold": "8-bit grey > 127", "scorer": "own",
                   "methods": methods})
    out = at80.getvalue()
    assert_intact(out, {"0.275", "0.058", "0.496", "0.268", "0.228", "0.300", "0.290", "0.211"})
    rows = [line for line in out.splitlines() if "│" in line]
    assert any(re.match(r"│ ala #1 +│ +3 │", r) for r in rows) and any("gradcam layer=2" in r for r in rows)
    assert f"ala #1: {long}; maps maps/ala-a, maps/ala-b, maps/ala-c" in " ".join(out.split())
    assert "gradcam layer=2: maps maps/gc" in out
    assert "abcdef the start of its sha1" in out


def test_explain_box_table(at80):
    from vlmtools.explain.boxes import table

    rows = [{"id": f"{LONG}-{i}", "label": LONG_CLASS, "domain": "painting", "log_volume": -75.61 + i,
             "mean_side": 1.3512, "min_side": 0.0123, "max_side": 4.2071} for i in range(3)]
    console.info(table(rows, "image"))
    assert_intact(at80.getvalue(), {"-75.61", "-74.61", "1.351", "0.0123", "4.207"})
