"""Study 004's Table 1 as `eval table` computes it, in this process (tests/test_eval_table.py runs the command
as a subprocess): per method the mean top-1 over its runs and numpy's population std (ddof=0), cells in
percent, columns in the order asked. (Written where mutation testing showed the suite would not notice a
one-line change; see tests/MUTANTS.md.)"""

import json

import numpy as np
import pytest

from vlmtools import formats
from vlmtools.errors import BadInput
from vlmtools.tables import (build_table, cell_text, mean_std, parse_columns, parse_runs, run_accuracies, table_file,
                             write_table)


def _preds(path, right_by_domain: dict[str, int], n: int = 10):
    """n predictions per domain, the first right_by_domain[domain] of them right."""
    recs = [{"id": f"{dom}{i}", "label": "a", "pred": "a" if i < ok else "b", "domain": dom,
             "topk": [{"class": "a" if i < ok else "b", "score": 1.0}]}
            for dom, ok in right_by_domain.items() for i in range(n)]
    formats.write_jsonl(path, recs)
    return str(path)


def test_cells_are_mean_and_population_std_over_runs(tmp_path):
    a = [_preds(tmp_path / f"a{s}.jsonl", {"photo": p, "painting": q}) for s, (p, q) in
         enumerate([(8, 4), (6, 6), (7, 2)])]
    z = _preds(tmp_path / "z.jsonl", {"photo": 5, "painting": 1})
    table = build_table([f"zs={z}", *(f"lare={p}" for p in a)], by="domain")
    assert table["by"] == "domain" and table["columns"] == ["painting", "photo"]  # every value, sorted
    zs, lare = table["rows"]
    assert (zs["method"], zs["runs"], lare["method"], lare["runs"]) == ("zs", 1, "lare", 3)
    assert zs["cells"]["photo"] == {"mean": 0.5, "std": 0.0, "n": 1}
    photo = [0.8, 0.6, 0.7]
    assert lare["cells"]["photo"]["mean"] == pytest.approx(np.mean(photo), abs=1e-12)
    assert lare["cells"]["photo"]["std"] == pytest.approx(np.std(photo), abs=1e-12)  # ddof=0, as the study's ±
    assert lare["cells"]["painting"]["std"] == pytest.approx(np.std([0.4, 0.6, 0.2]), abs=1e-12)
    assert lare["cells"]["photo"]["n"] == 3
    assert cell_text(zs["cells"]["photo"]) == "50.00" and cell_text(lare["cells"]["photo"]) == "70.00 (±8.16)"
    assert cell_text(None) == "-"


def test_columns_are_the_ones_asked_for_in_order_and_all_is_every_image(tmp_path):
    a = _preds(tmp_path / "a.jsonl", {"photo": 9, "painting": 3})
    table = build_table([f"m={a}"], by="domain", columns=["out=painting", "in=photo", "all"])
    assert table["columns"] == ["out", "in", "all"]
    cells = table["rows"][0]["cells"]
    assert [cells[c]["mean"] for c in ("out", "in", "all")] == pytest.approx([0.3, 0.9, 0.6])
    assert build_table([f"m={a}"])["columns"] == ["all"]             # no --by: one column of every image
    assert build_table([f"m={a}"])["rows"][0]["cells"]["all"]["mean"] == pytest.approx(0.6)
    assert run_accuracies(a, None) == {"all": pytest.approx(0.6)}
    assert run_accuracies(a, "domain") == {"all": pytest.approx(0.6), "photo": pytest.approx(0.9),
                                           "painting": pytest.approx(0.3)}


