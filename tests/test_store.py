import json
import re

import numpy as np
import pytest

from vlmtools import formats
from vlmtools.errors import BadInput, StoreMismatch
from vlmtools.models import ModelSpec
from vlmtools.store import StoreWriter, open_store, write_arrays

MODEL = {"name": "vlmtools-tiny", "pretrained": "none"}


def test_round_trip_and_plain_numpy(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(25, 8))
    meta = [{"id": str(i), "path": f"{i}.png"} for i in range(25)]
    reader = write_arrays(tmp_path / "s", emb, meta, kind="image", model=MODEL, dtype="float16", shard_size=10)
    assert len(reader) == 25 and reader.dim == 8
    assert reader.meta == meta
    expected = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(reader.embeddings, expected, atol=2e-3)
    # Shards load with plain numpy and concatenate in lexicographic order (as autofaiss reads them).
    shards = sorted((tmp_path / "s").glob("emb-*.npy"))
    assert [p.name for p in shards] == ["emb-00000.npy", "emb-00001.npy", "emb-00002.npy"]
    plain = np.concatenate([np.load(p) for p in shards])
    assert plain.dtype == np.float16
    np.testing.assert_array_equal(plain.astype(np.float32), reader.embeddings)
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["format"] == formats.STORE_FORMAT and info["count"] == 25 and info["normalized"] is True
    assert info["shard_size"] == 10 and info["dtype"] == "float16"
    reader = write_arrays(tmp_path / "x", emb[:3], meta[:3], kind="text", model=MODEL, extra_info={"source": "t.txt"})
    assert reader.info["source"] == "t.txt" and reader.kind == "text" and reader.info["dtype"] == "float32"


def test_reader_refuses_other_model_and_kind(tmp_path):
    write_arrays(tmp_path / "s", np.eye(4), [{"id": str(i)} for i in range(4)], kind="image", model=MODEL)
    open_store(tmp_path / "s", ModelSpec("vlmtools-tiny", "none"), kind="image")
    with pytest.raises(StoreMismatch, match="was embedded with vlmtools-tiny"):
        open_store(tmp_path / "s", ModelSpec("ViT-B-32", "openai"))
    with pytest.raises(BadInput, match="expected a text store"):
        open_store(tmp_path / "s", kind="text")


def test_reader_rejects_non_stores(tmp_path):
    with pytest.raises(BadInput, match="no such store"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="not a vlmtools store"):
        open_store(tmp_path / "empty")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "info.json").write_text(json.dumps({"format": "vlmtools.store/9"}))
    with pytest.raises(BadInput, match="newer"):
        open_store(tmp_path / "future")


def test_incomplete_store_is_refused_until_finished(tmp_path):
    writer = StoreWriter(tmp_path / "s", kind="text", model=MODEL, dim=4, shard_size=2)
    writer.write_shard(0, np.eye(4)[:2], [{"id": "a"}, {"id": "b"}])
    assert writer.finalize(expected_shards=2) is None  # another worker's shard is missing
    with pytest.raises(BadInput, match="incomplete"):
        open_store(tmp_path / "s")
    writer.write_shard(1, np.eye(4)[2:], [{"id": "c"}, {"id": "d"}])
    assert writer.finalize(expected_shards=2)["count"] == 4
    assert [m["id"] for m in open_store(tmp_path / "s").meta] == ["a", "b", "c", "d"]


