"""`vlmtools eval table`: methods x domains, mean ± std over runs."""

import json

from typer.testing import CliRunner

from tests.conftest import run_cli
from vlmtools import formats
from vlmtools.cli.app import app


def _preds(path, correct_photo, correct_painting, n=10):
    """n photo and n painting predictions, the first correct_* of each right."""
    recs = []
    for dom, ok in (("photo", correct_photo), ("painting", correct_painting)):
        for i in range(n):
            pred = "a" if i < ok else "b"
            recs.append({"id": f"{dom}{i}", "label": "a", "pred": pred, "topk": [{"class": pred, "score": 1.0}],
                         "domain": dom})
    formats.write_jsonl(path, recs)
    return path


def test_table_mean_std_over_runs(tmp_path):
    a1 = _preds(tmp_path / "a1.jsonl", 8, 4)
    a2 = _preds(tmp_path / "a2.jsonl", 6, 6)
    z = _preds(tmp_path / "z.jsonl", 5, 1)
    res = run_cli("eval", "table", f"zs={z}", f"lare={a1}", f"lare={a2}", "--by", "domain",
                  "--column", "in-domain=photo", "--column", "out-of-domain=painting")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split("\t") == ["method", "runs", "in-domain", "out-of-domain"]
    assert lines[1].split("\t") == ["zs", "1", "50.00", "10.00"]
    assert lines[2].split("\t") == ["lare", "2", "70.00 (±10.00)", "50.00 (±10.00)"]
    res = run_cli("eval", "table", f"lare={a1}", f"lare={a2}", "--by", "domain", "--json")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["runs"] == 2 and abs(row["cells"]["photo"]["mean"] - 0.7) < 1e-9
    assert set(row["cells"]) == {"painting", "photo"}


def test_table_bad_input(tmp_path):
    a1 = _preds(tmp_path / "a1.jsonl", 8, 4)
    out = tmp_path / "t.tsv"
    for args, msg in ((["lare", "-o", out], "NAME=PREDICTIONS"),
                      ([f"lare={a1}", "--by", "nokey", "-o", out], "nokey"),
                      ([f"lare={tmp_path / 'missing.jsonl'}", "-o", out], "no such file"),
                      ([f"lare={a1}", "--column", "x=photo", "-o", out], "--by")):
        res = CliRunner().invoke(app, ["eval", "table", *map(str, args)])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert not out.exists()