def test_a_method_missing_a_column_shows_a_dash_and_runs_must_cover_the_same_images(tmp_path):
    both = _preds(tmp_path / "both.jsonl", {"photo": 5, "painting": 5})
    photo_only = _preds(tmp_path / "photo.jsonl", {"photo": 10})
    table = build_table([f"zs={photo_only}", f"lare={both}"], by="domain")
    assert table["rows"][0]["cells"]["painting"] is None and table["rows"][0]["cells"]["photo"]["mean"] == 1.0
    with pytest.raises(BadInput, match=r"method 'lare': only 1 of its 2 runs have images with domain=painting"):
        build_table([f"lare={both}", f"lare={photo_only}"], by="domain")
    with pytest.raises(BadInput, match=r"no run has images with domain = sketch"):
        build_table([f"zs={both}"], by="domain", columns=["sketch"])


def test_names_and_columns_are_parsed_as_written():
    assert parse_runs(["a=x.jsonl", "b=dir/y=1.jsonl"]) == [("a", "x.jsonl"), ("b", "dir/y=1.jsonl")]
    assert parse_columns(["in-domain=photo", "painting"]) == [("in-domain", "photo"), ("painting", "painting")]
    for bad in (["a="], ["=x.jsonl"], ["x.jsonl"]):
        with pytest.raises(BadInput, match=r"expected NAME=PREDICTIONS.jsonl"):
            parse_runs(bad)
    with pytest.raises(BadInput, match="no runs given"):
        parse_runs([])
    for bad in ("=photo", "in="):
        with pytest.raises(BadInput, match=r"--column .*expected LABEL=VALUE"):
            parse_columns([bad])
    assert mean_std([0.5]) == (0.5, 0.0) and mean_std([0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(0.1))


def test_tsv_and_json_lines_written(tmp_path):
    a1 = _preds(tmp_path / "a1.jsonl", {"photo": 8, "painting": 4})
    a2 = _preds(tmp_path / "a2.jsonl", {"photo": 6, "painting": 6})
    out = tmp_path / "t.tsv"
    table_file([f"lare={a1}", f"lare={a2}"], by="domain", columns=["in=photo", "out=painting"], output=out)
    assert out.read_text().splitlines() == ["method\truns\tin\tout", "lare\t2\t70.00 (±10.00)\t50.00 (±10.00)"]
    table_file([f"lare={a1}", f"lare={a2}"], by="domain", output=tmp_path / "t.jsonl", json_lines=True)
    row = json.loads((tmp_path / "t.jsonl").read_text())
    assert row["method"] == "lare" and row["runs"] == 2 and row["by"] == "domain"
    assert row["cells"]["painting"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.1), "n": 2}


def test_defaults_write_tsv_to_stdout_and_images_without_the_key_form_a_dash_column(tmp_path, capsys):
    a = _preds(tmp_path / "a.jsonl", {"photo": 6})
    recs = [json.loads(line) for line in open(a)]
    for r in recs[:4]:
        del r["domain"]  # 4 images without the key, all right; 2 of the other 6
    formats.write_jsonl(tmp_path / "b.jsonl", recs)
    table = table_file([f"m={tmp_path / 'b.jsonl'}"], by="domain")
    assert table["columns"] == ["-", "photo"]
    assert capsys.readouterr().out.splitlines() == ["method\truns\t-\tphoto", "m\t1\t100.00\t33.33"]
    write_table(table)
    assert capsys.readouterr().out.startswith("method\truns\t-\tphoto\n")


def test_the_messages_a_user_sees(tmp_path):
    a = _preds(tmp_path / "a.jsonl", {"photo": 5})
    for call, message in (
            (lambda: parse_runs([]), "no runs given: pass NAME=PREDICTIONS.jsonl arguments"),
            (lambda: build_table([f"m={a}"], columns=["x=photo"]),
             "--column VALUE needs --by KEY (the manifest key whose values are the columns)"),
            (lambda: build_table([f"m={a}"], by="domain", columns=["sketch", "clipart"]),
             "no run has images with domain = sketch, clipart")):
        with pytest.raises(BadInput) as err:
            call()
        assert str(err.value) == message
    assert parse_columns(["in=key=value"]) == [("in", "key=value")]  # a value may hold "="
