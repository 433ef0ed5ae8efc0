"""`vlmtools search` and vlmtools.search: text, image and stored queries, with and without an index."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.errors import BadInput, StoreMismatch
from vlmtools.index import build_index
from vlmtools.search import search
from vlmtools.store import write_arrays

runner = CliRunner()
TEXTS = ["a small red bird", "a large grey seabird", "a yellow songbird with black wings", "a brown owl at night",
         "a green parrot", "a white swan on a lake"]


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def flat(text: str) -> str:
    return " ".join(text.split())  # rich may wrap long stderr lines


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, tiny_encoder):
    path = tmp_path_factory.mktemp("search") / "texts"
    meta = [{"id": f"t{i}", "text": t, "label": f"class{i % 3}"} for i, t in enumerate(TEXTS)]
    write_arrays(path, tiny_encoder.encode_texts(TEXTS), meta, kind="text", model=tiny_encoder.spec.as_dict())
    return path


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, tiny_encoder, image_dir):
    import torch

    path = tmp_path_factory.mktemp("search") / "images"
    files = sorted(image_dir.glob("img*.png"))
    batch = torch.stack([tiny_encoder.preprocess(Image.open(f).convert("RGB")) for f in files])
    meta = [{"id": f.stem, "path": str(f), "label": "even" if i % 2 == 0 else "odd"} for i, f in enumerate(files)]
    write_arrays(path, tiny_encoder.encode_image_tensor(batch).numpy(), meta, kind="image",
                 model=tiny_encoder.spec.as_dict(), shard_size=7)
    return path


def test_text_query_finds_its_own_sentence(text_store):
    result = runner.invoke(app, ["search", str(text_store), "--text", TEXTS[2], "-k", "3"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and "query" not in hits[0]
    assert hits[0]["id"] == "t2" and hits[0]["text"] == TEXTS[2] and hits[0]["label"] == "class2"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_several_text_queries_carry_the_query(text_store):
    result = runner.invoke(app, ["search", str(text_store), "-t", TEXTS[0], "-t", TEXTS[4], "-k", "2"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert [(h["query"], h["rank"]) for h in hits] == [(TEXTS[0], 1), (TEXTS[0], 2), (TEXTS[4], 1), (TEXTS[4], 2)]
    assert [h["id"] for h in hits if h["rank"] == 1] == ["t0", "t4"]


def test_image_query_with_and_without_index(image_store, image_dir):
    query = image_dir / "img03.png"
    exact = search(image_store, images=[str(query)], k=5, exact=True)
    assert exact[0]["path"] == str(query) and exact[0]["score"] == pytest.approx(1.0, abs=1e-4)
    build_index(image_store, index_key="Flat", force=True)
    indexed = search(image_store, images=[str(query)], k=5)
    assert [h["id"] for h in indexed] == [h["id"] for h in exact]
    result = runner.invoke(app, ["search", str(image_store), "--image", str(query), "-k", "4", "--files"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [h["path"] for h in exact[:4]]


def test_store_queries_equal_brute_force(image_store, tmp_path, tiny_encoder):
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((3, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    write_arrays(tmp_path / "q", queries, [{"id": f"q{i}"} for i in range(3)], kind="image",
                 model=tiny_encoder.spec.as_dict())
    result = runner.invoke(app, ["search", str(image_store), "--store", str(tmp_path / "q"), "-k", "4", "--exact"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    from vlmtools.store import open_store

    target = open_store(image_store)
    truth = np.argsort(-(queries @ target.embeddings.T), axis=1)[:, :4]
    for qi in range(3):
        got = [h["id"] for h in hits if h["query"] == f"q{qi}"]
        assert got == [target.meta[r]["id"] for r in truth[qi]]


def test_k_larger_than_the_store(text_store):
    hits = search(text_store, texts=["a bird"], k=50)
    assert len(hits) == len(TEXTS) and sorted(h["id"] for h in hits) == sorted(f"t{i}" for i in range(len(TEXTS)))


def test_bad_inputs_exit_2(text_store, image_store, tmp_path, image_dir):
    cases = [
        (["search", str(tmp_path / "missing"), "--text", "x"], "no such store"),
        (["search", str(tmp_path), "--text", "x"], "not a vlmtools store"),
        (["search", str(text_store), "--text", "x", "-k", "0"], "-k must be at least 1"),
        (["search", str(text_store)], "no query"),
        (["search", str(text_store), "--text", "  "], "empty query"),
        (["search", str(text_store), "--text", "x", "--model", "ViT-B-32"], "was embedded with vlmtools-tiny"),
        (["search", str(text_store), "--text", "x", "--pretrained", "openai"], "was embedded with vlmtools-tiny"),
        (["search", str(image_store), "--image", str(tmp_path / "nope.png")], "no such file"),
        (["search", str(text_store), "--text", TEXTS[0], "--files"], "no paths"),
    ]
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    cases.append((["search", str(image_store), "--image", str(tmp_path / "fake.png")], "cannot read it as an image"))
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in flat(result.output), (args, result.output)
        assert result.stdout == "", args


def test_query_store_of_another_model_is_refused(text_store, tmp_path):
    write_arrays(tmp_path / "other", np.eye(32)[:2], [{"id": "a"}, {"id": "b"}], kind="text",
                 model={"name": "ViT-B-32", "pretrained": "openai"})
    with pytest.raises(StoreMismatch, match="ViT-B-32"):
        search(text_store, query_store=str(tmp_path / "other"))
    result = runner.invoke(app, ["search", str(text_store), "--store", str(tmp_path / "other")])
    assert result.exit_code == 2 and "different spaces" in flat(result.output)
    with pytest.raises(BadInput, match="-k"):
        search(text_store, texts=["x"], k=-1)


def test_model_name_alone_means_the_stores_weights(tmp_path):
    """A store embedded with non-default weights: --model NAME alone names it; another tag is refused.
    Stored queries need no model, so weights that are not on this machine can be recorded."""
    model = {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    vectors = np.eye(32, dtype=np.float32)[:5]
    write_arrays(tmp_path / "s", vectors, [{"id": f"r{i}"} for i in range(5)], kind="text", model=model)
    write_arrays(tmp_path / "q", vectors[:1], [{"id": "q0"}], kind="text", model=model)
    for extra in ([], ["--model", "ViT-B-32"], ["--pretrained", "laion2b_s34b_b79k"]):
        result = runner.invoke(app, ["search", str(tmp_path / "s"), "--store", str(tmp_path / "q"), "-k", "1", *extra])
        assert result.exit_code == 0, (extra, result.output)
        assert [h["id"] for h in lines(result.stdout)] == ["r0"]
    result = runner.invoke(app, ["search", str(tmp_path / "s"), "--store", str(tmp_path / "q"),
                                 "--model", "ViT-B-32", "--pretrained", "openai"])
    assert result.exit_code == 2 and str(tmp_path / "s") in flat(result.output)
    assert "laion2b_s34b_b79k" in flat(result.output) and result.stdout == ""


# ----------------------------------------------------------------------------- many queries, --id, --where

def test_text_queries_from_stdin_and_file_in_one_run(text_store, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text(f"{TEXTS[1]}\n\n{TEXTS[3]}\n")
    result = runner.invoke(app, ["search", str(text_store), "--text", "-", "--text-file", str(queries), "-k", "1"],
                           input=f"{TEXTS[0]}\n")
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert [h["query"] for h in hits] == [TEXTS[0], TEXTS[1], TEXTS[3]]
    assert [h["id"] for h in hits] == ["t0", "t1", "t3"]
    assert flat(result.stderr).count("loading model") == 1  # one model load for all queries
    empty = runner.invoke(app, ["search", str(text_store), "--text", "-"], input="\n")
    assert empty.exit_code == 2 and "no queries" in empty.output


def test_query_by_stored_id_needs_no_model(text_store):
    result = runner.invoke(app, ["search", str(text_store), "--id", "t4", "-k", "2", "--exact"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert hits[0]["id"] == "t4" and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert "loading model" not in result.stderr
    bad = runner.invoke(app, ["search", str(text_store), "--id", "nope"])
    assert bad.exit_code == 2 and "--id nope" in bad.output


def test_where_filters_hits(image_store):
    result = runner.invoke(app, ["search", str(image_store), "--id", "img03", "--where", "label=even", "-k", "20"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert len(hits) == 10 and {h["label"] for h in hits} == {"even"}
    assert [h["rank"] for h in hits] == list(range(1, 11))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    for bad, message in ((["--where", "label=none"], "no row"), (["--where", "label"], "KEY=VALUE")):
        res = runner.invoke(app, ["search", str(image_store), "--id", "img03", *bad])
        assert res.exit_code == 2 and message in res.output


def test_scores_are_cosines_clipped_to_one(tmp_path):
    """float16 rows are unit vectors only to about 1e-3: a self-match computed from them can exceed 1
    (1.000116 was seen); the score is clipped, as a cosine is."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32))
    write_arrays(tmp_path / "s", x, [{"id": f"r{i}"} for i in range(64)], kind="text",
                 model={"name": "vlmtools-tiny", "pretrained": "none"}, dtype="float16")
    stored = np.concatenate([np.load(p) for p in sorted((tmp_path / "s").glob("emb-*.npy"))])
    assert stored.dtype == np.float16
    stored = stored.astype(np.float32)
    over = [i for i, v in enumerate(stored) if float(v @ v) > 1.00001]
    assert over  # some float16 rows have a self-product above 1 by more than the 6 decimals shown
    result = runner.invoke(app, ["search", str(tmp_path / "s"), "--id", f"r{over[0]}", "-k", "3", "--exact"])
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert hits[0]["id"] == f"r{over[0]}" and hits[0]["score"] == 1.0
    assert all(-1.0 <= h["score"] <= 1.0 for h in hits)


