"""What a result rests on and how it is shown: provenance of head predictions through eval and report,
which rows classify scored (and the warning when a head is scored on its training rows), eval --where,
eval's terminal-vs-pipe rule, plots named and titled after their predictions, training curves, and the
sweep plot's axis."""

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import LOADED_DEADLINE, end_process
from tests.test_train import TINY, blobs
from vlmtools.cli.app import app
from vlmtools.store import write_arrays

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long stderr lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov")
    x, meta = blobs()  # 4 classes x 40 rows: 20 train, 10 val, 10 test per class
    write_arrays(d / "images", x, meta, kind="image", model=TINY)
    res = invoke("train", "probe", d / "images", "-o", d / "probe-s0", "--where", "split=train",
                 "--val-where", "split=val", "--epochs", 40, "--plots", d / "plots")
    assert res.exit_code == 0, res.output
    return d, flat(res.stderr)


def test_head_predictions_carry_method_model_store_precision(trained):
    d, _ = trained
    res = invoke("classify", d / "images", "--head", d / "probe-s0", "--where", "split=test", "-o", d / "p.jsonl")
    assert res.exit_code == 0, res.output
    preds = [json.loads(line) for line in (d / "p.jsonl").read_text().splitlines()]
    assert {p["method"] for p in preds} == {"probe:probe-s0"}
    assert {p["model"] for p in preds} == {"vlmtools-tiny (pretrained=none)"}
    assert {p["store"] for p in preds} == {str(d / "images")}
    assert all(set(p["precision"]) == {"image", "text"} and p["precision"]["text"] is None for p in preds)
    head = json.loads(invoke("eval", d / "p.jsonl").stdout.splitlines()[0])
    assert head["method"] == "probe:probe-s0" and head["model"] == "vlmtools-tiny (pretrained=none)"
    res = invoke("report", d, "-o", d / "report.html", "--gallery", 0)
    assert res.exit_code == 0, res.output
    assert "<td>probe:probe-s0</td><td>vlmtools-tiny (pretrained=none)</td>" in (d / "report.html").read_text()


def test_classify_says_which_rows_and_warns_on_training_rows(trained):
    d, _ = trained
    res = invoke("classify", d / "images", "--head", d / "probe-s0", "-o", d / "all.jsonl")
    assert res.exit_code == 0, res.output
    err = flat(res.stderr)
    assert "classified all 160 rows (40 test, 80 train, 40 val;" in err
    # 80 train rows (its --where) and 40 val rows (its --val-where) of this very store were seen
    assert "warning: 120 of the 160 rows scored are rows head" in err and "no test accuracy" in err
    res = invoke("classify", d / "images", "--head", d / "probe-s0", "--where", "split=test", "-o", d / "t.jsonl")
    assert res.exit_code == 0 and "warning" not in res.stderr
    assert "classified 40 rows with split=test" in flat(res.stderr)
    other = d / "copy"
    x, meta = blobs()
    write_arrays(other, x, meta, kind="image", model=TINY)  # another store: the head never saw its rows
    res = invoke("classify", other, "--head", d / "probe-s0", "-o", d / "o.jsonl")
    assert res.exit_code == 0 and "warning" not in res.stderr


def test_eval_where_selects_rows(trained):
    d, _ = trained
    invoke("classify", d / "images", "--head", d / "probe-s0", "-o", d / "all.jsonl")
    res = invoke("eval", d / "all.jsonl", "--where", "split=test", "--where", "label=alpha")
    assert res.exit_code == 0, res.output
    head = json.loads(res.stdout.splitlines()[0])
    assert head["n"] == 10 and head["where"] == ["split=test", "label=alpha"]
    res = invoke("eval", d / "all.jsonl", "--where", "split=nowhere")
    assert res.exit_code == 2 and "no prediction matches --where split=nowhere" in flat(res.output)
    res = invoke("eval", "compare", d / "all.jsonl", d / "all.jsonl", "--names", "a,b", "--where", "split=val")
    assert res.exit_code == 0 and json.loads(res.stdout)["n"] == 40


