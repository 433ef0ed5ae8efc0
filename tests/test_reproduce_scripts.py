"""The four reproduction scripts (examples/cub/reproduce_*.sh) run end to end on fake datasets built in the
exact documented layouts (examples/cub/fake_data.py: CUB's 200 real class names, tiny generated JPEGs,
masks, paintings, Reed's captions, COCO's captions, Menon's descriptor file) with a fake LLM server on
127.0.0.1 and the packaged models, at their smallest settings. Each must exit 0 and end with its TSV: the
study's cells with the study's figures, ours where the run has them, and their difference.
Plus: optional steps are skipped with a reason, a failing step stops the script and names it, and a batch
loads each model once."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUB_DIR = ROOT / "examples" / "cub"
COLUMNS = ["table", "row", "column", "ours", "ours_sd", "runs", "study", "study_sd", "difference"]


def _fake_data_module():
    spec = importlib.util.spec_from_file_location("fake_data", CUB_DIR / "fake_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_data = _fake_data_module()


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> dict:
    return fake_data.make_all(tmp_path_factory.mktemp("fake"), per_class=3, coco_images=40)


@pytest.fixture(scope="module")
def llm():
    with fake_data.FakeLLM() as server:
        yield server


def run_script(name: str, *args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "VLMTOOLS": f"{sys.executable} -m vlmtools", "PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DEVICE": "cpu", **(env or {})}
    full.pop("OPENAI_API_KEY", None)  # a server on 127.0.0.1 needs none
    started = time.perf_counter()
    res = subprocess.run(["bash", str(CUB_DIR / name), *map(str, args)], capture_output=True, text=True,
                         env=full, timeout=timeout)
    res.seconds = time.perf_counter() - started
    print(f"{name}: exit {res.returncode} in {res.seconds:.1f} s")  # shown with pytest -s: the smoke run's cost
    return res


def study_cells(number: str) -> dict:
    with open(CUB_DIR / f"study_{number}.tsv", encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh if line.strip() and not line.startswith("#")]
    return {(t, r, c): (v, sd) for t, r, c, v, sd in rows[1:]}


def check_table(out: Path, number: str, stdout: str, expect_ours: list[tuple], runs: int = 1) -> dict:
    """The TSV has every study cell, in the study's order and with its figures; the cells in expect_ours
    have ours and difference = ours - study; the aligned table is on stdout and beside the TSV."""
    with open(out / "table.tsv", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    cells = {(r["table"], r["row"], r["column"]): r for r in rows}
    assert len(cells) == len(rows)
    study = study_cells(number)
    assert [k for k in cells if k in study] == list(study)  # the study's rows, in its order
    for key, (value, sd) in study.items():
        assert (cells[key]["study"], cells[key]["study_sd"]) == (value, sd)
    for key in expect_ours:
        r = cells[key]
        assert r["ours"] != "-" and int(r["runs"]) == runs, r
        assert float(r["difference"]) == pytest.approx(float(r["ours"]) - float(r["study"]), abs=0.011), r
        if runs > 1:
            assert r["ours_sd"] != "-"
    text = (out / "table.txt").read_text(encoding="utf-8")
    assert text in stdout and text.count("\n") > len(study) // 4
    return cells


# ----------------------------------------------------------------------------- the four scripts

@pytest.mark.slow
def test_reproduce_cbd_on_fake_cub(fake, llm, tmp_path):
    out = tmp_path / "cbd"
    res = run_script("reproduce_cbd.sh", fake["cub"].parent, out, env={
        "MODELS": "vlmtools-micro=ViT-B/32", "PRETRAINED": "vlmtools", "PRECISION": "fp32", "DRAWS": "1",
        "CBD_DESCRIPTORS": fake["descriptors"], "OPENAI_BASE_URL": llm.base_url})
    assert res.returncode == 0, res.stderr[-3000:]
    cells = check_table(out, "000", res.stdout, [(t, "ViT-B/32", c) for t in ("top-1", "top-5")
                                                 for c in ("CLIP", "CBD", "exemplar only", "exemplar + habitat")])
    # the four other sizes were not run; ours-only columns follow the study's
    assert cells[("top-1", "ViT-L/14", "CBD")]["ours"] == "-"
    assert cells[("top-1", "ViT-B/32", "WaffleCLIP (1 draws)")]["study"] == "-"
    assert "CBD (released) - CLIP =" in res.stdout and "McNemar exact p" in res.stdout
    # one process for all of the model's commands, which loaded the model once
    assert res.stderr.count("loading model vlmtools-micro") == 1
    assert llm.requests >= 3 * 200  # three styles x 200 classes asked


@pytest.mark.slow
def test_reproduce_ala_on_fake_cub(fake, tmp_path):
    out = tmp_path / "ala"
    res = run_script("reproduce_ala.sh", fake["cub"], fake["segmentations"], out, env={
        "MODEL": "vlmtools-micro", "PRETRAINED": "vlmtools", "SEEDS": "0", "EPOCHS": "1", "MASKS": "20",
        "STEPS": "3", "LIMIT": "8"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [("methods", "RISE"), ("methods", "ALA (ours)"), ("ablation", "(i) AEA, no SBN"),
            ("ablation", "(ii) SBN, no AEA"), ("ablation", "(iii) AEA + SBN")]
    cells = check_table(out, "003", res.stdout, [(t, r, c) for t, r in rows
                                                 for c in ("mIoU", "insertion", "deletion", "ID score")])
    assert cells[("methods", "F-CAM", "mIoU")]["ours"] == "-"  # not implemented: the study's figure alone
    assert cells[("methods", "Grad-CAM", "mIoU")]["study"] == "-"
    # the micro CLIP is a ResNet: rollout is skipped, with the reason
    assert "skipped: attention rollout: vlmtools-micro is not a ViT" in res.stderr
    assert not (out / "maps" / "rollout").exists()


@pytest.mark.slow
def test_reproduce_lare_on_fake_cub_and_paintings(fake, tmp_path):
    out = tmp_path / "lare"
    res = run_script("reproduce_lare.sh", fake["cub"], fake["paintings"], out, env={
        "CLIP_MODEL": "vlmtools-micro", "CLIP_PRETRAINED": "vlmtools", "COCA_MODEL": "vlmtools-tiny-coca",
        "COCA_PRETRAINED": "none", "SEEDS": "2", "EPOCHS": "3", "SAMPLES": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    trained = ["CLIP (fine-tuning)", "CoCa (fine-tuning)", "LADS", "LARE"]
    check_table(out, "004", res.stdout, [("Table 1", r, c) for r in trained for c in ("in-domain", "out-of-domain")],
                runs=2)
    check_table(out, "004", res.stdout, [("Table 1", r, "out-of-domain") for r in ("CLIP (zero-shot)",
                                                                                    "CoCa (zero-shot)")])
    # LADS runs on CLIP's embeddings and LARE on CoCa's, as in the study
    assert (out / "heads" / "clip-lads-s0.json").is_file() and (out / "heads" / "coca-lare-s1.json").is_file()
    assert res.stderr.count("loading model") == 2  # each model once


@pytest.mark.slow
def test_reproduce_adapter_on_fake_cub_reed_and_coco(fake, llm, tmp_path):
    out = tmp_path / "adapter"
    res = run_script("reproduce_adapter.sh", fake["cub"].parent, fake["reed"], fake["coco"], out, env={
        "MODEL": "vlmtools-micro", "PRETRAINED": "vlmtools", "OPENAI_BASE_URL": llm.base_url, "T2I_EPOCHS": "2",
        "EPOCHS": "3", "RATIOS": "1.0,0.5,0.0"})
    assert res.returncode == 0, res.stderr[-3000:]
    columns = ["image only", "image only (Hirano)", "+ Reed", "+ Reed (Hirano)", "+ gpt-3.5-turbo"]
    cells = check_table(out, "001", res.stdout, [("top-1", "(100, 0)", c) for c in columns[:2]]
                        + [("top-1", "(50, 50)", c) for c in columns] + [("top-1", "(0, 100)", c) for c in columns[2:]])
    assert cells[("top-1", "(90, 10)", "+ Reed")]["ours"] == "-"  # not in RATIOS
    assert "translator, COCO val text->image recall@1" in res.stderr
    assert (out / "t2i.json").is_file() and '"t2i-qformer"' in (out / "t2i.json").read_text()


# ----------------------------------------------------------------------------- skips and failures

def test_cbd_offline_download_is_skipped_with_the_reason(fake, tmp_path):
    """No model, no LLM, the descriptors' URL unreachable: the released rows are skipped with the reason,
    and the script still ends with the study's table (ours empty)."""
    out = tmp_path / "cbd"
    res = run_script("reproduce_cbd.sh", fake["cub"], out, env={
        "MODELS": "", "SKIP_LLM": "1", "CBD_DESCRIPTORS": "http://127.0.0.1:9/descriptors_cub.json"}, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cannot download http://127.0.0.1:9/descriptors_cub.json" in res.stderr
    assert "skipped: the rows with Menon's released descriptors (CBD)" in res.stderr
    assert "skipped: the regenerated, exemplar and exemplar + habitat rows (SKIP_LLM=1)" in res.stderr
    assert "skipped: the WaffleCLIP rows" in res.stderr
    cells = check_table(out, "000", res.stdout, [])
    assert {r["ours"] for r in cells.values()} == {"-"}


@pytest.mark.parametrize("name, args, message", [
    ("reproduce_lare.sh", ["CUB", "PAINT"], "not a CUB-200-2011 root"),
    ("reproduce_ala.sh", ["CUB", "nowhere"], "SEGMENTATIONS_DIR"),
    ("reproduce_adapter.sh", ["CUB"], "usage: reproduce_adapter.sh"),
    ("reproduce_cbd.sh", ["nowhere"], "CUB_200_2011_ROOT"),
])
def test_a_failing_step_stops_the_script_and_says_where(fake, tmp_path, name, args, message):
    paths = {"CUB": tmp_path / "empty", "PAINT": fake["paintings"], "nowhere": tmp_path / "nowhere"}
    (tmp_path / "empty").mkdir()
    res = run_script(name, *[paths.get(a, a) for a in args], tmp_path / "out", timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert f"{name}: stopped (exit 2) at step:" in res.stderr
    assert not (tmp_path / "out" / "table.tsv").exists()


def test_every_script_is_strict_and_hides_no_failure():
    """set -euo pipefail before anything runs, and no `a && b` list whose failure set -e would not catch
    (the one in `HERE=$(cd ... && pwd)` fails the assignment, which set -e does catch)."""
    assert "set -euo pipefail" in (CUB_DIR / "lib.sh").read_text(encoding="utf-8")
    for script in sorted(CUB_DIR.glob("reproduce_*.sh")):
        text = script.read_text(encoding="utf-8")
        code = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
        assert code[:3] == ["set -euo pipefail", 'HERE=$(cd "$(dirname "$0")" && pwd)', '. "$HERE/lib.sh"'], script.name
        assert not [line for line in code[1:] if " && " in line and not line.startswith("HERE=")], script.name
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
