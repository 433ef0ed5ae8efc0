"""`vlmtools batch`: command lines in one process, each model loaded once; stops at the first failure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.cli.batch import parse_lines
from vlmtools.errors import BadInput

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_lines_are_shell_words_with_comments_headings_continuations_and_stdout_files():
    text = ("# a comment\n"
            "# == step one\n"
            "vlmtools embed text 'a b.txt' -o \"st ore\"  # trailing comment\n"
            "\n"
            "classify st --templates 'it'\\''s {}' \\\n"
            "  -o - > 'out file.jsonl'\n")
    lines = parse_lines(text, "F")
    assert [(ln.number, ln.args, ln.stdout, ln.heading) for ln in lines] == [
        (3, ["embed", "text", "a b.txt", "-o", "st ore"], None, "step one"),
        (5, ["classify", "st", "--templates", "it's {}", "-o", "-"], "out file.jsonl", "step one")]
    assert str(lines[1]) == "vlmtools classify st --templates 'it'\"'\"'s {}' -o - > 'out file.jsonl'"


@pytest.mark.parametrize("text, message", [
    ("eval 'unclosed\n", "F:1: No closing quotation"),
    ("eval a > b > c\n", "F:1: expected a vlmtools command"),
    ("\n> out\n", "F:2: expected a vlmtools command"),
    ("batch other.txt\n", "F:1: a batch cannot run another batch"),
    ("eval a \\", "F: the last line ends in a backslash"),
])
def test_bad_lines_name_the_file_and_line(text, message):
    with pytest.raises(BadInput, match=message):
        parse_lines(text, "F")


@pytest.fixture
def store(tmp_path, image_dir):
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(image_dir.glob("img0*.png"))))
    return manifest


def test_a_batch_loads_each_model_once_and_keeps_going_in_order(tmp_path, store, monkeypatch):
    from vlmtools import models

    loads = []
    real = models._load_model

    def counting(spec, device, precision):
        loads.append((spec.name, precision))
        return real(spec, device, precision)

    monkeypatch.setattr(models, "_load_model", counting)
    tiny = ["-m", "vlmtools-tiny", "-p", "none", "--device", "cpu"]
    lines = [
        ["embed", "images", store, "-o", tmp_path / "img", *tiny, "-j", "0"],
        ["classify", tmp_path / "img", "--classes", tmp_path / "classes.txt", *tiny, ">", tmp_path / "pred.jsonl"],
        ["classify", tmp_path / "img", "--classes", tmp_path / "classes.txt", *tiny, "--precision", "fp32",
         "--no-cache", "-o", tmp_path / "pred32.jsonl"],
    ]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    batch = tmp_path / "b.txt"
    batch.write_text("".join(" ".join(f"'{a}'" for a in line) + "\n" for line in lines))
    res = invoke("batch", batch)
    assert res.exit_code == 0, res.output
    # embed and the first classify share the model (amp); fp32 is another build of it
    assert loads == [("vlmtools-tiny", "amp"), ("vlmtools-tiny", "fp32")]
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 10 and all(p["pred"] in ("cat", "dog") for p in preds)
    assert len((tmp_path / "pred32.jsonl").read_text().splitlines()) == 10
    assert "batch: 3 commands" in res.stderr
    # outside a batch, every load builds the model again
    loads.clear()
    for name in ("p2", "p3"):
        assert invoke("classify", tmp_path / "img", "--classes", tmp_path / "classes.txt", *tiny, "--no-cache",
                      "-o", tmp_path / f"{name}.jsonl").exit_code == 0
    assert len(loads) == 2


def test_keep_loaded_drops_the_least_recently_used_model(monkeypatch):
    from vlmtools import models

    built = []
    monkeypatch.setattr(models, "_load_model", lambda spec, device, precision: built.append(spec.name) or object())
    a, b, c = (models.ModelSpec.parse(n, "none") for n in ("vlmtools-tiny", "vlmtools-tiny-coca", "vlmtools-micro"))
    with models.keep_loaded(limit=2):
        first = models.load_model(a, "cpu")
        assert models.load_model(a, "cpu") is first
        models.load_model(b, "cpu")
        models.load_model(a, "cpu")      # a is now the most recent
        models.load_model(c, "cpu")      # drops b
        models.load_model(a, "cpu")
        models.load_model(b, "cpu")      # built again
    assert built == ["vlmtools-tiny", "vlmtools-tiny-coca", "vlmtools-micro", "vlmtools-tiny-coca"]
    models.load_model(a, "cpu")          # outside: no cache
    assert built[-1] == "vlmtools-tiny" and models._kept is None


def test_the_first_failing_line_stops_the_batch_with_its_exit_code(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "1", "label": "a", "pred": "a", "topk": [{"class": "a", "score": 1.0}]}) + "\n")
    batch = tmp_path / "b.txt"
    batch.write_text(f"# == evaluating\neval {tmp_path / 'p.jsonl'} > {tmp_path / 'ok.jsonl'}\n"
                     f"eval {tmp_path / 'missing.jsonl'} > {tmp_path / 'bad.jsonl'}\n"
                     f"eval {tmp_path / 'p.jsonl'} -o {tmp_path / 'never.jsonl'}\n")
    res = invoke("batch", batch)
    assert res.exit_code == 2
    assert json.loads((tmp_path / "ok.jsonl").read_text().splitlines()[0])["acc1"] == 1.0
    assert not (tmp_path / "bad.jsonl").exists() and not list(tmp_path.glob("bad.jsonl.tmp*"))
    assert not (tmp_path / "never.jsonl").exists()  # not run
    err = " ".join(res.stderr.split())
    assert f"{batch}:3 (in: evaluating): exit 2: vlmtools eval {tmp_path / 'missing.jsonl'}" in err
    # a usage error is a failure too (exit 2, typer's message)
    batch.write_text("eval --no-such-option x\n")
    res = invoke("batch", batch)
    assert res.exit_code == 2 and "No such option" in res.stderr


def test_quiet_on_one_line_holds_for_that_line_only(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "1", "label": "a", "pred": "a", "topk": [{"class": "a", "score": 1.0}]}) + "\n")
    batch = tmp_path / "b.txt"
    batch.write_text(f"eval -q {tmp_path / 'p.jsonl'} -o {tmp_path / 'e1.jsonl'}\n"
                     f"eval {tmp_path / 'p.jsonl'} -o {tmp_path / 'e2.jsonl'}\n")
    res = invoke("batch", batch)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("top-1") == 1  # the second line's table only


@pytest.mark.parametrize("content, message", [("", "no command lines"), ("# only a comment\n", "no command lines")])
def test_empty_batch_is_bad_input(tmp_path, content, message):
    (tmp_path / "b.txt").write_text(content)
    res = invoke("batch", tmp_path / "b.txt")
    assert res.exit_code == 2 and message in res.stderr
    res = invoke("batch", tmp_path / "none.txt")
    assert res.exit_code == 2


def test_batch_from_stdin_in_a_real_process(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "1", "label": "a", "pred": "b", "topk": [{"class": "b", "score": 1.0}]}) + "\n")
    res = subprocess.run([sys.executable, "-m", "vlmtools", "batch", "-"], input=f"eval {tmp_path / 'p.jsonl'}\n",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["acc1"] == 0.0  # the line's stdout is the batch's