def test_writer_refuses_a_different_existing_store(tmp_path):
    write_arrays(tmp_path / "s", np.eye(4), [{"id": str(i)} for i in range(4)], kind="image", model=MODEL)
    with pytest.raises(StoreMismatch, match="model"):
        StoreWriter(tmp_path / "s", kind="image", model={"name": "ViT-B-32", "pretrained": "openai"}, dim=4,
                    dtype="float32")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not an empty directory"):
        StoreWriter(tmp_path / "other", kind="image", model=MODEL, dim=4)


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(BadInput, match="dtype"):
        StoreWriter(tmp_path / "s", kind="image", model=MODEL, dim=4, dtype="int8")
    writer = StoreWriter(tmp_path / "t", kind="image", model=MODEL, dim=4)
    with pytest.raises(ValueError, match="shard 0: 3 embeddings but 1 meta rows"):
        writer.write_shard(0, np.ones((3, 4)), [{"id": "a"}])
    for bad in (np.ones((2, 5)), np.ones(4), np.ones((1, 2, 4))):  # rows of another dim, not a matrix
        with pytest.raises(ValueError, match=r"shard 1: expected \(n, 4\) embeddings"):
            writer.write_shard(1, bad, [{"id": "a"}, {"id": "b"}])
    assert not list((tmp_path / "t").glob("*.npy"))
    (tmp_path / "u").mkdir()
    np.save(tmp_path / "u" / "emb-00000.npy", np.ones((1, 4), np.float32))
    with pytest.raises(BadInput, match="has shards but no info.json; not a vlmtools store"):
        StoreWriter(tmp_path / "u", kind="image", model=MODEL, dim=4)


def test_writer_makes_missing_parents_and_records_its_preprocessing(tmp_path):
    writer = StoreWriter(tmp_path / "runs" / "a" / "s", kind="image", model=MODEL, dim=4, preprocess="resize 224")
    writer.write_shard(0, np.eye(4)[:2], [{"id": "a"}, {"id": "b"}])
    info = writer.finalize(expected_shards=1)
    assert info["preprocess"] == "resize 224" and info["count"] == 2
    assert open_store(tmp_path / "runs" / "a" / "s").info["preprocess"] == "resize 224"


# ----------------------------------------------------------------------------- resume, --force, --retry-errors

def _writer(path, **kw):
    return StoreWriter(path, kind="image", model=MODEL, dim=4, dtype="float32", shard_size=2, **kw)


def _rows(*ids):
    return np.eye(4)[:len(ids)], [{"id": i} for i in ids]


def test_failed_inputs_merge_in_row_order_and_retry_errors_reopens_their_shards(tmp_path):
    """Each worker writes its shards' failed inputs apart; the finished store lists them in input order.
    --retry-errors (reopen_failed) forgets exactly the shards that had failures, so that a rerun redoes
    those and keeps the others; a shard redone without failures drops its error file."""
    s = tmp_path / "s"
    writer = _writer(s)
    writer.write_shard(2, *_rows("e"), errors=[{"id": "f", "error": "unreadable"}])
    writer.write_shard(0, *_rows("a", "b"))
    writer.write_shard(1, *_rows("c"), errors=[{"id": "d", "error": "truncated"}])
    assert writer.finalize(expected_shards=3)["count"] == 4
    reader = open_store(s)
    assert [m["id"] for m in reader.meta] == ["a", "b", "c", "e"]
    assert [e["id"] for e in reader.errors()] == ["d", "f"]  # shard order, not the order they were written

    again = _writer(s)
    assert again.reopen_failed() == [1, 2]
    assert _writer(s).reopen_failed() == [1, 2]  # a retry killed before it redid them: reopened again
    assert [again.shard_done(k) for k in range(3)] == [True, False, False]
    with pytest.raises(BadInput, match="incomplete"):  # reopened: no longer a finished store
        open_store(s)
    again.write_shard(1, *_rows("c", "d"))  # the failed input now reads
    again.write_shard(2, *_rows("e"), errors=[{"id": "f", "error": "unreadable"}])
    assert again.finalize(expected_shards=3)["count"] == 5
    reader = open_store(s)
    assert [m["id"] for m in reader.meta] == ["a", "b", "c", "d", "e"]
    assert [e["id"] for e in reader.errors()] == ["f"]
    assert not (s / "errors-00001.jsonl").exists()
    assert _writer(s).reopen_failed() == [2]
    again.write_shard(2, *_rows("e", "f"))
    again.finalize(expected_shards=3)
    assert open_store(s).errors() == [] and not (s / "errors.jsonl").exists()
    assert _writer(s).reopen_failed() == []  # nothing failed: the finished store stays finished
    assert len(open_store(s)) == 6