def test_stored_queries_import_no_torch(image_store, tmp_path, tiny_encoder):
    """--id and --store queries come from stores: a fresh process imports neither torch nor open_clip, and
    finds what the in-process run finds."""
    from tests.conftest import run_cli_modules

    rng = np.random.default_rng(5)
    write_arrays(tmp_path / "q", rng.standard_normal((3, 32)), [{"id": f"q{i}"} for i in range(3)], kind="image",
                 model=tiny_encoder.spec.as_dict())
    for args in (["--id", "img03", "-k", "5"], ["--store", str(tmp_path / "q"), "-k", "4", "--exact"]):
        proc, loaded = run_cli_modules("search", image_store, *args)
        assert proc.returncode == 0, proc.stderr
        assert loaded == [], args
        assert lines(proc.stdout) == lines(runner.invoke(app, ["search", str(image_store), *args]).stdout)


# ----------------------------------------------------------------------------- the vector search core (no model)

def _unit(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _truth(reader, queries, k):
    """Exact top-k, restated with numpy: best score first, ties by lower row."""
    scores = queries @ reader.embeddings.T
    rows = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, rows, 1), rows


def test_rerank_over_every_candidate_equals_exact_search(tmp_path, monkeypatch):
    """PQ codes only shortlist: reranking candidates that cover the store gives exact search's neighbours and
    scores, whatever the block of queries gathered at a time; a short candidate list is padded with -1,
    never with a real row."""
    import vlmtools.search as search_mod
    from vlmtools.search import search_vectors
    from vlmtools.store import open_store

    x = _unit(600, 16, 0)
    write_arrays(tmp_path / "s", x, [{"id": f"r{i}"} for i in range(600)], kind="image",
                 model={"name": "m"}, shard_size=250)
    build_index(tmp_path / "s", index_key="IVF4,PQ4x4", target_recall=0)
    reader = open_store(tmp_path / "s")
    queries = _unit(9, 16, 1)
    truth_s, truth_r = _truth(reader, queries, 5)
    for block_bytes in (search_mod.RERANK_BLOCK_BYTES, 1, 4 * 16 * 600 * 4):  # one block, one query, 4 queries
        monkeypatch.setattr(search_mod, "RERANK_BLOCK_BYTES", block_bytes)
        scores, rows, method = search_vectors(reader, queries, 5, nprobe=4, rerank=200)
        assert method == "IVF4,PQ4x4, reranked 600"  # min(store, k * rerank) candidates
        np.testing.assert_array_equal(rows, truth_r)
        np.testing.assert_allclose(scores, truth_s, atol=1e-5)
    top1_s, top1_r, _ = search_vectors(reader, queries, 1, nprobe=4, rerank=200)  # the best of 200 candidates
    np.testing.assert_array_equal(top1_r, truth_r[:, :1])
    np.testing.assert_allclose(top1_s, truth_s[:, :1], atol=1e-5)
    shuffled = np.random.default_rng(2).permutation(600)  # --where over every row, k = 1: the best row
    np.testing.assert_array_equal(search_vectors(reader, queries, 1, rows=shuffled)[1], truth_r[:, :1])
    plain_s, plain_r, method = search_vectors(reader, queries, 5, nprobe=4, rerank=0)
    assert method == "IVF4,PQ4x4" and not np.array_equal(plain_r, truth_r)  # codes alone rank coarsely
    assert plain_r.dtype == np.int64
    assert search_vectors(reader, queries, 5, nprobe=4, rerank=1)[2] == "IVF4,PQ4x4, reranked 5"
    assert search_vectors(reader, queries, 5, nprobe=4, rerank=2)[2] == "IVF4,PQ4x4, reranked 10"
    # search() and its Searcher pass --nprobe and --rerank on, and search through the loaded index
    ids = ["r0", "r100", "r250"]
    q_rows = search_vectors(reader, x[[0, 100, 250]], 5, nprobe=1, rerank=0)[1]
    hits = search(tmp_path / "s", ids=ids, k=5, nprobe=1, rerank=0)
    assert [h["id"] for h in hits] == [f"r{r}" for r in q_rows.ravel()]
    q_rows = search_vectors(reader, x[[0, 100, 250]], 5, nprobe=4, rerank=0)[1]  # not reranked: PQ's order
    hits = search(tmp_path / "s", ids=ids, k=5, nprobe=4, rerank=0)
    assert [h["id"] for h in hits] == [f"r{r}" for r in q_rows.ravel()]
    assert (q_rows != _truth(reader, x[[0, 100, 250]], 5)[1]).any()
    hits = search(tmp_path / "s", ids=ids, k=5, nprobe=4, rerank=200)
    assert [h["id"] for h in hits] == [f"r{r}" for r in _truth(reader, x[[0, 100, 250]], 5)[1].ravel()]
    # extra hits beside the k (index tuning drops its held-out rows from them): k + extra columns
    extra_s, extra_r, method = search_vectors(reader, queries, 3, nprobe=4, rerank=200, extra=2)
    assert method == "IVF4,PQ4x4, reranked 600" and extra_r.shape == (9, 5)
    np.testing.assert_array_equal(extra_r, truth_r)
    # an index.json from before rerank was saved: PQ codes are reranked by default (10 x k)
    record = json.loads((tmp_path / "s" / "index.json").read_text())
    del record["params"]["rerank"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(record))
    assert search_vectors(open_store(tmp_path / "s"), queries, 5, nprobe=4)[2] == "IVF4,PQ4x4, reranked 50"
    # one list probed, fewer candidates than asked for: the missing hits are -1 with -inf scores
    few = np.asarray([x[0]])
    scores, rows, _ = search_vectors(reader, few, 600, nprobe=1, rerank=1)
    found = rows[0] >= 0
    assert 0 < found.sum() < 600 and (rows[0][~found] == -1).all() and np.isneginf(scores[0][~found]).all()
    assert found[:found.sum()].all() and rows[0][0] == 0 and len(set(rows[0][found].tolist())) == found.sum()


