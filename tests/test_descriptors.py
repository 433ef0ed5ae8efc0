"""`vlmtools descriptors import|export|stats` and the interchange library behind them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.describe.interchange import descriptor_stats, export_dict, import_descriptors
from vlmtools.errors import BadInput
from vlmtools.formats import read_descriptors

runner = CliRunner()

# Key order is not alphabetical on purpose: CBD/WaffleCLIP number classes by key order.
CBD_DICT = {
    "Sooty_Albatross": ["dark grey or sooty plumage", "white rings around the eyes", "long, narrow wings"],
    "Black_footed_Albatross": ["dark brown plumage", "white feathers at the base of the beak"],
    "Horned_Puffin": ["bright orange legs and feet", "two black horns on the head", "bright orange legs and feet"],
}


def write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def test_import_keeps_key_order_and_tags_the_format(tmp_path):
    src = write(tmp_path, "descriptors_cub.json", CBD_DICT)
    out = tmp_path / "d.jsonl"
    result = runner.invoke(app, ["descriptors", "import", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    recs = read_descriptors(out)
    assert list(recs) == list(CBD_DICT)
    assert all(recs[c]["descriptors"] == CBD_DICT[c] and recs[c]["style"] == "cbd" for c in CBD_DICT)
    cupl = runner.invoke(app, ["descriptors", "import", str(src), "--format", "cupl"])
    assert cupl.exit_code == 0
    assert {json.loads(line)["style"] for line in cupl.stdout.splitlines()} == {"cupl"}


def test_import_from_stdin():
    result = runner.invoke(app, ["descriptors", "import", "-"], input=json.dumps(CBD_DICT))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["class"] for line in result.stdout.splitlines()] == list(CBD_DICT)


def test_export_round_trips_the_dict_in_order(tmp_path):
    src = write(tmp_path, "in.json", CBD_DICT)
    jsonl = tmp_path / "d.jsonl"
    assert runner.invoke(app, ["descriptors", "import", str(src), "-o", str(jsonl)]).exit_code == 0
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["descriptors", "export", str(jsonl), "--format", "cbd", "-o", str(out)])
    assert result.exit_code == 0, result.output
    back = json.loads(out.read_text())
    assert back == CBD_DICT and list(back) == list(CBD_DICT)


def test_export_kind_filter_uses_the_kinds_list(tmp_path):
    rec = {"class": "Horned Puffin", "descriptors": ["orange feet", "rocky coasts", "black horns"],
           "kinds": ["object", "background", "object"]}
    src = write(tmp_path, "d.jsonl", json.dumps(rec) + "\n")
    for kind, expected in [("all", rec["descriptors"]), ("object", ["orange feet", "black horns"]),
                           ("background", ["rocky coasts"])]:
        result = runner.invoke(app, ["descriptors", "export", str(src), "--kind", kind])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"Horned Puffin": expected}
    records = list(read_descriptors(src).values())
    assert export_dict(records, "object") == {"Horned Puffin": ["orange feet", "black horns"]}


def test_stats_counts_duplicates_background_and_shared(tmp_path):
    recs = [
        {"class": "a", "descriptors": ["long tail", "long tail", "rocky coast"],
         "kinds": ["object", "object", "background"]},
        {"class": "b", "descriptors": ["long tail", "red"]},
    ]
    src = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    result = runner.invoke(app, ["descriptors", "stats", str(src), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    rows, total = lines[:-1], lines[-1]["total"]
    assert rows[0] == {"class": "a", "descriptors": 3, "duplicates": 1, "background": 1,
                       "mean_chars": round((9 + 9 + 11) / 3, 1), "mean_words": 2.0}
    assert rows[1]["descriptors"] == 2 and rows[1]["duplicates"] == 0 and rows[1]["background"] == 0
    assert total["classes"] == 2 and total["descriptors"] == 5 and total["duplicates"] == 1
    assert total["min_per_class"] == 2 and total["max_per_class"] == 3
    assert total["shared_across_classes"] == 1  # "long tail" is in both
    table = runner.invoke(app, ["descriptors", "stats", str(src)])
    assert table.exit_code == 0
    tsv = table.stdout.splitlines()
    assert len(tsv) == 3 and all(len(line.split("\t")) == 6 for line in tsv)  # a header and data rows only
    assert tsv[0].split("\t")[:3] == ["class", "descriptors", "duplicates"]
    assert tsv[1].split("\t")[:4] == ["a", "3", "1", "1"]
    assert "2 classes, 5 descriptors" in " ".join(table.stderr.split())


def test_export_import_round_trips_kinds_and_style(tmp_path):
    recs = [{"class": "Horned Puffin", "descriptors": ["orange feet", "rocky cliffs"],
             "kinds": ["object", "background"], "style": "background"},
            {"class": "Crested Auklet", "descriptors": [], "style": "background"}]
    src = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    exported = runner.invoke(app, ["descriptors", "export", str(src), "--format", "vlmtools"])
    assert exported.exit_code == 0, exported.output
    assert len(exported.stdout.splitlines()) == 1  # one compact line, never indented JSON on stdout
    back = runner.invoke(app, ["descriptors", "import", "-"], input=exported.stdout)
    assert back.exit_code == 0, back.output
    assert [json.loads(line) for line in back.stdout.splitlines()] == recs
    lossy = runner.invoke(app, ["descriptors", "export", str(src)])
    assert lossy.exit_code == 0 and json.loads(lossy.stdout) == {"Horned Puffin": ["orange feet", "rocky cliffs"],
                                                                 "Crested Auklet": []}
    assert "--format vlmtools keeps them" in " ".join(lossy.stderr.split())
    refused = runner.invoke(app, ["descriptors", "export", str(src), "--format", "vlmtools", "--kind", "object"])
    assert refused.exit_code == 2


def test_stats_reads_a_cbd_dict_directly(tmp_path):
    src = write(tmp_path, "in.json", CBD_DICT)
    rows, total = descriptor_stats(import_descriptors(src))
    assert [r["class"] for r in rows] == list(CBD_DICT)
    result = runner.invoke(app, ["descriptors", "stats", str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["total"] == total


def test_empty_lists_are_kept_with_a_warning(tmp_path):
    src = write(tmp_path, "in.json", {"a": ["x"], "b": []})
    result = runner.invoke(app, ["descriptors", "import", str(src)])
    assert result.exit_code == 0
    assert "class 'b' has no descriptors" in " ".join(result.stderr.split())
    assert [json.loads(line)["descriptors"] for line in result.stdout.splitlines()] == [["x"], []]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON object"),
    ('["a", "b"]', "expected a JSON object"),
    ("{}", "expected a JSON object"),
    ('{"a": "just a string"}', "class 'a': expected a list of strings"),
    ('{"a": ["ok", 3]}', "class 'a': expected a list of strings"),
])
def test_import_bad_input(tmp_path, content, message):
    src = write(tmp_path, "in.json", content)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["descriptors", "import", str(src), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and str(src) in result.stderr.replace("\n", "")
    assert not out.exists()
    with pytest.raises(BadInput):
        import_descriptors(src)


def test_export_and_stats_bad_input(tmp_path):
    bad = write(tmp_path, "bad.jsonl", '{"class": "a", "descriptors": ["x"]}\n{"class": "a", "descriptors": ["y"]}\n')
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["descriptors", "export", str(bad), "-o", str(out)])
    assert result.exit_code == 2 and f"{bad}:2" in result.stderr.replace("\n", "")
    assert not out.exists()
    good = write(tmp_path, "good.jsonl", '{"class": "a", "descriptors": ["x"]}\n')
    for args in (["export", str(good), "--format", "clip"], ["export", str(good), "--kind", "habitat"],
                 ["import", str(good), "--format", "xml"], ["stats", str(tmp_path / "missing.jsonl")]):
        result = runner.invoke(app, ["descriptors", *args])
        assert result.exit_code == 2, (args, result.output)
    assert not out.exists()


def test_descriptors_help_lists_the_subcommands():
    result = runner.invoke(app, ["descriptors", "--help"])
    assert result.exit_code == 0
    for sub in ("import", "export", "stats"):
        assert sub in result.stdout


@pytest.mark.parametrize("args", [["import"], ["import", "--format", "cupl"], ["export"], ["stats"],
                                  ["stats", "--json"]])
def test_files_that_are_not_utf8_are_bad_input(tmp_path, args):
    src = tmp_path / "latin1.json"
    src.write_bytes('{"Horned_Puffin": ["caf\xe9-brown back"]}\n'.encode("latin-1"))
    out = tmp_path / "out"
    extra = ["-o", str(out)] if args[0] != "stats" else []
    result = runner.invoke(app, ["descriptors", args[0], str(src), *args[1:], *extra])
    assert result.exit_code == 2, result.output
    assert f"{src}:1: not UTF-8 text" in result.stderr.replace("\n", "")
    assert "Traceback" not in result.output and result.stdout == "" and not out.exists()
    with pytest.raises(BadInput, match="not UTF-8 text"):
        import_descriptors(src)