def test_clean_partial_removes_only_the_named_shards_temp_files(tmp_path):
    """A killed worker leaves temp files; its rerun removes those of its own shards, never another
    worker's (which may be writing right now)."""
    s = tmp_path / "s"
    writer = _writer(s)
    mine = [s / ".emb-00000.npy.123.tmp", s / ".meta-00000.jsonl.9.tmp", s / ".errors-00002.jsonl.1.tmp"]
    theirs = [s / ".emb-00001.npy.77.tmp", s / ".meta-00001.jsonl.5.tmp"]
    for f in mine + theirs:
        f.write_bytes(b"partial")
    writer.clean_partial([0, 2])
    assert [f.exists() for f in mine] == [False, False, False] and all(f.exists() for f in theirs)


def test_a_directory_holding_only_temp_files_is_resumed_anything_else_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".emb-00000.npy.4242.tmp").write_bytes(b"killed mid-write")
    _writer(tmp_path / "s")  # a run killed before its first info.json: resumable
    for name in ("notes.tmp", ".hidden"):
        d = tmp_path / name.strip(".")
        d.mkdir()
        (d / name).write_text("mine")
        with pytest.raises(BadInput, match="not an empty directory"):
            _writer(d)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        _writer(tmp_path / "file")


def test_force_clears_every_store_file_and_refuses_other_files(tmp_path):
    """clear_store (embed --force) removes what a store is made of, temp files of killed runs included,
    and refuses a directory holding anything else, deleting nothing."""
    from vlmtools.store import clear_store

    s = tmp_path / "s"
    writer = _writer(s)
    writer.write_shard(0, *_rows("a", "b"), errors=[{"id": "x", "error": "bad"}])
    writer.write_shard(1, *_rows("c"))
    writer.finalize(expected_shards=2)
    for name in ("index.faiss", "index.json", ".emb-00002.npy.1.tmp", ".meta-00002.jsonl.1.tmp"):
        (s / name).write_text("x")
    assert {"info.json", "errors.jsonl", "errors-00000.jsonl", "emb-00001.npy", "meta-00001.jsonl"} <= \
        {f.name for f in s.iterdir()}
    clear_store(s)
    assert s.is_dir() and list(s.iterdir()) == []
    clear_store(tmp_path / "missing")  # nothing to clear
    for foreign in ("notes.tmp", ".hidden", "emb-00000.npy.bak", "meta-0.json", "INFO.JSON"):
        d = tmp_path / f"d-{foreign.strip('.')}"
        writer = _writer(d)
        writer.write_shard(0, *_rows("a"))
        writer.finalize()
        (d / foreign).write_text("mine")
        before = sorted(f.name for f in d.iterdir())
        with pytest.raises(BadInput, match=f"not part of a store \\({re.escape(foreign)}\\)"):
            clear_store(d)
        assert sorted(f.name for f in d.iterdir()) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        clear_store(tmp_path / "file")