def test_exact_search_ranks_ties_by_row_and_subsets_map_back(tmp_path):
    """Equal scores rank by store row (deterministic output); a search among some rows (--where) returns
    store rows, exactly, at most as many as there are; k beyond the store gives every row."""
    from vlmtools.search import search_vectors
    from vlmtools.store import open_store

    base = _unit(5, 8, 2)
    x = np.concatenate([base, base[::-1], base])  # every vector three times
    write_arrays(tmp_path / "s", x, [{"id": f"r{i}"} for i in range(15)], kind="text", model={"name": "m"},
                 shard_size=4)
    reader = open_store(tmp_path / "s")
    scores, rows, method = search_vectors(reader, base[:2], 6)
    assert method == "exact"
    assert rows.tolist()[0][:3] == [0, 9, 10] and rows.tolist()[1][:3] == [1, 8, 11]
    np.testing.assert_array_equal(rows, _truth(reader, base[:2], 6)[1])
    subset = [14, 3, 9, 7]
    s_scores, s_rows, method = search_vectors(reader, base[:2], 3, rows=subset)
    full_s, full_r = _truth(reader, base[:2], 15)
    for q in range(2):
        expected = [r for r in full_r[q] if r in subset][:3]
        assert s_rows[q].tolist() == expected and method == "exact"
        np.testing.assert_allclose(s_scores[q], [full_s[q][list(full_r[q]).index(r)] for r in expected], atol=1e-6)
    assert search_vectors(reader, base[:2], 10, rows=subset)[1].shape == (2, 4)
    best = [[next(r for r in full_r[q] if r in subset)] for q in range(2)]
    assert search_vectors(reader, base[:2], 1, rows=subset)[1].tolist() == best  # k = 1: the best one
    empty_s, empty_r, method = search_vectors(reader, base[:2], 3, rows=[])
    assert empty_s.shape == empty_r.shape == (2, 0) and empty_r.dtype == np.int64 and method == "exact"
    assert search_vectors(reader, base[:1], 100)[1].shape == (1, 15)
    nothing = write_arrays(tmp_path / "empty", np.zeros((0, 8)), [], kind="text", model={"name": "m"})
    empty_s, empty_r, method = search_vectors(nothing, base[:2], 3)  # an empty store: no hits, no error
    assert empty_s.shape == empty_r.shape == (2, 0) and empty_s.dtype == np.float32 and method == "exact"
    assert empty_r.dtype == np.int64


