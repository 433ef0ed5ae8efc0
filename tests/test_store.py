import json

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
    with pytest.raises(ValueError, match="meta rows"):
        writer.write_shard(0, np.eye(4), [{"id": "a"}])
