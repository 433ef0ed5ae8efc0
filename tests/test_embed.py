import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import LOADED_DEADLINE, end_process, process_state, wait_until
from vlmtools.cli.app import app
from vlmtools.embed import embed_images, text_records
from vlmtools.images import load_rgb
from vlmtools.store import open_store

runner = CliRunner()
TINY = ["--model", "vlmtools-tiny", "--pretrained", "none", "--device", "cpu"]


@pytest.fixture()
def awkward_images(tmp_path):
    """One image of each kind that must be converted, and each kind that must be skipped."""
    d = tmp_path / "awkward"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (30, 30)).astype(np.uint16)).save(d / "gray16.png")
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(d / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(d / "alpha.png")
    Image.new("L", (20, 20), 100).save(d / "gray.png")
    Image.new("P", (20, 20), 3).save(d / "palette.gif")
    good = d / "good.png"
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(good)
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good.read_bytes()[:80])
    (d / "notimage.jpg").write_text("hello, I am text")
    return d




def test_awkward_inputs_are_converted_or_recorded(tmp_path, awkward_images):
    alpha = load_rgb(str(awkward_images / "alpha.png"))
    assert alpha.mode == "RGB" and alpha.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    g16 = np.asarray(load_rgb(str(awkward_images / "gray16.png")))
    assert g16.std() > 20  # scaled, not clipped to white
    paths = sorted(str(p) for p in awkward_images.iterdir()) + [str(awkward_images / "missing.png")]
    listing = "\n".join(paths) + "\n"
    result = runner.invoke(app, ["embed", "images", "-", "-o", str(tmp_path / "s"), "--workers", "0",
                                 "--json", *TINY], input=listing)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 6 and summary["skipped"] == 4
    store = open_store(tmp_path / "s")
    assert {os.path.basename(m["path"]) for m in store.meta} == {
        "gray16.png", "cmyk.jpg", "alpha.png", "gray.png", "palette.gif", "good.png"}
    errors = {os.path.basename(e["path"]): e["reason"] for e in store.errors()}
    assert set(errors) == {"empty.png", "truncated.png", "notimage.jpg", "missing.png"}
    assert "not found" in errors["missing.png"] and "truncated" in errors["truncated.png"]


def _manifest(tmp_path, image_dir, n=None):
    paths = sorted(image_dir.glob("*.png"))[:n]
    lines = [json.dumps({"id": f"i{k}", "path": str(p), "label": "ab"[k % 2], "split": "test"})
             for k, p in enumerate(paths)]
    m = tmp_path / "manifest.jsonl"
    m.write_text("\n".join(lines) + "\n")
    return m


def test_embed_round_trip_matches_direct_encoding(tmp_path, image_dir, tiny_encoder):
    manifest = _manifest(tmp_path, image_dir)
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "s"), "--shard-size", "7",
                                 "-b", "3", "--workers", "1", "--dtype", "float32", *TINY])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # data only on stdout, and none was asked for
    store = open_store(tmp_path / "s")
    assert len(store) == 20 and store.info["count"] == 20
    assert [m["id"] for m in store.meta] == [f"i{k}" for k in range(20)]
    assert store.meta[1]["label"] == "b"
    import torch

    batch = torch.stack([tiny_encoder.preprocess(load_rgb(m["path"])) for m in store.meta[:4]])
    direct = tiny_encoder.encode_image_tensor(batch).numpy()
    np.testing.assert_allclose(store.embeddings[:4], direct, atol=1e-5)

    again = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "s"), "--shard-size", "7",
                                "--dtype", "float32", *TINY])
    assert again.exit_code == 0 and "nothing to do" in again.stderr


