import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmtools.cli.app import app

runner = CliRunner()
SMALL = ["--classes", "5", "--per-class", "8", "--device", "cpu"]


def test_demo_runs_the_pipeline_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    table = result.stdout.strip().splitlines()
    assert table[0].split()[:3] == ["method", "n", "top-1"]
    assert any(line.startswith("clip (class name)") for line in table)
    assert any(line.startswith("cbd (oracle descriptors)") for line in table)
    results = json.loads((out / "results.json").read_text())
    assert [r["n"] for r in results["rows"]] == [40, 40, 40, 40]
    for r in results["rows"]:
        assert 0.0 <= r["acc1"] <= 1.0 and r["photo"] is not None and r["painting"] is not None
    for name in ("clip", "cbd", "cbd-object", "waffle"):
        preds = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(preds) == 40 and all("pred" in p for p in preds)
    assert (out / "eval" / "compare.jsonl").exists()
    cbd = [json.loads(line) for line in (out / "predictions" / "cbd.jsonl").read_text().splitlines()]
    wrong_view = (out / "explanations" / "wrong.txt").read_text()
    if any(p["pred"] != p["label"] for p in cbd):
        assert "predicted" in wrong_view
    else:  # a perfect score leaves nothing to explain, and that is not an error
        assert wrong_view == ""
    script = (out / "pipeline.sh").read_text()
    assert "vlmtools embed images world/manifest.jsonl -o store/images" in script
    assert script.count("\nvlmtools ") == 14


def test_demo_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", str(tmp_path), *SMALL])
    assert result.exit_code == 2 and "holds no earlier demo" in result.stderr
    (tmp_path / "pipeline.sh").write_text("#!/bin/sh\necho my own script\n")  # a common name: not proof
    result = runner.invoke(app, ["demo", str(tmp_path), *SMALL])
    assert result.exit_code == 2 and "holds no earlier demo" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "pipeline.sh").read_text().endswith("my own script\n")
    (tmp_path / "file").write_text("x")
    for args, message in (([str(tmp_path / "file")], "is a file"), ([str(tmp_path / "d"), "--classes", "999"],
                                                                     "--classes 999")):
        result = runner.invoke(app, ["demo", *args, "--per-class", "2", "--device", "cpu"])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "d").exists()


def test_demo_run_twice_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "demo"
    assert runner.invoke(app, ["demo", str(out), *SMALL]).exit_code == 0
    first = (out / "results.txt").read_text()
    (out / "notes.txt").write_text("mine")
    (out / "results.txt").write_text("stale")
    result = runner.invoke(app, ["demo", str(out), *SMALL])  # the same command again: no flag needed
    assert result.exit_code == 0, result.output
    assert "holds an earlier demo: replacing its files" in " ".join(result.stderr.split())
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.txt").read_text() == first
    result = runner.invoke(app, ["demo", str(out), "--force", *SMALL])  # the old flag: accepted, deprecated
    assert result.exit_code == 0 and "--force is deprecated" in result.stderr


@pytest.mark.slow
def test_pipeline_script_reproduces_the_demo(tmp_path):
    """The script the demo writes is a real shell pipeline: running it gives the same predictions."""
    out = tmp_path / "demo"
    assert runner.invoke(app, ["demo", str(out), *SMALL]).exit_code == 0
    replay = tmp_path / "replay"
    replay.mkdir()
    script = (out / "pipeline.sh").read_text().replace("--device auto", "--device cpu")
    (replay / "pipeline.sh").write_text(script)
    # and the script reruns where the demo left it (the world is rebuilt identically, stores resume)
    env0 = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rerun = subprocess.run(["sh", "pipeline.sh"], cwd=out, env=env0, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "world.summary.json").read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", "pipeline.sh"], cwd=replay, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("clip", "cbd"):
        def load(d):
            rows = [json.loads(line) for line in (d / "predictions" / f"{name}.jsonl").read_text().splitlines()]
            return [(r["id"], r["pred"], r["topk"]) for r in rows]  # paths differ: they are absolute

        assert load(replay) == load(out)