def test_search_parameters_and_query_shapes_are_checked(tmp_path):
    """Bad parameters and query shapes are refused; an HNSW index saved with efSearch 16 still answers
    k = 100 accurately, because the search widens efSearch to 2k for deep result lists (left at 16, recall@100
    here is about 0.5)."""
    from vlmtools.search import check_search_params, exact_search, search_vectors
    from vlmtools.store import open_store

    write_arrays(tmp_path / "s", _unit(3000, 32, 0), [{"id": str(i)} for i in range(3000)], kind="image",
                 model={"name": "m"})
    reader = open_store(tmp_path / "s")
    with pytest.raises(BadInput, match="query vectors have dim 4, the store .* has 32"):
        search_vectors(reader, np.ones((2, 4)), 3)
    with pytest.raises(BadInput, match="query vectors have dim 32"):
        search_vectors(reader, np.ones(32), 3)  # one vector, not a matrix
    with pytest.raises(BadInput, match="-k must be at least 1 \\(got 0\\)"):
        search_vectors(reader, np.ones((1, 32)), 0)
    check_search_params(1, 0)
    check_search_params(None, None)
    for nprobe, rerank, message in ((0, None, "--nprobe must be at least 1 (got 0)"),
                                    (None, -1, "--rerank must be at least 0 (got -1)")):
        with pytest.raises(BadInput, match=re.escape(message)):
            check_search_params(nprobe, rerank)
    build_index(tmp_path / "s", index_key="HNSW8", ef_search=16, target_recall=0)
    reader = open_store(tmp_path / "s")
    with pytest.raises(BadInput, match="--nprobe applies to IVF indexes; .* has HNSW8"):
        search_vectors(reader, np.ones((1, 32)), 3, nprobe=4)
    _, rows, method = search_vectors(reader, reader.embeddings[:3], 1, exact=True)
    assert method == "exact" and rows[:, 0].tolist() == [0, 1, 2]
    queries = _unit(20, 32, 1)
    _, truth = exact_search(reader, queries, 100)
    _, rows, method = search_vectors(reader, queries, 100)
    assert method == "HNSW8"
    assert np.mean([len(set(a) & set(b)) / 100 for a, b in zip(rows.tolist(), truth.tolist())]) >= 0.9