def test_rerun_with_other_model_or_input_is_refused(tmp_path, image_dir, tiny_encoder):
    manifest = _manifest(tmp_path, image_dir, 4)
    embed_images(__import__("vlmtools.formats").formats.read_manifest(manifest), str(tmp_path / "s"), tiny_encoder,
                 workers=0)
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "s"),
                                 "--model", "vlmtools-tiny-coca", "--device", "cpu"])
    assert result.exit_code == 2 and "vlmtools-tiny-coca" in result.stderr
    bigger = _manifest(tmp_path, image_dir, 6)
    result = runner.invoke(app, ["embed", "images", str(bigger), "-o", str(tmp_path / "s"), *TINY])
    assert result.exit_code == 2 and "input of 4 rows" in result.stderr and "this run has input of 6 rows" in result.stderr


def test_bad_manifests(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "path": "x.png"}\n{"id": "a", "path": "y.png"}\n')
    result = runner.invoke(app, ["embed", "images", str(bad), "-o", str(tmp_path / "s"), *TINY])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.stderr and "duplicate id" in result.stderr
    bad.write_text('{"id": "a", "path": "x.png"\n')
    result = runner.invoke(app, ["embed", "images", str(bad), "-o", str(tmp_path / "s"), *TINY])
    assert result.exit_code == 2 and "bad.jsonl:1" in result.stderr
    result = runner.invoke(app, ["embed", "images", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "s"), *TINY])
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    listing = d / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(d.glob("*.png"))) + "\n")
    return listing


def _embed_cmd(listing, out):
    return [sys.executable, "-m", "vlmtools", "embed", "images", str(listing), "-o", str(out), "--shard-size", "25",
            "-b", "5", "--workers", "0", "--dtype", "float32", *TINY]


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, many_images, spawn):
    killed = tmp_path / "killed"
    proc = spawn(_embed_cmd(many_images, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(list(killed.glob("emb-*.npy"))) >= 2 or proc.poll() is not None,
                   "two shards written", every=0.01)
    finally:
        end_process(proc)
    done_before = len(list(killed.glob("emb-*.npy")))
    assert 2 <= done_before < 16, "the run was not interrupted mid-way"
    with pytest.raises(Exception, match="incomplete"):
        open_store(killed)
    resumed = subprocess.run(_embed_cmd(many_images, killed), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} kept" in resumed.stderr or f"{done_before + 1} kept" in resumed.stderr
    full = tmp_path / "full"
    subprocess.run(_embed_cmd(many_images, full), check=True, capture_output=True, timeout=300)
    a, b = open_store(killed), open_store(full)
    assert a.meta == b.meta and len(a) == 400
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert not list(killed.glob(".*.tmp"))  # no temp files left behind


def test_two_workers_fill_one_store(tmp_path, image_dir):
    manifest = _manifest(tmp_path, image_dir)
    out = tmp_path / "s"
    for rank in (0, 1):
        result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(out), "--shard-size", "3",
                                     "--workers", "0", "--rank", str(rank), "--world-size", "2", "--json", *TINY])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["complete"] is (rank == 1)
    store = open_store(out)
    assert [m["id"] for m in store.meta] == [f"i{k}" for k in range(20)]


def test_embed_text_descriptors_and_lines(tmp_path):
    desc = tmp_path / "d.jsonl"
    desc.write_text(json.dumps({"class": "Velorine Skipper", "descriptors": ["a long tail", "red wings"],
                                "kinds": ["object", "object"]}) + "\n"
                    + json.dumps({"class": "Mossy Tern", "descriptors": ["often near water"],
                                  "kinds": ["background"]}) + "\n")
    result = runner.invoke(app, ["embed", "text", str(desc), "-o", str(tmp_path / "t"), *TINY])
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "t", kind="text")
    assert [m["text"] for m in store.meta] == ["Velorine Skipper, which is a long tail",
                                               "Velorine Skipper, which has red wings",
                                               "Mossy Tern, which often near water"]
    assert store.meta[2]["kind"] == "background" and store.meta[0]["class"] == "Velorine Skipper"
    assert store.info["source"] == "descriptors" and store.info["wrap"] == "cbd"
    result = runner.invoke(app, ["embed", "text", "-", "-o", str(tmp_path / "lines"), *TINY],
                           input="a red bird\n\na blue bird\n")
    assert result.exit_code == 0
    assert [m["text"] for m in open_store(tmp_path / "lines").meta] == ["a red bird", "a blue bird"]


