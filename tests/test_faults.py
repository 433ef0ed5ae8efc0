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
    first = lines[0] if lines else ""
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


def test_two_rankless_writers_are_refused_by_the_lock(world, tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "vlmtools", "embed", "images", str(world / "manifest.jsonl"),
                              "-o", str(tmp_path / "s"), "--workers", "0", "--shard-size", "2", *TINY],
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "VLMTOOLS_FAILPOINT": "store.after_shard:0=stop"})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "s" / "emb-00000.npy").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = runner.invoke(app, ["embed", "images", str(world / "manifest.jsonl"), "-o", str(tmp_path / "s"),
                                     "--workers", "0", "--shard-size", "2", *TINY])
        _check(second, 2, f"pid {first.pid}")
        assert "another vlmtools run" in second.stderr
        assert not (tmp_path / "s" / "emb-00001.npy").exists()  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stderr.close()


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
def test_ctrl_c_stops_decoder_workers_without_tracebacks(world, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vlmtools", "embed", "images", str(world / "manifest.jsonl"),
                             "-o", str(tmp_path / "s"), "--workers", "2", "--shard-size", "2", *TINY],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "VLMTOOLS_FAILPOINT": "store.after_shard:0=stop"})
    deadline = time.monotonic() + 90
    while not (tmp_path / "s" / "emb-00000.npy").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    os.killpg(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
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
    assert closed and time.monotonic() - started < SERVE_DEADLINE + 3
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