def test_mismatch_messages_name_both_settings_and_the_fix(tmp_path):
    """Rerunning into a store written with other settings is refused, saying what the store holds, what
    this run has, and what to do (files changed on disk: --retry-errors or --force)."""
    s = tmp_path / "s"
    extra = {"input_sha": "aaa", "input_count": 3, "files_sha": "f1", "augment": {"crop": 1}}
    StoreWriter(s, kind="image", model=MODEL, dim=4, extra_info=extra)
    with pytest.raises(StoreMismatch) as exc:
        StoreWriter(s, kind="image", model={"name": "ViT-B-32", "pretrained": "openai"}, dim=4, extra_info=extra)
    assert "store model vlmtools-tiny (pretrained=none); this run has model ViT-B-32 (pretrained=openai)" in \
        str(exc.value) and "use another output directory, or pass --force" in str(exc.value)
    assert "--retry-errors" not in str(exc.value)
    with pytest.raises(StoreMismatch) as exc:
        StoreWriter(s, kind="image", model=MODEL, dim=4, extra_info={**extra, "input_sha": "bbb", "input_count": 5})
    assert "input of 3 rows with digest aaa" in str(exc.value) and "input of 5 rows with digest bbb" in str(exc.value)
    with pytest.raises(StoreMismatch) as exc:
        StoreWriter(s, kind="image", model=MODEL, dim=4, extra_info={**extra, "files_sha": "f2"})
    assert "image files with size/mtime digest f1" in str(exc.value) and "--retry-errors" in str(exc.value)
    with pytest.raises(StoreMismatch, match=re.escape("store augment={'crop': 1}; this run has augment={'crop': 2}")):
        StoreWriter(s, kind="image", model=MODEL, dim=4, extra_info={**extra, "augment": {"crop": 2}})
    with pytest.raises(StoreMismatch, match="store dim=4; this run has dim=8"):
        StoreWriter(s, kind="image", model=MODEL, dim=8, extra_info=extra)
    with pytest.raises(StoreMismatch, match="delete it"):
        StoreWriter(s, kind="image", model=MODEL, dim=8, extra_info=extra, mismatch_fix="delete it")
    # a renewable setting (files_sha under --retry-errors) is taken over instead
    StoreWriter(s, kind="image", model=MODEL, dim=4, extra_info={**extra, "files_sha": "f2"},
                renewable=("files_sha",))
    assert json.loads((s / "info.json").read_text())["files_sha"] == "f1"  # rewritten only when finished


# ----------------------------------------------------------------------------- row selection and lazy rows

def test_where_selects_rows_whose_values_read_as_the_text(tmp_path):
    from vlmtools.store import parse_where, select_rows

    assert parse_where(["split=test", "note=a=b", "empty="]) == [("split", "test"), ("note", "a=b"), ("empty", "")]
    for bad in ("split", "=test"):
        with pytest.raises(BadInput, match=f"--where '{bad}': expected KEY=VALUE"):
            parse_where(["split=test", bad])
    meta = [{"split": "test", "label": 1}, {"split": "train", "label": 1}, {"split": "test", "label": 2},
            {"label": 1}]
    assert select_rows(meta, parse_where(["label=1"])) == [0, 1, 3]  # numbers compared as text
    assert select_rows(meta, parse_where(["split=test", "label=1"])) == [0]  # every condition
    assert select_rows(meta, parse_where(["split=val"])) == []
    assert select_rows(meta, []) == [0, 1, 2, 3]


def test_row_view_is_float32_contiguous_and_checks_only_the_rows_read(tmp_path):
    """RowView slices are float32 whatever the shard dtype; only contiguous slices; with check="rows" a
    NaN row is refused when a slice reads it (naming its shard and its row there), not before."""
    from vlmtools.store import StoreProblem

    x = np.random.default_rng(0).standard_normal((23, 8))
    reader = write_arrays(tmp_path / "s", x, [{"id": str(i)} for i in range(23)], kind="image", model=MODEL,
                          dtype="float16", shard_size=5)
    view = reader.row_view()
    assert view[2:9].dtype == np.float32 and view[30:40].dtype == np.float32
    assert view.take([4, 20]).dtype == np.float32
    np.testing.assert_array_equal(view[2:9], reader.embeddings[2:9])
    assert len(reader.row_view([3, 1])) == 2 and reader.row_view([3, 1])[0:2].shape == (2, 8)
    for bad in (slice(0, 10, 2), 3):
        with pytest.raises(TypeError, match="contiguous slices"):
            view[bad]
    with pytest.raises(ValueError, match="expected 'all' or 'rows'"):
        reader.row_view(check="some")
    with pytest.raises(IndexError, match=r"store rows out of range 0\.\.22$"):
        view.take([0, 23])
    emb = np.load(tmp_path / "s" / "emb-00002.npy")
    emb[2, 1] = np.nan  # store row 12
    np.save(tmp_path / "s" / "emb-00002.npy", emb)
    lazy = open_store(tmp_path / "s").row_view(check="rows")
    np.testing.assert_array_equal(lazy[0:10], reader.embeddings[0:10])  # the damaged shard is not read
    for part in (slice(8, 14), slice(11, 14)):  # from the shard's start, from within it: its own row number
        with pytest.raises(StoreProblem, match=r"emb-00002.npy: 1 row\(s\) hold NaN or inf values \(first: row 2\)"):
            lazy[part]
    with pytest.raises(StoreProblem, match="emb-00002.npy"):
        open_store(tmp_path / "s").row_view()  # check="all": every shard, up front
    # every full pass refuses the NaN row too: the matrix, the shards with their meta, the shards alone
    for full_pass in (lambda r: r.embeddings, lambda r: list(r.shards()), lambda r: list(r.emb_shards())):
        with pytest.raises(StoreProblem, match=r"emb-00002.npy: 1 row\(s\) hold NaN"):
            full_pass(open_store(tmp_path / "s"))