def test_embed_text_bad_input(tmp_path):
    desc = tmp_path / "d.jsonl"
    desc.write_text(json.dumps({"class": "A", "descriptors": []}) + "\n")
    with pytest.raises(Exception, match="d.jsonl:1.*empty descriptor list"):
        text_records(str(desc))
    desc.write_text(json.dumps({"class": "A", "descriptors": ["x"]}) + "\n" + json.dumps({"class": "A", "descriptors": ["y"]}) + "\n")
    result = runner.invoke(app, ["embed", "text", str(desc), "-o", str(tmp_path / "t"), *TINY])
    assert result.exit_code == 2 and "d.jsonl:2" in result.stderr and "duplicate class" in result.stderr
    assert not (tmp_path / "t").exists()


def test_all_inputs_failing_is_an_error_and_retry_errors_redoes_them(tmp_path, image_dir):
    from shutil import copy

    work = tmp_path / "imgs"
    work.mkdir()
    broken = work / "a.png"
    broken.write_bytes(b"")
    listing = f"{broken}\n"
    result = runner.invoke(app, ["embed", "images", "-", "-o", str(tmp_path / "s"), "--workers", "0", *TINY],
                           input=listing)
    assert result.exit_code == 1 and "none of the 1 images could be read" in result.stderr
    copy(sorted(image_dir.glob("*.png"))[0], broken)  # the user fixes the file
    result = runner.invoke(app, ["embed", "images", "-", "-o", str(tmp_path / "s"), "--workers", "0", *TINY],
                           input=listing)
    # the fixed file changed the input's size/mtime digest: a plain rerun refuses, pointing at --retry-errors
    assert result.exit_code == 2 and "--retry-errors" in result.stderr
    result = runner.invoke(app, ["embed", "images", "-", "-o", str(tmp_path / "s"), "--workers", "0",
                                 "--retry-errors", *TINY], input=listing)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "s")
    assert len(store) == 1 and store.errors() == []


def test_existing_store_keeps_its_model_and_options_are_checked_before_loading(tmp_path, image_dir):
    manifest = _manifest(tmp_path, image_dir, 3)
    out = str(tmp_path / "s")
    assert runner.invoke(app, ["embed", "images", str(manifest), "-o", out, "--workers", "0", *TINY]).exit_code == 0
    # no --model: the store's own model (vlmtools-tiny), not the ViT-B-32 default that is not cached here
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", out, "--device", "cpu"])
    assert result.exit_code == 0 and "nothing to do" in result.stderr
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", out, "--model", "ViT-L-14"])
    assert result.exit_code == 2 and "vlmtools-tiny" in result.stderr
    for bad, message in ((["--dtype", "int8"], "--dtype"), (["--shard-size", "0"], "--shard-size"),
                         (["--rank", "3", "--world-size", "2"], "rank 3")):
        result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "t"),
                                     "--model", "ViT-B-32", *bad])  # fails before any (uncached) model load
        assert result.exit_code == 2 and message in result.stderr and "cannot load" not in result.stderr
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "file"), *TINY])
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_output_path_problems_name_the_users_path(tmp_path):
    from vlmtools import formats
    from vlmtools.errors import BadInput

    (tmp_path / "d").mkdir()
    with pytest.raises(BadInput, match=r"d: is a directory"):
        formats.write_jsonl(tmp_path / "d", [{"a": 1}])
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match=r"f/out.jsonl: cannot be created"):
        formats.write_jsonl(tmp_path / "f" / "out.jsonl", [{"a": 1}])


# ----------------------------------------------------------------------------- start-up