def test_hits_skip_padding_carry_metadata_and_name_the_query_when_several(tmp_path):
    from vlmtools.search import hit_records
    from vlmtools.store import open_store

    meta = [{"id": "a", "rank": "meta's own", "label": "x"}, {"id": "b"}, {"id": "c", "score": 7}]
    write_arrays(tmp_path / "s", np.eye(3), meta, kind="text", model={"name": "m"})
    reader = open_store(tmp_path / "s")
    scores = np.array([[1.0001, 0.5, -np.inf], [0.25, -1.2, 0.12345678]], np.float32)
    rows = np.array([[2, 0, -1], [1, 0, 2]])
    one = hit_records(reader, scores[:1], rows[:1], ["q1"])
    assert one == [{"rank": 1, "score": 1.0, "id": "c"}, {"rank": 2, "score": 0.5, "id": "a", "label": "x"}]
    two = hit_records(reader, scores, rows, ["q1", "q2"])
    assert [(h["query"], h["rank"], h["id"]) for h in two] == [("q1", 1, "c"), ("q1", 2, "a"), ("q2", 1, "b"),
                                                              ("q2", 2, "a"), ("q2", 3, "c")]
    assert [h["score"] for h in two[2:]] == [0.25, -1.0, 0.123457]  # cosines, clipped, 6 decimals