def _on_a_terminal(args, cwd):
    """Run vlmtools with stdout on a pseudo-terminal (stderr a pipe): (stdout, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vlmtools", *map(str, args)], stdout=slave,
                            stderr=subprocess.PIPE, cwd=cwd, env={**os.environ, "COLUMNS": "100"})
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        err = proc.stderr.read().decode()
        proc.wait(timeout=LOADED_DEADLINE)
    finally:
        end_process(proc)
        os.close(master)
    return b"".join(chunks).decode(), err


def test_eval_prints_the_table_on_a_terminal_and_the_rows_to_a_pipe(trained):
    d, _ = trained
    invoke("classify", d / "images", "--head", d / "probe-s0", "--where", "split=test", "-o", d / "p.jsonl")
    out, err = _on_a_terminal(["eval", d / "p.jsonl"], d)
    assert "vlmtools.eval/1" not in out and "top-1 %" in err and "pipe the output or pass -o FILE" in flat(err)
    piped = subprocess.run([sys.executable, "-m", "vlmtools", "eval", str(d / "p.jsonl")], capture_output=True,
                           text=True, timeout=60)
    assert json.loads(piped.stdout.splitlines()[0])["format"] == "vlmtools.eval/1"
    out, _ = _on_a_terminal(["eval", d / "p.jsonl", "-o", d / "e.jsonl"], d)  # -o: the file gets the rows
    assert json.loads((d / "e.jsonl").read_text().splitlines()[0])["n"] == 40


def test_eval_plots_are_named_and_titled_after_their_predictions(trained, tmp_path):
    d, _ = trained
    for where, name in (("split=test", "test"), ("split=val", "val")):
        invoke("classify", d / "images", "--head", d / "probe-s0", "--where", where, "-o", tmp_path / f"{name}.jsonl")
        res = invoke("eval", tmp_path / f"{name}.jsonl", "--plots", tmp_path / "plots")
        assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["test.confusion.png", "test.per_class.png", "val.confusion.png", "val.per_class.png"]
    with Image.open(tmp_path / "plots" / "val.confusion.png") as im:
        title = im.info["Title"]
        assert im.info["Description"] == "eval"
    assert "probe:probe-s0" in title and "vlmtools-tiny" in title and "n = 40" in title and "val.jsonl" in title


def test_training_curve_png_and_a_plain_stop_message(trained):
    d, message = trained
    with Image.open(d / "plots" / "probe-s0.curve.png") as im:
        assert im.info["Description"] == "train" and "probe head probe-s0" in im.info["Title"]
    info = json.loads((d / "probe-s0.json").read_text())
    # the default solver (L-BFGS) says how many iterations and whether it converged
    iterations = len(info["curve"])
    assert f"L-BFGS, {iterations} iterations (converged, val acc" in message or \
        f"L-BFGS, {iterations} iterations (stopped at --epochs, val acc" in message
    # the mini-batch loop says how it stopped and which epoch it kept
    res = invoke("train", "probe", d / "images", "-o", d / "probe-adamw", "--where", "split=train",
                 "--val-where", "split=val", "--epochs", 40, "--solver", "adamw")
    assert res.exit_code == 0, res.output
    message = flat(res.stderr)
    info = json.loads((d / "probe-adamw.json").read_text())
    epochs, best = len(info["curve"]), info["best_epoch"]
    if info["stopped_early"]:
        assert f"stopped after epoch {epochs} of 40" in message and f"kept epoch {best}" in message
    else:
        assert f"{epochs} epochs; best val acc" in message and f"kept epoch {best}" in message
    assert "stopped early, kept" not in message  # the old wording that read as a contradiction


def test_stop_sentence_says_what_happened():
    from vlmtools.heads.curves import stop_sentence

    curve = [{"epoch": e, "loss": 1.0 / e, "val_acc": v} for e, v in enumerate([0.5, 0.9, 0.9, 0.9], 1)]
    said = stop_sentence(curve, 4, True, planned=100, patience=2)
    assert said == ("stopped after epoch 4 of 100: val acc did not pass 0.9000 (epoch 2) for 2 epochs; kept "
                    "epoch 4, which tied it")
    assert stop_sentence(curve[:2], 2, False) == "2 epochs; best val acc 0.9000 at epoch 2; kept epoch 2"
    assert stop_sentence([{"epoch": 1, "loss": 1.0}], 1, False) == "1 epochs, no val rows: kept the last"


def test_wilson_interval_and_an_axis_that_does_not_exaggerate():
    from vlmtools.heads.curves import accuracy_axis, wilson

    low, high = wilson(0.97, 300)
    assert 0.94 < low < 0.97 < high < 0.99  # Wilson's 95% interval for 291/300: [0.944, 0.984]
    assert wilson(1.0, 20)[1] == 1.0 and round(wilson(1.0, 20)[0], 3) == 0.839
    low, high = accuracy_axis([97.0, 97.7])  # the study's 2 images in 300 must not look like a cliff
    assert high - low >= 10 and high <= 101 and low <= 97.0
    assert accuracy_axis([20.0, 90.0]) == (19.0, 91.0)