def test_finished_store_says_nothing_to_do_before_loading_the_model(tmp_path, image_dir):
    """A rerun of a finished `embed images` or `embed text` decides from the store alone: no torch, no
    open_clip, no model; a changed input still goes the long way (and is refused as before)."""
    from tests.conftest import run_cli_modules

    manifest = _manifest(tmp_path, image_dir, 6)
    texts = tmp_path / "t.txt"
    texts.write_text("a red bird\na blue bird\n")
    runs = [["images", str(manifest), "-o", str(tmp_path / "s"), "--shard-size", "4", "--workers", "0"],
            ["text", str(texts), "-o", str(tmp_path / "t")]]
    for args in runs:
        assert runner.invoke(app, ["embed", *args, *TINY]).exit_code == 0
        proc, loaded = run_cli_modules("embed", *args, *TINY, "--json")
        assert proc.returncode == 0, proc.stderr
        assert loaded == [], args
        assert "nothing to do (the model was not loaded)" in " ".join(proc.stderr.split())
        summary = json.loads(proc.stdout)
        assert summary["embedded"] == 0 and summary["complete"] and summary["count"] in (6, 2)
    manifest.write_text(manifest.read_text().replace('"label": "a"', '"label": "c"'))  # same images, new labels
    result = runner.invoke(app, ["embed", *runs[0], *TINY])
    assert result.exit_code == 2 and "already holds a store" in " ".join(result.stderr.split())


def test_decode_workers_start_before_the_model_loads(tmp_path, image_dir, monkeypatch):
    import multiprocessing

    import vlmtools.models

    seen = []
    real = vlmtools.models.load_model

    def load_model(*args, **kwargs):
        seen.append(len(multiprocessing.active_children()))  # the decode workers, forked already
        return real(*args, **kwargs)

    monkeypatch.setattr(vlmtools.models, "load_model", load_model)
    manifest = _manifest(tmp_path, image_dir, 10)
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "s"), "--shard-size", "4",
                                 "-b", "3", "--workers", "2", "--json", "--dtype", "float32", *TINY])
    assert result.exit_code == 0, result.output
    assert seen == [2]
    assert set(json.loads(result.stdout)["timings"]) >= {"start_workers", "load_model", "first_batch", "loop"}
    reference = tmp_path / "r"  # the same images embedded with workers started the usual way: same rows
    assert runner.invoke(app, ["embed", "images", str(manifest), "-o", str(reference), "--shard-size", "4",
                               "-b", "3", "--workers", "0", "--dtype", "float32", *TINY]).exit_code == 0
    assert open_store(tmp_path / "s").meta == open_store(reference).meta
    np.testing.assert_allclose(open_store(tmp_path / "s").embeddings, open_store(reference).embeddings, atol=1e-6)


@pytest.mark.slow
def test_ctrl_c_while_the_model_loads_stops_the_workers_cleanly(tmp_path, many_images, spawn):
    """The workers run while the model loads; a Ctrl-C then ends the run with 130, one line, no traceback,
    and no worker left behind."""
    out = tmp_path / "ctrl-c-store"
    proc = spawn([sys.executable, "-m", "vlmtools", "embed", "images", str(many_images), "-o", str(out),
                  "--workers", "2", *TINY], stderr=subprocess.PIPE, text=True, start_new_session=True,
                 env={**os.environ, "VLMTOOLS_FAILPOINT": "embed.load_model=stop"})
    state = process_state
    wait_until(lambda: state(proc.pid) == "T", "the run stopping at the model load")

    def group(pid):
        try:
            return os.getpgid(pid)
        except OSError:
            return None

    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != proc.pid
               and group(int(p)) == proc.pid] if state(proc.pid) == "T" else []
    assert workers, "no decode worker was running while the model loaded"
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    os.killpg(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=LOADED_DEADLINE)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    wait_until(lambda: all(state(p) in (None, "Z") for p in workers), "every worker ending")
