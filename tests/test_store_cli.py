"""`vlmtools store info|check|ls|export` (issue 13 point 6, issue 11's store check)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.store import StoreWriter, write_arrays

runner = CliRunner()
MODEL = {"name": "vlmtools-tiny", "pretrained": "none"}


@pytest.fixture
def store(tmp_path):
    rows = [{"id": f"r{i}", "path": f"/img/{i}.png", "label": "ab"[i % 2], "tags": [i]} for i in range(5)]
    write_arrays(tmp_path / "s", np.random.default_rng(0).normal(size=(5, 4)), rows, kind="image", model=MODEL,
                 shard_size=2)
    return tmp_path / "s"


def test_info_and_ls(store):
    result = runner.invoke(app, ["store", "info", str(store), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["rows"], info["shards"], info["dim"], info["complete"], info["problems"]) == (5, 3, 4, True, [])
    table = runner.invoke(app, ["store", "info", str(store)]).stdout.splitlines()
    assert "rows\t5" in table and "model\tvlmtools-tiny (pretrained=none)" in table
    ls = [json.loads(line) for line in runner.invoke(app, ["store", "ls", str(store), "--json"]).stdout.splitlines()]
    assert [(r["shard"], r["rows"], r["meta_rows"]) for r in ls] == [
        ("emb-00000.npy", 2, 2), ("emb-00001.npy", 2, 2), ("emb-00002.npy", 1, 1)]


def test_check_reports_duplicates_and_missing_shards(store, tmp_path):
    assert runner.invoke(app, ["store", "check", str(store)]).exit_code == 0
    meta = store / "meta-00001.jsonl"
    meta.write_text(meta.read_text().replace('"r2"', '"r0"'))
    result = runner.invoke(app, ["store", "check", str(store), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 2 and report["duplicate_ids"] == 1 and "duplicate id 'r0'" in result.stderr
    # an unfinished store of 3 shards written by rank 0 of 2 workers: shard 1 (rank 1's) is missing
    writer = StoreWriter(tmp_path / "u", kind="image", model=MODEL, dim=4, shard_size=2,
                         extra_info={"input_count": 5})
    for k in (0, 2):
        writer.write_shard(k, np.ones((2 if k < 2 else 1, 4)), [{"id": f"{k}-{j}"} for j in range(2 if k < 2 else 1)])
    result = runner.invoke(app, ["store", "check", str(tmp_path / "u"), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 2 and report["missing_shards"] == [1] and "incomplete" in result.stderr


def test_export_is_row_aligned_parquet_for_embedding_reader(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    result = runner.invoke(app, ["store", "export", str(store), "-o", str(tmp_path / "meta")])
    assert result.exit_code == 0, result.stderr
    files = sorted((tmp_path / "meta").glob("*.parquet"))
    assert [f.stem for f in files] == ["meta-00000", "meta-00001", "meta-00002"]
    for f in files:
        table = pq.read_table(f).to_pylist()
        emb = np.load(store / f"emb-{f.stem[5:]}.npy")
        meta = [json.loads(line) for line in (store / f"{f.stem}.jsonl").read_text().splitlines()]
        assert len(table) == len(emb) == len(meta)
        for row, rec in zip(table, meta):
            assert row["id"] == rec["id"] and row["image_path"] == rec["path"] and json.loads(row["tags"]) == rec["tags"]
    again = runner.invoke(app, ["store", "export", str(store), "-o", str(tmp_path / "meta")])
    assert again.exit_code == 2 and "already holds Parquet" in again.stderr