# ----------------------------------------------------------------------------- queries that need no model

WEIGHTS_NOT_HERE = {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}  # a search that loaded it would fail


@pytest.fixture
def stored(tmp_path):
    """A text store of 12 rows (labels a/b) and a query store of 3 rows, the second without an id."""
    x = _unit(12, 16, 4)
    write_arrays(tmp_path / "s", x, [{"id": f"r{i}", "label": "ab"[i % 2]} for i in range(12)], kind="text",
                 model=WEIGHTS_NOT_HERE, shard_size=3)
    write_arrays(tmp_path / "q", x[[5, 2, 7]], [{"id": "q5"}, {"note": "no id"}, {"id": "q7"}], kind="text",
                 model=WEIGHTS_NOT_HERE)
    return tmp_path / "s", tmp_path / "q"


def test_stored_queries_model_free_rank_the_store(stored, capsys):
    """--id and --store queries search with the stored vectors: each finds itself first, hits are ranked
    exactly, the query is named (by id, or by row for a row without one) only when there are several."""
    from vlmtools.store import open_store

    s, q = stored
    reader = open_store(s)
    truth = _truth(reader, reader.embeddings[[3]], 3)[1][0]
    hits = search(s, ids=["r3"], k=3)
    assert [h["id"] for h in hits] == [f"r{r}" for r in truth] and hits[0]["id"] == "r3"
    assert [h["rank"] for h in hits] == [1, 2, 3] and "query" not in hits[0] and hits[0]["score"] == 1.0
    assert "1 query, top 3 of 12 rows (exact)" in " ".join(capsys.readouterr().err.split())
    hits = search(s, ids=["r3", "r0"], query_store=str(q), k=1)
    assert [(h["query"], h["id"]) for h in hits] == [("r3", "r3"), ("r0", "r0"), ("q5", "r5"), ("1", "r2"),
                                                     ("q7", "r7")]
    assert "5 queries, top 1 of 12 rows (exact)" in " ".join(capsys.readouterr().err.split())
    build_index(s, index_key="Flat")
    assert [h["id"] for h in search(s, ids=["r3"], k=3)] == [f"r{r}" for r in truth]
    assert "(Flat)" in capsys.readouterr().err
    search(s, ids=["r3"], k=3, exact=True)
    assert "(exact)" in capsys.readouterr().err
    hits = search(s, ids=["r3"], k=10, where=["label=a"])  # only the matching rows, as many as there are
    assert sorted(h["id"] for h in hits) == [f"r{i}" for i in (0, 10, 2, 4, 6, 8)] and len(hits) == 6
    assert "1 query, top 10 of 12 rows (exact)" in " ".join(capsys.readouterr().err.split())
    assert len(search(s, ids=["r3"])) == 10  # -k 10 by default
    with pytest.raises(BadInput, match="--nprobe applies to IVF indexes; .* has Flat"):
        search(s, ids=["r3"], nprobe=4)


