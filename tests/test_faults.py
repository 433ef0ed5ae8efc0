"""The fault suite (issue 14): hostile but realistic inputs through the CLI. Each case builds its bad input,
runs the command, and checks the exit code, the first stderr line, that there is no traceback and that no
output was written. Then: kill -9 of `embed images` at three points and a rerun equal to an uninterrupted
run, and two rankless writers of one store refused by the lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import LOADED_DEADLINE, process_state, wait_until
from vlmtools.cli.app import app

runner = CliRunner()
TINY = ["--model", "vlmtools-tiny", "--pretrained", "none", "--device", "cpu"]


# ----------------------------------------------------------------------------- shared inputs

@pytest.fixture(scope="module")
def world(tmp_path_factory, image_dir) -> Path:
    """6 images, a manifest, a class list, a good image store (3 shards of 2), a good predictions file."""
    d = tmp_path_factory.mktemp("faults")
    images = sorted(image_dir.glob("*.png"))[:6]
    rows = [{"id": f"i{n}", "path": str(p), "label": "ab"[n % 2]} for n, p in enumerate(images)]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "classes.txt").write_text("a\nb\n")
    result = runner.invoke(app, ["embed", "images", str(d / "manifest.jsonl"), "-o", str(d / "store"),
                                 "--workers", "0", "--shard-size", "2", *TINY])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "probe", str(d / "store"), "-o", str(d / "head"), "--epochs", "2",
                                 "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    pred = {"id": "i0", "label": "a", "pred": "a", "topk": [{"class": "a", "score": 0.3}, {"class": "b", "score": 0.1}]}
    (d / "pred.jsonl").write_text(json.dumps(pred) + "\n")
    return d


def _store(world: Path, tmp: Path) -> Path:
    s = tmp / "store"
    shutil.copytree(world / "store", s)
    return s


def _save(path: Path, array) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=True)


# Store damage: (name, function(store dir), expected message fragment)
def _object_array(s):
    _save(s / "emb-00001.npy", np.array([{"x": 1}, {"y": 2}], dtype=object))


def _truncated(s):
    data = (s / "emb-00001.npy").read_bytes()
    (s / "emb-00001.npy").write_bytes(data[:-10])


def _truncated_header(s):
    (s / "emb-00001.npy").write_bytes((s / "emb-00001.npy").read_bytes()[:20])


def _mixed_dims(s):
    _save(s / "emb-00001.npy", np.ones((2, 7), dtype=np.float16))


def _nan_row(s):
    emb = np.load(s / "emb-00002.npy").copy()
    emb[1, 0] = np.nan
    _save(s / "emb-00002.npy", emb)


def _int_dtype(s):
    _save(s / "emb-00000.npy", np.ones((2, 3), dtype=np.int64))


def _info_list(s):
    (s / "info.json").write_text("[1, 2]\n")


def _info_no_model(s):
    info = json.loads((s / "info.json").read_text())
    del info["model"]
    (s / "info.json").write_text(json.dumps(info))


def _meta_short(s):
    lines = (s / "meta-00000.jsonl").read_text().splitlines(keepends=True)
    (s / "meta-00000.jsonl").write_text(lines[0])


def _meta_missing(s):
    (s / "meta-00002.jsonl").unlink()


def _info_count(s):
    info = json.loads((s / "info.json").read_text())
    info["count"] = 99
    (s / "info.json").write_text(json.dumps(info))


def _info_dup_key(s):
    (s / "info.json").write_text((s / "info.json").read_text().replace('"kind"', '"dim": 3, "kind"', 1))


DAMAGE = [
    ("object-array", _object_array, "holds Python objects"),
    ("truncated", _truncated, "truncated"),
    ("truncated-header", _truncated_header, "not a readable .npy shard"),
    ("mixed-dims", _mixed_dims, "rows of dim 7"),
    ("nan-row", _nan_row, "NaN or inf"),
    ("int-dtype", _int_dtype, "dtype int64"),
    ("info-list", _info_list, "expected a JSON object"),
    ("info-no-model", _info_no_model, "\"model\" must be an object"),
    ("meta-short", _meta_short, "has 1 lines"),
    ("meta-missing", _meta_missing, "is missing"),
    ("info-count", _info_count, "counts 99"),
    ("info-dup-key", _info_dup_key, "duplicate key 'dim'"),
]
READERS = {
    "classify": lambda s, w, out: ["classify", s, "-c", w / "classes.txt", "-o", out, *TINY],
    "search": lambda s, w, out: ["search", s, "-t", "a bird", *TINY],
    "index": lambda s, w, out: ["index", s],
    "store-check": lambda s, w, out: ["store", "check", s],
    "train-probe": lambda s, w, out: ["train", "probe", s, "-o", out, "--epochs", "1", "--val-fraction", "0"],
}


def _check(result, code: int, fragment: str, outputs=()):
    stderr = result.stderr
    assert result.exit_code == code, (result.exit_code, stderr)
    # the error is the first line after the "loading MODEL ..." notice a command gives before a slow load
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("loading ")]
    first = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "")
    assert fragment in first, (fragment, stderr)
    assert "Traceback" not in stderr and "Traceback" not in result.stdout
    for out in outputs:
        assert not Path(out).exists(), f"{out} was written"
        assert not list(Path(out).parent.glob(f".{Path(out).name}.*.tmp")), "a temp file was left behind"


@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("name,damage,fragment", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_store(world, tmp_path, command, name, damage, fragment):
    if command == "index" and name == "info-dup-key":
        pytest.skip("covered by the other readers")
    s = _store(world, tmp_path)
    damage(s)
    out = tmp_path / "out.json"
    result = runner.invoke(app, [str(a) for a in READERS[command](s, world, out)])
    _check(result, 2, fragment, [out, tmp_path / "out.safetensors", s / "index.faiss"])


# ----------------------------------------------------------------------------- other commands
# (name, function(world, tmp) -> argv, stdin or None, exit code, first-line fragment, outputs)

def _csv_surplus(w, t):
    (t / "in.csv").write_text(f"path,label\n{w / 'manifest.jsonl'},Black, footed\n")
    return ["data", "csv", t / "in.csv", "-o", t / "out.jsonl"]


def _manifest_list_id(w, t):
    (t / "m.jsonl").write_text(json.dumps({"id": ["x"], "path": "a.png"}) + "\n")
    return ["embed", "images", t / "m.jsonl", "-o", t / "s", *TINY]


def _manifest_deep(w, t):
    (t / "m.jsonl").write_text('{"path": "a.png", "x": ' + "[" * 500 + "]" * 500 + "}\n")
    return ["embed", "images", t / "m.jsonl", "-o", t / "s", *TINY]


def _manifest_dup_key(w, t):
    (t / "m.jsonl").write_text('{"path": "a.png", "label": "x", "label": "y"}\n')
    return ["embed", "images", t / "m.jsonl", "-o", t / "s", *TINY]


def _import_dup_key(w, t):
    (t / "d.json").write_text('{"a": ["red"], "b": ["blue"], "a": ["green"]}')
    return ["descriptors", "import", t / "d.json", "-o", t / "out.jsonl"]


def _import_deep(w, t):
    (t / "d.json").write_text('{"a": ' + "[" * 100 + "]" * 100 + "}")
    return ["descriptors", "import", t / "d.json", "-o", t / "out.jsonl"]


def _describe_locked(w, t):
    (t / "out.jsonl.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    return ["describe", w / "classes.txt", "-o", t / "out.jsonl", "--base-url", "http://127.0.0.1:9/v1"]


def _embed_locked(w, t):
    (t / "s.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    return ["embed", "images", w / "manifest.jsonl", "-o", t / "s", *TINY]


def _embed_bad_rank(w, t):
    os.environ["RANK"] = "abc"
    return ["embed", "images", w / "manifest.jsonl", "-o", t / "s", *TINY]


def _embed_changed_labels(w, t):
    s = _store(w, t)
    rows = [json.loads(x) for x in (w / "manifest.jsonl").read_text().splitlines()]
    rows[0]["label"] = "renamed"
    (t / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (s / "emb-00000.npy").unlink()  # so that a rerun would have something to do
    return ["embed", "images", t / "m.jsonl", "-o", s, "--workers", "0", "--shard-size", "2", *TINY]


def _embed_not_checkpoint(w, t):
    (t / "bad.pt").write_text("not a checkpoint\n")
    return ["embed", "images", w / "manifest.jsonl", "-o", t / "s", "-m", "vlmtools-tiny", "-p", t / "bad.pt"]


def _eval_nan(w, t):
    (t / "p.jsonl").write_text('{"id": "x", "label": "a", "pred": "a", "topk": [{"class": "a", "score": NaN}]}\n')
    return ["eval", "predictions", t / "p.jsonl"]


def _eval_deep(w, t):
    (t / "p.jsonl").write_text('{"id": "x", "pred": "a", "topk": ' + "[" * 300 + "]" * 300 + "}\n")
    return ["eval", "predictions", t / "p.jsonl"]


def _eval_dup_key(w, t):
    (t / "p.jsonl").write_text('{"id": "x", "label": "a", "pred": "a", "pred": "b", "topk": []}\n')
    return ["eval", "predictions", t / "p.jsonl"]


def _eval_long_line(w, t, monkeypatch=None):
    from vlmtools import formats

    formats.MAX_LINE = 1000  # restored by the test
    (t / "p.jsonl").write_text('{"id": "' + "x" * 2000 + '"}\n')
    return ["eval", "predictions", t / "p.jsonl"]


def _explain_dup_key(w, t):
    (t / "p.jsonl").write_text('{"id": "x", "id": "y", "pred": "a", "topk": [{"class": "a", "score": 1}]}\n')
    return ["explain", "text", t / "p.jsonl"]


def _classify_bracket_path(w, t):
    (t / "out[").write_text("a file where a directory would be")
    return ["classify", w / "store", "-c", w / "classes.txt", "-o", t / "out[/]x" / "p.jsonl", *TINY]


def _store_info_not_store(w, t):
    (t / "empty").mkdir()
    return ["store", "info", t / "empty"]


def _store_export_not_dir(w, t):
    (t / "file").write_text("x")
    return ["store", "export", w / "store", "-o", t / "file"]


def _head_copy(w, t):
    for suffix in (".json", ".safetensors"):
        shutil.copy(w / f"head{suffix}", t / f"head{suffix}")
    return t / "head"


def _head_dup_key(w, t):
    head = _head_copy(w, t)
    text = (t / "head.json").read_text()
    (t / "head.json").write_text(text.replace('"kind"', '"seed": 1, "kind"', 1))
    return ["classify", w / "store", "--head", head, "-o", t / "p.jsonl"]


def _head_bad_weights(w, t):
    head = _head_copy(w, t)
    (t / "head.safetensors").write_bytes(b"\x00" * 64)
    return ["classify", w / "store", "--head", head, "-o", t / "p.jsonl"]


def _head_missing_weights(w, t):
    head = _head_copy(w, t)
    (t / "head.safetensors").unlink()
    return ["classify", w / "store", "--head", head, "-o", t / "p.jsonl"]


def _train_no_rows(w, t):
    return ["train", "probe", w / "store", "-o", t / "head", "--where", "split=nowhere"]


# issue 22's classes. Heads: what a head's files claim is checked before anything is allocated or used.
def _head_edit(w, t, edit):
    head = _head_copy(w, t)
    info = json.loads((t / "head.json").read_text())
    edit(info)
    (t / "head.json").write_text(json.dumps(info))
    return ["classify", w / "store", "--head", head, "-o", t / "p.jsonl"]


def _head_classes_negative(w, t):
    return _head_edit(w, t, lambda i: i["config"].update(n_classes=-1))


def _head_classes_huge(w, t):
    def edit(info):
        info["config"]["n_classes"] = 10 ** 12
        info["tensors"] = {k: [10 ** 12, *v[1:]] if v and v[0] == 2 else v for k, v in info["tensors"].items()}
    return _head_edit(w, t, edit)


def _head_weights(w, t, change, keep_digest=False):
    from safetensors.torch import load_file, save_file

    head = _head_copy(w, t)
    state = {k: change(v) for k, v in load_file(t / "head.safetensors").items()}
    save_file(state, t / "head.safetensors")
    if keep_digest:  # weights that match the JSON's digest: as written by a buggy or hostile trainer
        from vlmtools.formats import file_sha256

        info = json.loads((t / "head.json").read_text())
        info["weights_sha256"] = file_sha256(t / "head.safetensors")
        (t / "head.json").write_text(json.dumps(info))
    return ["classify", w / "store", "--head", head, "-o", t / "p.jsonl"]


def _head_nan_weights(w, t):
    return _head_weights(w, t, lambda v: v * float("nan"), keep_digest=True)


def _head_int_weights(w, t):
    import torch

    return _head_weights(w, t, lambda v: v.to(torch.int32), keep_digest=True)


def _head_other_weights(w, t):  # the weights of another training run beside this JSON
    return _head_weights(w, t, lambda v: v * 2)


def _head_endless_json(w, t):
    (t / "head.json").symlink_to("/dev/zero")
    shutil.copy(w / "head.safetensors", t / "head.safetensors")
    return ["classify", w / "store", "--head", t / "head", "-o", t / "p.jsonl"]


def _train_option(option, value):
    return lambda w, t: ["train", "probe", w / "store", "-o", t / "head", "--epochs", "1", option, value]


def _train_one_class(w, t):
    return ["train", "probe", w / "store", "-o", t / "head", "--where", "label=a"]


def _train_empty_label(w, t):
    rows = [json.loads(x) for x in (w / "manifest.jsonl").read_text().splitlines()]
    rows[1]["label"] = " "
    (t / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = t / "s"
    assert runner.invoke(app, ["embed", "images", str(t / "m.jsonl"), "-o", str(s), "--workers", "0",
                               *TINY]).exit_code == 0
    return ["train", "probe", s, "-o", t / "head"]


# Maps directories for eval explanations, written by hand (what a reader must not trust).
def _maps(w, t, rows=None, arrays=None):
    from PIL import Image

    manifest = [json.loads(x) for x in (w / "manifest.jsonl").read_text().splitlines()][:2]
    for rec in manifest:
        mask = np.zeros((36, 36), np.uint8)
        mask[8:28, 8:28] = 255
        Image.fromarray(mask).save(t / f"{rec['id']}.mask.png")
        rec["mask"] = str(t / f"{rec['id']}.mask.png")
    (t / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    d = t / "maps"
    d.mkdir()
    (d / "info.json").write_text(json.dumps({"format": "vlmtools.maps/1", "method": "rise", "model": {
        "name": "vlmtools-tiny", "pretrained": "none"}, "classes": ["a", "b"], "templates": ["{}"], "settings": {}}))
    arrays = arrays or {}
    for rec in manifest:
        np.save(d / f"{rec['id']}.npy", arrays.get(rec["id"], np.random.default_rng(0).random((36, 36))).astype(np.float16))
    rows = rows if rows is not None else [{"id": r["id"], "class": "a", "map": f"{r['id']}.npy"} for r in manifest]
    (d / "maps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["eval", "explanations", d, "--manifest", t / "m.jsonl", "--no-causal", "-o", t / "out.jsonl"]


def _maps_outside(path):
    def build(w, t):
        (t / "secret.npy").write_bytes(b"not yours")
        return _maps(w, t, rows=[{"id": "i0", "class": "a", "map": path.format(t=t)}])
    return build


def _maps_nan(w, t):
    return _maps(w, t, arrays={"i0": np.full((36, 36), np.nan)})


def _maps_inf(w, t):
    a = np.zeros((36, 36))
    a[3, 3] = np.inf
    return _maps(w, t, arrays={"i1": a})


def _maps_repeated_id(w, t):
    return _maps(w, t, rows=[{"id": "i0", "class": "a", "map": "i0.npy"}, {"id": "i0", "class": "a", "map": "i1.npy"}])


def _maps_missing_file(w, t):
    return _maps(w, t, rows=[{"id": "i0", "class": "a", "map": "gone.npy"}])


def _maps_missing_image(w, t):
    argv = _maps(w, t)
    rows = [json.loads(x) for x in (t / "m.jsonl").read_text().splitlines()]
    rows[0]["path"] = str(t / "gone.png")
    (t / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return argv[:-3] + ["--causal", *argv[-2:]]


def _meta_is_directory(w, t):
    s = _store(w, t)
    (s / "meta-00001.jsonl").unlink()
    (s / "meta-00001.jsonl").mkdir()
    return ["search", s, "--id", "i0", "-k", "1"]


def _report_deep_json(w, t):
    run = t / "run"
    run.mkdir()
    (run / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (run / "bad.jsonl").write_text('{"id": "x", "pred": ')
    return ["report", run, "-o", t / "report.html"]


def _explain_class_without_descriptors(w, t):
    (t / "d.jsonl").write_text('{"class": "a", "descriptors": ["wings"]}\n')
    return ["explain", "visual", w / "manifest.jsonl", "-o", t / "maps", "--descriptors", t / "d.jsonl",
            "--class", "b", *TINY[:4]]


def _explain_nothing_readable(w, t):
    (t / "m.jsonl").write_text(json.dumps({"id": "x", "path": str(t / "gone.png"), "label": "a"}) + "\n")
    return ["explain", "visual", t / "m.jsonl", "-o", t / "maps", "--no-overlays", *TINY[:4]]


CASES = [
    ("classify-head-dup-key", _head_dup_key, 2, "duplicate key 'seed'", ["p.jsonl"]),
    ("classify-head-bad-weights", _head_bad_weights, 2, "not a safetensors file", ["p.jsonl"]),
    ("classify-head-missing-weights", _head_missing_weights, 2, "no such file", ["p.jsonl"]),
    ("train-no-rows", _train_no_rows, 2, "no row matches --where split=nowhere", ["head.json", "head.safetensors"]),
    ("data-csv-surplus-field", _csv_surplus, 2, "fields but the header has", ["out.jsonl"]),
    ("manifest-list-id", _manifest_list_id, 2, "\"id\" must be a string or a number", ["s"]),
    ("manifest-deep", _manifest_deep, 2, "nested more than", ["s"]),
    ("manifest-dup-key", _manifest_dup_key, 2, "duplicate key 'label'", ["s"]),
    ("descriptors-import-dup-key", _import_dup_key, 2, "duplicate key 'a'", ["out.jsonl"]),
    ("descriptors-import-deep", _import_deep, 2, "nested more than", ["out.jsonl"]),
    ("describe-locked", _describe_locked, 2, "another vlmtools run is writing it", ["out.jsonl"]),
    ("embed-locked", _embed_locked, 2, "another vlmtools run is writing it", ["s"]),
    ("embed-rank-abc", _embed_bad_rank, 2, "$RANK='abc'", ["s"]),
    ("embed-changed-labels", _embed_changed_labels, 2, "already holds a store", []),
    ("embed-not-a-checkpoint", _embed_not_checkpoint, 2, "not a checkpoint", ["s/emb-00000.npy"]),
    ("eval-nan-score", _eval_nan, 2, "NaN/inf", []),
    ("eval-deep", _eval_deep, 2, "nested more than", []),
    ("eval-dup-key", _eval_dup_key, 2, "duplicate key 'pred'", []),
    ("eval-long-line", _eval_long_line, 2, "line longer than", []),
    ("explain-dup-key", _explain_dup_key, 2, "duplicate key 'id'", []),
    ("classify-bracket-path", _classify_bracket_path, 2, "out[/]x/p.jsonl: cannot be created", []),
    ("store-info-not-a-store", _store_info_not_store, 2, "not a vlmtools store", []),
    ("store-export-to-file", _store_export_not_dir, 2, "is a file", []),
    # issue 22
    ("head-classes-negative", _head_classes_negative, 2, "does not fit head kind 'probe'", ["p.jsonl"]),
    ("head-classes-10e12", _head_classes_huge, 2, "\"classes\" but the head has 1000000000000 outputs", ["p.jsonl"]),
    ("head-nan-weights", _head_nan_weights, 2, "holds NaN or inf values", ["p.jsonl"]),
    ("head-int-weights", _head_int_weights, 2, "is not floating point", ["p.jsonl"]),
    ("head-weights-of-another-run", _head_other_weights, 2, "digest differs", ["p.jsonl"]),
    ("head-json-is-dev-zero", _head_endless_json, 2, "larger than 64 MiB", ["p.jsonl"]),
    ("train-weight-decay-inf", _train_option("--weight-decay", "inf"), 2, "--weight-decay inf", ["head.json"]),
    ("train-lr-1e30", _train_option("--lr", "1e30"), 2, "--lr 1e+30", ["head.json"]),
    ("train-lr-nan", _train_option("--lr", "nan"), 2, "--lr nan", ["head.json"]),
    ("train-one-class", _train_one_class, 2, "one class ('a')", ["head.json"]),
    ("train-empty-label", _train_empty_label, 2, "has an empty \"label\"", ["head.json"]),
    ("maps-path-parent", _maps_outside("../secret.npy"), 2, "is outside", ["out.jsonl"]),
    ("maps-path-absolute", _maps_outside("{t}/secret.npy"), 2, "is outside", ["out.jsonl"]),
    ("maps-all-nan", _maps_nan, 2, "1296 of 1296 values are NaN or inf", ["out.jsonl"]),
    ("maps-one-inf", _maps_inf, 2, "1 of 1296 values are NaN or inf", ["out.jsonl"]),
    ("maps-repeated-id", _maps_repeated_id, 2, "image 'i0' is listed again", ["out.jsonl"]),
    ("maps-missing-file", _maps_missing_file, 2, "is missing", ["out.jsonl"]),
    ("eval-explanations-missing-image", _maps_missing_image, 2, "no such image file", ["out.jsonl"]),
    ("meta-path-is-a-directory", _meta_is_directory, 2, "is not a file", []),
    ("explain-class-without-descriptors", _explain_class_without_descriptors, 2, "--class 'b' has no descriptors", ["maps"]),
    ("explain-nothing-readable", _explain_nothing_readable, 2, "no map made for any of 1 image(s)", ["maps"]),
]


@pytest.mark.parametrize("name,build,code,fragment,outputs", CASES, ids=[c[0] for c in CASES])
def test_fault(world, tmp_path, monkeypatch, name, build, code, fragment, outputs):
    from vlmtools import formats

    monkeypatch.setattr(formats, "MAX_LINE", formats.MAX_LINE)
    monkeypatch.delenv("RANK", raising=False)
    argv = [str(a) for a in build(world, tmp_path)]
    try:
        result = runner.invoke(app, argv)
    finally:
        os.environ.pop("RANK", None)
    _check(result, code, fragment, [tmp_path / o for o in outputs])


@pytest.mark.parametrize("name", ["st[exp1]x", "st[/]x", "st[bold]x[/bold]"])
def test_user_strings_reach_the_console_unchanged(world, tmp_path, name):
    store = tmp_path / name
    shutil.copytree(world / "store", store)
    result = runner.invoke(app, ["store", "check", str(store)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{store}: ok")


def test_internal_error_is_one_line_and_debug_shows_the_traceback(world, monkeypatch):
    import vlmtools.store

    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(vlmtools.store, "store_summary", boom)
    result = runner.invoke(app, ["store", "info", str(world / "store")])
    _check(result, 3, "internal error: ZeroDivisionError: simulated bug")
    assert "VLMTOOLS_DEBUG=1" in result.stderr
    monkeypatch.setenv("VLMTOOLS_DEBUG", "1")
    result = runner.invoke(app, ["store", "info", str(world / "store")])
    assert isinstance(result.exception, ZeroDivisionError)


# ----------------------------------------------------------------------------- real processes

def _sh(command: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


PY = f"{sys.executable} -m vlmtools"


@pytest.mark.parametrize("name,command,code,fragment", [
    ("stdout-closed-search", "{py} search {store} -t bird -k 2 >&-", 2, "stdout is closed"),
    ("stdout-closed-classify", "{py} classify {store} -c {classes} >&-", 2, "stdout is closed"),
    ("stdout-closed-store-ls", "{py} store ls {store} >&-", 2, "stdout is closed"),
    ("stdin-closed", "{py} descriptors import - -o {tmp}/d.jsonl 0<&-", 2, "stdin is closed"),
    ("closed-pipe", "{py} store ls {many} --json | head -n 1 >/dev/null; exit ${{PIPESTATUS[0]}}", 0, ""),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_closed_streams(world, tmp_path, name, command, code, fragment):
    many = tmp_path / "many"
    if "{many}" in command:  # 700 one-row shards: `store ls --json` writes more than a pipe buffer holds
        from vlmtools.store import write_arrays

        write_arrays(many, np.ones((700, 2)), [{"id": str(i)} for i in range(700)], kind="text",
                     model={"name": "vlmtools-tiny", "pretrained": "none"}, shard_size=1)
    proc = _sh(command.format(py=PY, store=world / "store", tmp=tmp_path, classes=world / "classes.txt", many=many))
    assert proc.returncode == code, proc.stderr
    assert fragment in (proc.stderr.splitlines() or [""])[0]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def _embed(world, out, **env):
    return subprocess.run([sys.executable, "-m", "vlmtools", "embed", "images", str(world / "manifest.jsonl"),
                           "-o", str(out), "--workers", "0", "--shard-size", "2", *TINY], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def _same_store(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(a / name), np.load(b / name)), name
        elif name.endswith(".jsonl"):
            assert (a / name).read_text().splitlines() == (b / name).read_text().splitlines(), name
    ia, ib = json.loads((a / "info.json").read_text()), json.loads((b / "info.json").read_text())
    assert {k: v for k, v in ia.items()} == ib


@pytest.mark.slow
@pytest.mark.parametrize("point", ["store.mid_shard:1", "store.after_shard:1", "store.finalize"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(world, tmp_path, point):
    killed = _embed(world, tmp_path / "s", VLMTOOLS_FAILPOINT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "s.lock").exists()  # a kill -9 leaves its lock: the rerun must see it is stale
    rerun = runner.invoke(app, ["embed", "images", str(world / "manifest.jsonl"), "-o", str(tmp_path / "s"),
                                "--workers", "0", "--shard-size", "2", *TINY])  # in-process: no second start-up
    assert rerun.exit_code == 0, rerun.stderr
    assert "stale lock" in rerun.stderr
    _same_store(world / "store", tmp_path / "s")
    assert not (tmp_path / "s.lock").exists()


def test_two_rankless_writers_are_refused_by_the_lock(world, tmp_path, spawn):
    first = spawn([sys.executable, "-m", "vlmtools", "embed", "images", str(world / "manifest.jsonl"),
                   "-o", str(tmp_path / "s"), "--workers", "0", "--shard-size", "2", *TINY],
                  stderr=subprocess.PIPE, text=True, env={**os.environ, "VLMTOOLS_FAILPOINT": "store.after_shard:0=stop"})
    wait_until(lambda: process_state(first.pid) == "T", "the first run stopping after its first shard")
    second = runner.invoke(app, ["embed", "images", str(world / "manifest.jsonl"), "-o", str(tmp_path / "s"),
                                 "--workers", "0", "--shard-size", "2", *TINY])
    _check(second, 2, f"pid {first.pid}")
    assert "another vlmtools run" in second.stderr
    assert not (tmp_path / "s" / "emb-00001.npy").exists()  # the second wrote nothing


# ----------------------------------------------------------------------------- caches, images, temp files

def test_a_text_cache_entry_of_another_model_is_dropped_and_recomputed(world, tmp_path):
    from vlmtools.classify import TextCache, text_key
    from vlmtools.models import ModelSpec

    cache = TextCache(ModelSpec.parse("vlmtools-tiny", "none"))
    cache.dir.mkdir(parents=True, exist_ok=True)
    texts = ["a photo of a a.", "a photo of a b."]
    np.save(cache.dir / "other.npy", np.ones((2, 7), np.float32))  # another model's dim, same directory
    (cache.dir / "other.json").write_text(json.dumps({"model": {"name": "ViT-B-32"}, "keys": [text_key(t) for t in texts]}))
    args = ["classify", str(world / "store"), "-c", str(world / "classes.txt"), "-o", str(tmp_path / "p.jsonl"), *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "written for another model" in result.stderr and not (cache.dir / "other.json").exists()
    reference = runner.invoke(app, args[:-len(TINY) - 2] + ["-o", str(tmp_path / "q.jsonl"), "--no-cache", *TINY])
    assert reference.exit_code == 0
    assert (tmp_path / "p.jsonl").read_text() == (tmp_path / "q.jsonl").read_text()


def test_an_unwritable_cache_falls_back_to_no_cache(world, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("VLMTOOLS_CACHE_DIR", str(tmp_path / "file" / "cache"))
    result = runner.invoke(app, ["classify", str(world / "store"), "-c", str(world / "classes.txt"), *TINY])
    assert result.exit_code == 0, result.stderr
    assert "cannot write the text cache" in result.stderr and "--no-cache" in result.stderr
    assert len(result.stdout.splitlines()) == 6


def test_16_bit_images_are_scaled_by_mode_not_by_values(tmp_path):
    from PIL import Image

    from vlmtools.images import load_rgb

    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "bright.png")
    assert np.asarray(load_rgb(tmp_path / "dark.png")).max() <= 1
    assert np.asarray(load_rgb(tmp_path / "bright.png")).min() == 255


def test_decompression_bombs_name_the_file(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from vlmtools.images import load_rgb

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)  # 100 px: above the limit, below twice it
    load_rgb(tmp_path / "big.png")
    assert f"{tmp_path / 'big.png'}: a very large image" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ValueError, match="big.png: image too large"):
        load_rgb(tmp_path / "big.png")


def test_synth_make_removes_temp_folders_of_killed_runs(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".w.{int(dead.stdout)}.abc123.tmp"
    (stale / "images").mkdir(parents=True)
    live = tmp_path / f".w.{os.getpid()}.def456.tmp"  # a run still going: left alone
    live.mkdir()
    result = runner.invoke(app, ["synth", "make", str(tmp_path / "w"), "--classes", "2", "--per-class", "2"])
    assert result.exit_code == 0, result.stderr
    assert not stale.exists() and live.exists() and (tmp_path / "w" / "world.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_decoder_workers_without_tracebacks(world, tmp_path, spawn):
    proc = spawn([sys.executable, "-m", "vlmtools", "embed", "images", str(world / "manifest.jsonl"),
                  "-o", str(tmp_path / "s"), "--workers", "2", "--shard-size", "2", *TINY],
                 stderr=subprocess.PIPE, text=True, start_new_session=True,
                 env={**os.environ, "VLMTOOLS_FAILPOINT": "store.after_shard:0=stop"})
    # Stopped by the failpoint, never a guessed sleep: a ^C sent before the stop would be continued by the
    # SIGCONT first and then the run would stop itself for good.
    wait_until(lambda: process_state(proc.pid) == "T", "the run stopping after its first shard")
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    os.killpg(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=LOADED_DEADLINE)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    rerun = runner.invoke(app, ["embed", "images", str(world / "manifest.jsonl"), "-o", str(tmp_path / "s"),
                                "--workers", "0", "--shard-size", "2", *TINY])
    assert rerun.exit_code == 0, rerun.stderr  # resumable
    _same_store(world / "store", tmp_path / "s")


def test_plain_path_lists_keep_trailing_blanks_in_names(tmp_path):
    from vlmtools.formats import read_manifest

    (tmp_path / "list.txt").write_text("a.png \nb.png\r\n")
    assert [r["path"] for r in read_manifest(tmp_path / "list.txt")] == [str(tmp_path / "a.png "), str(tmp_path / "b.png")]


# ----------------------------------------------------------------------------- serve: hostile requests
# A real server on 127.0.0.1 (in this process), spoken to through raw sockets so that a test controls
# every byte: every bad request is a 4xx within the request deadline, never a 500 or a wait, and the
# server answers the next good request.

SERVE_DEADLINE = 1.0


@pytest.fixture(scope="module")
def served(world):
    import threading

    from vlmtools.search import Searcher
    from vlmtools.serve import Service, make_server

    server = make_server(Service(Searcher(world / "store", device="cpu"), max_k=50), "127.0.0.1", 0,
                         request_deadline=SERVE_DEADLINE)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _raw(port: int, data: bytes, *, then: bytes = b"", half_close: bool = False, timeout: float = 10.0):
    """Send ``data`` (then ``then`` after a moment), read the answer: (status, body, seconds)."""
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if then:
            sock.sendall(then)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    seconds = time.monotonic() - started
    if not answer:
        return None, None, seconds
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, seconds


def _post(body: bytes, length: str | None = None, path: str = "/search", extra: str = "") -> bytes:
    length = str(len(body)) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode() + body


def _search_ok(port: int) -> None:
    status, body, _ = _raw(port, _post(b'{"id": "i0", "k": 1}'))
    assert status == 200 and json.loads(body)["results"][0]["id"] == "i0"


DIM = 32  # vlmtools-tiny
BAD_REQUESTS = [
    ("embedding-nan", _post(("{\"embedding\": [NaN" + ", 0.1" * (DIM - 1) + "]}").encode()), 400, "NaN"),
    ("embedding-inf", _post(("{\"embedding\": [1e999" + ", 0.1" * (DIM - 1) + "]}").encode()), 400, "NaN or infinite"),
    ("embedding-strings", _post(json.dumps({"embedding": ["a"] * DIM}).encode()), 400, "list of numbers"),
    ("embedding-bools", _post(json.dumps({"embedding": [True] * DIM}).encode()), 400, "list of numbers"),
    ("embedding-object", _post(json.dumps({"embedding": {"x": 1}}).encode()), 400, "list of numbers"),
    ("embedding-ragged", _post(json.dumps({"embedding": [[0.1] * DIM, [0.1] * 3]}).encode()), 400, "numbers per query"),
    ("embedding-zero", _post(json.dumps({"embedding": [0.0] * DIM}).encode()), 400, "zero"),
    ("nested-100000", _post(b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400, "nested more than"),
    ("duplicate-keys", _post(b'{"text": "a bird", "text": "a cat"}'), 400, "duplicate key"),
    ("not-utf8", _post(b'{"text": "\xff"}'), 400, "not UTF-8"),
    ("id-object", _post(json.dumps({"id": {"x": 1}}).encode()), 400, "id: expected"),
    ("k-bool", _post(json.dumps({"id": "i0", "k": True}).encode()), 400, "k: expected"),
    ("where-list", _post(json.dumps({"id": "i0", "where": {"split": [1]}}).encode()), 400, "where: expected"),
    ("knn-not-object", _post(b"[1, 2]", path="/knn-service"), 400, "JSON object"),
    ("length-not-a-number", _post(b"{}", length="abc"), 400, "not a number"),
    ("length-negative", _post(b"{}", length="-5"), 400, "not a number"),
    ("length-twice", _post(b"{}", extra="Content-Length: 2\r\n"), 400, "more than one"),
    ("length-too-large", _post(b"{}", length=str(100 << 20)), 413, "0 to"),
    ("chunked", _post(b"2\r\n{}\r\n0\r\n\r\n", extra="Transfer-Encoding: chunked\r\n"), 411, "Content-Length"),
]


@pytest.mark.parametrize("name,request_bytes,status,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_serve_refuses_bad_requests(served, name, request_bytes, status, fragment):
    got, body, seconds = _raw(served, request_bytes)
    assert got == status, (got, body)
    assert fragment in json.loads(body)["error"]
    assert seconds < SERVE_DEADLINE + 5  # answered at once, never after a long wait
    _search_ok(served)


def test_serve_a_body_shorter_than_content_length_is_408_at_the_deadline(served):
    got, body, seconds = _raw(served, _post(b'{"id": "i0"}', length="50"))  # then waits, sending nothing
    assert got == 408 and "within 1 s" in json.loads(body)["error"]
    assert SERVE_DEADLINE - 0.05 <= seconds < SERVE_DEADLINE + 5
    got, body, _ = _raw(served, _post(b'{"id": "i0"}', length="50"), half_close=True)  # hangs up instead
    assert got == 400 and "ended after 12 of the 50 bytes" in json.loads(body)["error"]
    _search_ok(served)


def test_serve_trickled_headers_are_cut_off_at_the_deadline(served):
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served), timeout=10) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\n")
        closed = False
        for _ in range(int(SERVE_DEADLINE * 20) + 60):  # a header byte every 50 ms, far past the deadline
            try:
                sock.sendall(b"X")
                time.sleep(0.05)
                sock.settimeout(0.001)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
    assert closed and time.monotonic() - started < SERVE_DEADLINE + 5  # cut off, not served the whole trickle
    _search_ok(served)


def test_serve_clients_that_hang_up_are_logged_quietly(served, capfd):
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served)) as sock:
            sock.sendall(_post(json.dumps({"text": "a bird", "k": 50}).encode()))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    _search_ok(served)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "error" not in err.lower(), err


def test_serve_knn_service_hits_carry_url_and_caption_and_the_url_serves_the_image(served, world):
    status, body, _ = _raw(served, _post(json.dumps({"text": "a bird", "num_images": 2}).encode(),
                                         path="/knn-service"))
    hits = json.loads(body)
    assert status == 200 and len(hits) == 2
    manifest = {r["id"]: r for r in map(json.loads, (world / "manifest.jsonl").read_text().splitlines())}
    for hit in hits:
        assert hit["url"] == f"http://x/image/{hit['id']}" and hit["caption"] == manifest[hit["id"]]["label"]
        status, data, _ = _raw(served, f"GET /image/{hit['id']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 200 and data == Path(manifest[hit["id"]]["path"]).read_bytes()
    status, body, _ = _raw(served, b"GET /image/..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404  # only files the store's rows name


# ----------------------------------------------------------------------------- describe against hostile servers
# A scripted server (tests/hostile_server.py) that echoes secrets where nothing should keep them, sends
# terminal escapes, trickles, or answers far too much. Nothing secret may reach a file or the terminal,
# every attempt ends at --timeout in all, and an answer too large or too deep is a failed class with nothing
# written for it.

KEY = "sk-hostile-KEY-0123456789abcdef"


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    from tests.hostile_server import HostileServer

    from vlmtools.redact import clear_secrets

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("VLMTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "classes.txt").write_text("Puffin\n")
    servers = []

    def start(script):
        servers.append(HostileServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    clear_secrets()  # this process goes on to other tests


def _describe(tmp_path, url, *extra):
    return runner.invoke(app, ["describe", str(tmp_path / "classes.txt"), "-o", str(tmp_path / "d.jsonl"),
                               "--base-url", url, "--max-retries", "0", *map(str, extra)])


def _everything_written(tmp_path) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["finish_reason", "content", "extra-field", "error-message", "header-echo"])
def test_an_echoed_api_key_reaches_no_file_and_no_terminal(tmp_path, hostile, where):
    import base64

    from tests.hostile_server import echo_auth

    server = hostile(echo_auth(where))
    result = _describe(tmp_path, server.url, "--keep-raw")
    assert server.requests, result.stderr
    shown = _everything_written(tmp_path) + result.stderr + result.stdout
    for form in (KEY, base64.b64encode(KEY.encode()).decode()):
        assert form not in shown
    if where in ("content", "error-message"):  # kept (raw answer, reason), redacted
        assert "[redacted]" in shown


def test_every_json_writer_redacts_registered_secrets_in_any_field(tmp_path):
    import base64

    from vlmtools import formats
    from vlmtools.redact import add_secret, clear_secrets

    secret = "tok-0123456789-xyz"
    add_secret(secret)
    try:
        record = {"a": [{"deep": f"x {secret} y"}], secret: base64.b64encode(secret.encode()).decode(),
                  "url": "https://h/?k=" + secret.replace("-", "%2D")}
        formats.write_json(tmp_path / "a.json", record)
        formats.write_jsonl(tmp_path / "b.jsonl", [record])
        texts = (tmp_path / "a.json").read_text() + (tmp_path / "b.jsonl").read_text() + formats.dumps_line(record)
    finally:
        clear_secrets()
    assert secret not in texts and base64.b64encode(secret.encode()).decode() not in texts
    assert texts.count("[redacted]") == 9


def test_credentials_in_the_base_url_are_never_sent_nor_shown(tmp_path, hostile):
    import base64

    from tests.hostile_server import echo_auth

    server = hostile(echo_auth("error-message"))
    url = server.url.replace("http://", "http://alice:pa55word-xyz@")
    result = _describe(tmp_path, url)
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"  # no Basic header from the URL
    shown = _everything_written(tmp_path) + result.stderr + result.stdout
    for secret in ("pa55word-xyz", "alice:", base64.b64encode(b"alice:pa55word-xyz").decode()[:16]):
        assert secret not in shown
    assert "credentials in the URL are not sent" in " ".join(result.stderr.split())


def test_terminal_escapes_from_a_server_are_shown_escaped(tmp_path, hostile):
    from tests.hostile_server import http_response

    message = "boom \x1b[31mRED\x1b]0;pwned\x07 \x9b2J"
    server = hostile(lambda r: [(http_response(json.dumps({"error": {"message": message}}), 500), 0)])
    result = _describe(tmp_path, server.url)
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr and "\x9b" not in result.stderr and "\x07" not in result.stderr
    assert "\\x1b[31mRED" in result.stderr


def test_a_trickling_server_is_cut_off_at_the_timeout_in_all(tmp_path, hostile):
    from tests.hostile_server import chat_body, http_response, trickle

    server = hostile(lambda r: trickle(http_response(chat_body("- wings " * 20)), 0.05))  # ~20 s in all
    started = time.monotonic()
    result = _describe(tmp_path, server.url, "--timeout", "1")
    assert time.monotonic() - started < 12, result.stderr  # one attempt of 1 s, not 20 s (slack for a loaded machine)
    assert result.exit_code == 1 and "timed out after 1s" in result.stderr
    assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("name,answer,fragment", [
    ("200000-descriptors", lambda: "".join(f"- feature {i}\n" for i in range(200_000)), "characters (at most"),
    ("5000-descriptors", lambda: "".join(f"- f{i}\n" for i in range(5000)), "5,000 descriptors for one class"),
    ("70-MB-line", lambda: "- " + "x" * (70 << 20), "larger than 16 MiB"),
    ("nested-100000", None, "malformed response"),
])
def test_answers_too_large_or_too_deep_fail_the_class_and_write_nothing(tmp_path, hostile, name, answer, fragment):
    from tests.hostile_server import chat_body, http_response

    body = '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}" if answer is None else chat_body(answer())
    server = hostile(lambda r: [(http_response(body), 0)])
    result = _describe(tmp_path, server.url)
    assert result.exit_code == 1 and fragment in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "d.jsonl").exists()
    errors = [json.loads(line) for line in (tmp_path / "d.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["class"] for e in errors] == ["Puffin"]
    assert (tmp_path / "d.jsonl.errors.jsonl").stat().st_size < 1 << 20  # the reason, not the answer


REFUSED_ANSWERS = {  # (the first run's answer for Puffin as (bytes, delay) pieces, extra options, reason)
    "200000-descriptors": (lambda: [(_chat("".join(f"- feature {i}\n" for i in range(200_000))), 0)], [],
                           "characters (at most"),
    "5000-descriptors": (lambda: [(_chat("".join(f"- f{i}\n" for i in range(5000))), 0)], [],
                         "5,000 descriptors for one class"),
    "nested-100000": (lambda: [(_http('{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}"), 0)], [],
                      "malformed response"),
    "trickled": (lambda: _trickle(_chat("- wings " * 20), 0.05), ["--timeout", "1"], "timed out after 1s"),
}


def _http(body):
    from tests.hostile_server import http_response
    return http_response(body)


def _chat(text):
    from tests.hostile_server import chat_body
    return _http(chat_body(text))


def _trickle(data, every):
    from tests.hostile_server import trickle
    return trickle(data, every)


@pytest.mark.parametrize("name", list(REFUSED_ANSWERS))
def test_a_rerun_after_a_refused_answer_resumes_and_asks_again(tmp_path, hostile, name):
    # The refused class leaves nothing behind that a rerun would trip on: not a line in the output (a rerun
    # would refuse to read the file back), and not the refused answer in the cache (a rerun would replay
    # it and fail again without asking the server). The rerun keeps the class that succeeded and asks
    # the server once, for the refused class only.
    bad, extra, reason = REFUSED_ANSWERS[name]
    (tmp_path / "classes.txt").write_text("Puffin\nTern\n")
    first_run = [True]

    def script(request):
        if first_run[0] and "Puffin" in json.dumps(request["body"]):
            return bad()
        return [(_chat("- black back\n- orange beak"), 0)]

    server = hostile(script)
    result = _describe(tmp_path, server.url, *extra)
    assert result.exit_code == 1 and reason in " ".join(result.stderr.split()), result.stderr
    assert [json.loads(line)["class"] for line in (tmp_path / "d.jsonl").read_text().splitlines()] == ["Tern"]
    assert [json.loads(line)["class"] for line in (tmp_path / "d.jsonl.errors.jsonl").read_text().splitlines()] \
        == ["Puffin"]
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "feature 1\\n" not in cached and "- f1\\n" not in cached  # no refused answer kept

    first_run[0] = False
    asked = len(server.requests)
    result = _describe(tmp_path, server.url, *extra)
    assert result.exit_code == 0, result.stderr
    assert "1 of 2 classes already in" in " ".join(result.stderr.split())
    assert len(server.requests) == asked + 1 and "Puffin" in json.dumps(server.requests[-1]["body"])
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(r["class"], r["descriptors"]) for r in records] == [("Puffin", ["black back", "orange beak"]),
                                                                 ("Tern", ["black back", "orange beak"])]
    assert not (tmp_path / "d.jsonl.errors.jsonl").exists()  # the earlier failure is resolved


# ----------------------------------------------------------------------------- the JSON writer and the console

def test_no_writer_puts_nan_or_infinity_into_json(tmp_path):
    from vlmtools import formats

    record = {"loss": float("nan"), "curve": [{"val": float("inf")}, {"val": -float("inf")}], "ok": 1.5}
    formats.write_json(tmp_path / "a.json", record)
    formats.write_jsonl(tmp_path / "b.jsonl", [record])
    texts = [(tmp_path / "a.json").read_text(), (tmp_path / "b.jsonl").read_text(), formats.dumps_line(record)]

    def refuse(name):
        raise AssertionError(f"{name} written into JSON")

    for text in texts:
        assert json.loads(text, parse_constant=refuse) == {"loss": None, "curve": [{"val": None}, {"val": None}],
                                                           "ok": 1.5}


def test_console_messages_escape_control_characters_and_redact_secrets(capsys):
    from vlmtools.console import error, info, warn
    from vlmtools.redact import add_secret, clear_secrets

    add_secret("s3cret-value-42")
    try:
        for say in (info, warn, error):
            say("a \x1b[2J\x1b]0;title\x07 b s3cret-value-42 " + "czNjcmV0LXZhbHVlLTQy")  # and its base64
    finally:
        clear_secrets()
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and err.count("\\x1b[2J") == 3
    assert "s3cret" not in err and "czNjcmV0" not in err and err.count("[redacted]") == 6


# ----------------------------------------------------------------------------- training that diverges, heads half-written

@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_a_loss_that_becomes_non_finite_stops_training_with_exit_1(world, tmp_path, monkeypatch, solver):
    import vlmtools.heads.logreg as logreg
    import vlmtools.heads.loop as loop

    # adamw trains the torch head (loop.fit); lbfgs on a CPU fits in numpy (heads.probe, logreg's objective)
    monkeypatch.setattr(loop, "cross_entropy_loss", lambda model, x, y: model(x).sum() * float("inf"))
    monkeypatch.setattr(logreg, "logreg_objective",
                        lambda *args, **kwargs: lambda theta: (float("inf"), np.zeros_like(theta)))
    result = runner.invoke(app, ["train", "probe", str(world / "store"), "-o", str(tmp_path / "head"),
                                 "--epochs", "3", "--val-fraction", "0", "--solver", solver])
    _check(result, 1, "the loss became", [tmp_path / "head.json", tmp_path / "head.safetensors"])
    assert "epoch 1" in result.stderr and not (tmp_path / "head.lock").exists()
    assert ("L-BFGS" in result.stderr) == (solver == "lbfgs")


@pytest.mark.slow
def test_kill_9_between_the_head_renames_leaves_a_head_that_is_refused(world, tmp_path):
    for suffix in (".json", ".safetensors"):
        shutil.copy(world / f"head{suffix}", tmp_path / f"head{suffix}")
    killed = subprocess.run([sys.executable, "-m", "vlmtools", "train", "probe", str(world / "store"), "-o",
                             str(tmp_path / "head"), "--epochs", "3", "--val-fraction", "0", "--seed", "7"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "VLMTOOLS_FAILPOINT": "head.between_renames"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "head.lock").exists()  # new weights, the old JSON, a stale lock
    result = runner.invoke(app, ["classify", str(world / "store"), "--head", str(tmp_path / "head"),
                                 "-o", str(tmp_path / "p.jsonl")])
    _check(result, 2, "digest differs", [tmp_path / "p.jsonl"])
    retrain = runner.invoke(app, ["train", "probe", str(world / "store"), "-o", str(tmp_path / "head"),
                                  "--epochs", "3", "--val-fraction", "0"])
    assert retrain.exit_code == 0 and "stale lock" in retrain.stderr
    assert runner.invoke(app, ["classify", str(world / "store"), "--head", str(tmp_path / "head")]).exit_code == 0


def test_a_head_being_written_by_another_run_is_refused(world, tmp_path):
    (tmp_path / "head.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    result = runner.invoke(app, ["train", "probe", str(world / "store"), "-o", str(tmp_path / "head"), "--epochs", "1"])
    _check(result, 2, "another vlmtools run is writing it", [tmp_path / "head.json"])


# ----------------------------------------------------------------------------- stores that readers would misuse

def _edit_info(key, value):
    def damage(s):
        info = json.loads((s / "info.json").read_text())
        info[key] = value
        (s / "info.json").write_text(json.dumps(info))
    return damage


def _rows(shard, change):
    def damage(s):
        emb = np.load(s / f"emb-{shard:05d}.npy").copy()
        change(emb)
        _save(s / f"emb-{shard:05d}.npy", emb)
    return damage


def _swap_meta(s):
    a, b = s / "meta-00000.jsonl", s / "meta-00001.jsonl"
    text = a.read_text()
    a.write_text(b.read_text())
    b.write_text(text)


def _drop_shard(s):
    (s / "emb-00001.npy").unlink()
    (s / "meta-00001.jsonl").unlink()


def _truncate_index(s):
    data = (s / "index.faiss").read_bytes()
    (s / "index.faiss").write_bytes(data[: len(data) // 2])


CHECK_DAMAGE = [
    ("edited-kind", _edit_info("kind", "text"), "content differs from the digest"),
    ("edited-model", _edit_info("model", {"name": "vlmtools-micro", "pretrained": "vlmtools"}), "content differs"),
    ("edited-dtype", _edit_info("dtype", "float32"), "dtype float16, but info.json says float32"),
    ("extra-bytes", lambda s: open(s / "emb-00001.npy", "ab").write(b"\0" * 8), "8 bytes after its data"),
    ("stray-npy", lambda s: shutil.copy(s / "emb-00001.npy", s / "emb-00001 (copy).npy"), "not shards vlmtools writes"),
    ("non-unit-row", _rows(1, lambda e: e.__setitem__(0, e[0] * 50)), "not unit length (first: row 0, of length 50"),
    ("all-zero-row", _rows(2, lambda e: e.__setitem__(1, 0)), "(first: row 1, all zeros)"),
    ("swapped-meta", _swap_meta, "content differs from the digest"),
    ("missing-shard", _drop_shard, "shard(s) 1 missing from a finished store"),
    ("truncated-index", _truncate_index, "index.faiss: "),
]


@pytest.fixture(scope="module")
def indexed_store(world, tmp_path_factory):
    s = tmp_path_factory.mktemp("indexed") / "store"
    shutil.copytree(world / "store", s)
    assert runner.invoke(app, ["index", str(s)]).exit_code == 0
    return s


@pytest.mark.parametrize("name,damage,fragment", CHECK_DAMAGE, ids=[d[0] for d in CHECK_DAMAGE])
def test_store_check_finds_what_readers_would_misuse(indexed_store, tmp_path, name, damage, fragment):
    s = tmp_path / "store"
    shutil.copytree(indexed_store, s)
    assert runner.invoke(app, ["store", "check", str(s)]).exit_code == 0
    damage(s)
    result = runner.invoke(app, ["store", "check", str(s)])
    assert result.exit_code == 2 and fragment in " ".join(result.stderr.split()), result.stderr
    if name == "missing-shard":  # store info counts what is there and names what is not
        out = runner.invoke(app, ["store", "info", str(s), "--json"])
        summary = json.loads(out.stdout)
        assert (summary["rows"], summary["shards"], summary["missing_shards"]) == (4, 2, [1])


def test_an_index_copied_from_another_store_is_not_used(world, indexed_store, tmp_path):
    rows = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({**r, "id": f"other-{r['id']}"}) + "\n" for r in rows[::-1]))
    other = tmp_path / "other"
    assert runner.invoke(app, ["embed", "images", str(tmp_path / "m.jsonl"), "-o", str(other), "--workers", "0",
                               "--shard-size", "2", *TINY]).exit_code == 0
    for name in ("index.faiss", "index.json"):  # same shape, same model: only the content differs
        shutil.copy(indexed_store / name, other / name)
    result = runner.invoke(app, ["search", str(other), "--id", "other-i0", "-k", "1"])
    assert result.exit_code == 0 and "built for another store content" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["id"] == "other-i0"  # searched exactly, so the right rows
    check = runner.invoke(app, ["store", "check", str(other)])
    assert check.exit_code == 2 and "built for another store content" in " ".join(check.stderr.split())


# ----------------------------------------------------------------------------- explain and report

def test_explain_visual_warns_when_the_predictions_came_from_another_model(world, tmp_path):
    pred = {"id": "i0", "path": json.loads((world / "manifest.jsonl").read_text().splitlines()[0])["path"],
            "label": "a", "pred": "a", "topk": [{"class": "a", "score": 0.3}, {"class": "b", "score": 0.1}],
            "model": "ViT-B-32 (pretrained=openai)"}
    (tmp_path / "p.jsonl").write_text(json.dumps(pred) + "\n")
    result = runner.invoke(app, ["explain", "visual", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "maps"),
                                 "--no-overlays", *TINY[:4]])
    assert result.exit_code == 0, result.stderr
    assert "were made with ViT-B-32 (pretrained=openai); the maps are made with vlmtools-tiny" in \
        " ".join(result.stderr.split())


def test_report_refuses_deeply_nested_json_in_the_run_directory(world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    shutil.copy(world / "pred.jsonl", run / "pred.jsonl")
    result = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
    _check(result, 2, "deep.json: JSON nested more than 64 levels deep", [tmp_path / "r.html"])


def test_train_ala_on_partly_unreadable_images_exits_1_and_on_none_exits_2(world, tmp_path):
    rows = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]
    for r in rows[1:5]:  # 4 of 6 cannot be read
        (tmp_path / f"{r['id']}.png").write_bytes(b"not an image")
        r["path"] = str(tmp_path / f"{r['id']}.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--epochs", "1", "--val-fraction", "0", *TINY[:4]]
    result = runner.invoke(app, ["train", "ala", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "ala"), *args])
    assert result.exit_code == 1 and "4 image(s) could not be read" in " ".join(result.stderr.split())
    assert json.loads((tmp_path / "ala.json").read_text())["unreadable_images"] == 4
    (tmp_path / "none.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:5]))
    result = runner.invoke(app, ["train", "ala", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "none"), *args])
    _check(result, 2, "none of 4 images could be read", [tmp_path / "none.json"])