def test_content_digest_follows_what_a_reader_takes_and_nothing_else(tmp_path):
    """The digest a finished store records (and `store check` and indexes compare) is deterministic, ignores
    how info.json orders its keys, and changes with a setting, a replaced shard or swapped meta files."""
    from vlmtools.store import DIGEST_KEYS, content_digest, read_info

    x = np.random.default_rng(3).standard_normal((6, 4))
    meta = [{"id": f"r{i}"} for i in range(6)]
    a = write_arrays(tmp_path / "a", x, meta, kind="image", model=MODEL, shard_size=3)
    b = write_arrays(tmp_path / "b", x, meta, kind="image", model=MODEL, shard_size=3)
    digest = a.info["content_sha256"]
    assert digest == b.info["content_sha256"] == content_digest(a.path, read_info(a.path))  # recorded on finish
    settings = {k: a.info[k] for k in DIGEST_KEYS}
    reordered = {"dtype": a.info["dtype"], "dim": 4, "model": {"pretrained": "none", "name": "vlmtools-tiny"},
                 "kind": "image"}
    assert content_digest(a.path, reordered) == digest  # JSON key order is not content
    for key, value in (("kind", "text"), ("dim", 8), ("dtype", "float16"), ("model", {"name": "other"})):
        assert content_digest(a.path, {**settings, key: value}) != digest, key
    c = write_arrays(tmp_path / "c", x[::-1], meta, kind="image", model=MODEL, shard_size=3)
    assert c.info["content_sha256"] != digest  # other rows, same meta
    swapped = tmp_path / "a"
    m0, m1 = (swapped / "meta-00000.jsonl").read_text(), (swapped / "meta-00001.jsonl").read_text()
    (swapped / "meta-00000.jsonl").write_text(m1)
    (swapped / "meta-00001.jsonl").write_text(m0)
    assert content_digest(swapped, settings) != digest  # same files, swapped metadata


def test_shard_layout_arguments(tmp_path):
    from vlmtools.store import check_layout

    check_layout("float16", 1)  # one row per shard is a layout
    for dtype, size, message in (("int8", 5, "--dtype 'int8': expected one of float16, float32"),
                                 ("float32", 0, "--shard-size must be at least 1")):
        with pytest.raises(BadInput, match=message):
            check_layout(dtype, size)
    reader = write_arrays(tmp_path / "s", np.eye(3), [{"id": str(i)} for i in range(3)], kind="image", model=MODEL,
                          shard_size=1)
    assert len(list((tmp_path / "s").glob("emb-*.npy"))) == 3 and [m["id"] for m in reader.meta] == ["0", "1", "2"]


def test_open_store_says_what_is_wrong(tmp_path):
    write_arrays(tmp_path / "s", np.eye(4), [{"id": str(i)} for i in range(4)], kind="image", model=MODEL)
    with pytest.raises(BadInput, match="is an image store, expected a text store"):
        open_store(tmp_path / "s", kind="text")
    with pytest.raises(StoreMismatch, match=f"store {re.escape(str(tmp_path / 's'))} was embedded with vlmtools-tiny"):
        open_store(tmp_path / "s", ModelSpec("ViT-B-32", "openai"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match="is a file, not a store directory"):
        open_store(tmp_path / "f")