def test_searcher_model_free_methods_ids_and_bad_queries(stored):
    from vlmtools.search import Searcher, read_query_lines, store_queries

    s, q = stored
    searcher = Searcher(s)
    assert searcher.method == "exact" and searcher.spec.name == "ViT-B-32"
    assert len(searcher.search(*searcher.vectors(ids=["r2"]))) == 10  # -k 10 by default
    for kwargs, message in ((dict(nprobe=0), "--nprobe must be at least 1"), (dict(rerank=-1), "--rerank must be")):
        with pytest.raises(BadInput, match=message):  # `vlmtools serve` makes its Searcher directly
            Searcher(s, **kwargs)
    assert searcher.spec.pretrained == "laion2b_s34b_b79k"  # the store's weights, named by the store
    vectors, names = searcher.vectors(ids=["r4", "r1"])
    np.testing.assert_array_equal(vectors, searcher.reader.embeddings[[4, 1]])
    assert names == ["r4", "r1"] and vectors.dtype == np.float32
    assert searcher.vectors()[0].shape == (0, 16)
    build_index(s, index_key="Flat")
    assert Searcher(s).method == "Flat" and Searcher(s, exact=True).method == "exact"
    queries, names = store_queries(str(q), searcher.spec)
    assert names == ["q5", "1", "q7"] and queries.shape == (3, 16)
    cases = [(dict(ids=["nope"]), BadInput, "--id nope: no row of"),
             (dict(ids=["r1"], where=["label=zzz"]), BadInput, "--where label=zzz: no row of"),
             (dict(ids=["r1"], where=["label"]), BadInput, "expected KEY=VALUE"),
             (dict(), BadInput, "no query: give --text"),
             (dict(ids=["r1"], k=0), BadInput, "-k must be at least 1 (got 0)"),
             (dict(ids=["r1"], nprobe=0), BadInput, "--nprobe must be at least 1"),
             (dict(texts=["  "]), BadInput, "--text: empty query text"),
             (dict(ids=["r1"], model="ViT-L-14"), StoreMismatch, f"{s}: the store was embedded with ViT-B-32")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            search(s, **kwargs)
    write_arrays(s.parent / "empty", np.zeros((0, 16)), [], kind="text", model=WEIGHTS_NOT_HERE)
    with pytest.raises(BadInput, match=re.escape(f"--store {s.parent / 'empty'}: the query store is empty")):
        search(s, query_store=str(s.parent / "empty"))
    write_arrays(s.parent / "other", np.eye(16)[:2], [{"id": "a"}, {"id": "b"}], kind="text",
                 model={"name": "ViT-B-32", "pretrained": "openai"})
    with pytest.raises(StoreMismatch, match="was embedded with ViT-B-32"):
        search(s, query_store=str(s.parent / "other"))
    (s.parent / "queries.txt").write_text("  a red bird \n\n\t\nthe sea\n")
    assert read_query_lines(str(s.parent / "queries.txt")) == ["a red bird", "the sea"]
    (s.parent / "blank.txt").write_text("\n  \n")
    with pytest.raises(BadInput, match=re.escape(f"--text-file {s.parent / 'blank.txt'}: no queries in it")):
        read_query_lines(str(s.parent / "blank.txt"))
    with pytest.raises(BadInput, match=re.escape(f"--text {s.parent / 'blank.txt'}: no queries in it")):
        read_query_lines(str(s.parent / "blank.txt"), "--text")


def test_rows_without_ids_are_queried_by_row_number_model_free(tmp_path):
    from vlmtools.search import Searcher

    write_arrays(tmp_path / "s", _unit(4, 8, 5), [{"path": f"{i}.png"} for i in range(4)], kind="image",
                 model=WEIGHTS_NOT_HERE)
    searcher = Searcher(tmp_path / "s")
    assert searcher.row_of("2") == 2 and searcher.row_of(3) == 3
    hits = search(tmp_path / "s", ids=["2"], k=1)
    assert hits == [{"rank": 1, "score": 1.0, "path": "2.png"}]


def test_mixed_queries_keep_their_order_names_and_precision(image_store, image_dir):
    """Texts, image paths, images in memory (serve's) and stored ids in one call: vectors and names in that
    order, images in memory named by position; the model is loaded as asked (precision), once."""
    from vlmtools.search import Searcher

    searcher = Searcher(image_store, device="cpu", precision="fp16")
    path = str(image_dir / "img03.png")
    pil = Image.open(image_dir / "img05.png").convert("RGB")
    vectors, names = searcher.vectors(texts=["a red square"], images=[path, pil], ids=["img07"])
    assert names == ["a red square", path, "image 2", "img07"] and vectors.shape == (4, 32)
    assert vectors.dtype == np.float32 and searcher.encoder().precision_info()["precision"] == "fp16"
    assert searcher.encoder() is searcher.encoder()
    hits = searcher.search(vectors[1:], names[1:], k=1)
    assert [(h["query"], h["id"]) for h in hits] == [(path, "img03"), ("image 2", "img05"), ("img07", "img07")]
    fp16 = search(image_store, images=[path, pil], k=3, device="cpu", precision="fp16")
    assert fp16 == searcher.search(vectors[1:3], names[1:3], k=3)  # search() loads the model as asked
    assert fp16 != search(image_store, images=[path, pil], k=3, device="cpu", precision="fp32")
