"""Issue 11: the tensor decode path, JPEG draft decoding, webdataset tars, ranks as processes, autofaiss-style
shard reading, IVF-PQ within a memory budget, classify in bounded chunks."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.store import open_store
from vlmtools.synth.render import photo_like as photo

runner = CliRunner()
TINY = ["--model", "vlmtools-tiny", "--pretrained", "none", "--device", "cpu"]
MICRO = ["--model", "vlmtools-micro", "--device", "cpu"]


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


SIZES = [(500, 375), (375, 500), (300, 300), (640, 480), (90, 70), (500, 375)]


@pytest.fixture(scope="module")
def micro():
    from vlmtools.models import ModelSpec, load_model

    return load_model(ModelSpec.parse("vlmtools-micro"), "cpu")


def _cos_min(a, b) -> float:
    return float((np.asarray(a) * np.asarray(b)).sum(1).min())


def test_tensor_pipeline_and_draft_match_pil(micro):
    import torch

    from vlmtools.images import TensorPreprocess, decode_jpegs, load_rgb

    rng = np.random.default_rng(0)
    datas = [jpeg_bytes(photo(rng, w, h)) for w, h in SIZES]
    pil = torch.stack([micro.preprocess(load_rgb(io.BytesIO(d))) for d in datas])
    tensor_pre = TensorPreprocess.from_transform(micro.preprocess)
    assert tensor_pre is not None and tensor_pre.crop == (micro.image_size, micro.image_size)
    decoded = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], "cpu")
    tensors = tensor_pre(decoded)
    assert tensors.shape == pil.shape
    drafted = torch.stack([micro.preprocess(load_rgb(io.BytesIO(d), micro.image_size)) for d in datas])
    ref = micro.encode_image_tensor(pil)
    assert _cos_min(ref, micro.encode_image_tensor(tensors)) >= 0.999
    assert _cos_min(ref, micro.encode_image_tensor(drafted)) >= 0.999
    # draft mode really decodes less: 500x375 at 1/2 scale keeps >= 2 x 64 px on the shorter side
    small = load_rgb(io.BytesIO(datas[0]), micro.image_size)
    assert small.size == (250, 188) and load_rgb(io.BytesIO(datas[4]), micro.image_size).size == (90, 70)
    # a corrupt JPEG costs only itself in a batch
    bad = torch.frombuffer(bytearray(datas[1][:3] + b"garbage" * 20), dtype=torch.uint8)
    out = decode_jpegs([torch.frombuffer(bytearray(datas[0]), dtype=torch.uint8), bad], "cpu")
    assert out[0] is not None and out[1] is None


def test_embed_decode_gpu_path_on_cpu_matches_cpu_path(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        (tmp_path / f"p{i}.jpg").write_bytes(jpeg_bytes(photo(rng, w, h)))
        lines.append({"id": f"p{i}", "path": f"p{i}.jpg"})
    photo(rng, 200, 150).save(tmp_path / "q.png")  # not a JPEG: the PIL path, per file
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 10)
    lines += [{"id": "q", "path": "q.png"}, {"id": "bad", "path": "bad.jpg"}, {"id": "gone", "path": "gone.jpg"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    stores = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(out), "--decode", decode,
                                     "--workers", "1", "-b", "4", "--shard-size", "5", "--dtype", "float32",
                                     "--json", *MICRO])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["skipped"] == 2
        assert set(summary["timings"]) == {"read_input", "start_workers", "load_model", "first_batch", "loop", "finalize"}
        assert summary["timings"]["loop"] == pytest.approx(summary["seconds"], abs=1e-3)
        stores[decode] = open_store(out)
    a, b = stores["cpu"], stores["gpu"]
    assert [m["id"] for m in a.meta] == [m["id"] for m in b.meta] == [f"p{i}" for i in range(6)] + ["q"]
    assert _cos_min(a.embeddings, b.embeddings) >= 0.999
    assert [e["id"] for e in b.errors()] == ["bad", "gone"]
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(tmp_path / "x"), "--decode", "nvjpeg",
                                 *MICRO])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()


def test_tensor_pipeline_takes_only_jpegs_it_decodes_like_pil(tmp_path):
    from vlmtools.embed import _ImageDataset
    from vlmtools.images import plain_jpeg

    rng = np.random.default_rng(2)
    img = photo(rng, 120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": nvJPEG would ignore it
    png = io.BytesIO()
    img.save(png, "PNG")
    datas = {"plain": jpeg_bytes(img), "grey": jpeg_bytes(img.convert("L")),
             "rotated": jpeg_bytes(img, exif=exif.tobytes()), "cmyk": jpeg_bytes(img.convert("CMYK")),
             "png": png.getvalue(), "upright": jpeg_bytes(img, exif=Image.Exif().tobytes())}
    assert {k: plain_jpeg(v) for k, v in datas.items()} == {
        "plain": True, "grey": True, "rotated": False, "cmyk": False, "png": False, "upright": True}
    sources = []
    for name, data in datas.items():
        (tmp_path / name).write_bytes(data)
        sources.append(str(tmp_path / name))
    dataset = _ImageDataset(sources, lambda im: im.size, raw_jpeg=True)
    items = [dataset[i][1] for i in range(len(sources))]
    assert [kind for kind, _ in items] == ["jpeg", "jpeg", "tensor", "tensor", "tensor", "jpeg"]
    assert items[2][1] == (80, 120)  # the rotated JPEG went through PIL, which turned it upright


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_path_matches_pil_path_on_cuda(tmp_path):
    """On a GPU: nvJPEG batches with the fallbacks a real collection has (progressive, EXIF-rotated, CMYK,
    greyscale, PNG, corrupt, missing) give the PIL path's vectors and errors."""
    rng = np.random.default_rng(3)
    exif = Image.Exif()
    exif[0x0112] = 8
    files = {f"p{i}.jpg": jpeg_bytes(photo(rng, w, h)) for i, (w, h) in enumerate(SIZES * 6)}
    files.update({"prog.jpg": jpeg_bytes(photo(rng, 500, 375), progressive=True),
                  "rot.jpg": jpeg_bytes(photo(rng, 500, 375), exif=exif.tobytes()),
                  "cmyk.jpg": jpeg_bytes(photo(rng, 300, 200).convert("CMYK")),
                  "grey.jpg": jpeg_bytes(photo(rng, 300, 200).convert("L")),
                  "bad.jpg": b"\xff\xd8\xff" + b"not really a jpeg" * 10})
    png = io.BytesIO()
    photo(rng, 200, 150).save(png, "PNG")
    files["q.png"] = png.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    lines = [{"id": name, "path": name} for name in files] + [{"id": "gone", "path": "gone.jpg"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    stores = {}
    for decode in ("cpu", "gpu"):
        result = runner.invoke(app, ["embed", "images", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / decode),
                                     "--decode", decode, "--device", "cuda", "--model", "vlmtools-micro",
                                     "-b", "16", "--workers", "2", "--dtype", "float32", "--json"])
        assert result.exit_code == 0, result.output
        stores[decode] = open_store(tmp_path / decode)
    a, b = stores["cpu"], stores["gpu"]
    assert [m["id"] for m in a.meta] == [m["id"] for m in b.meta] == [n for n in files if n != "bad.jpg"]
    assert _cos_min(a.embeddings, b.embeddings) >= 0.999
    assert sorted(e["id"] for e in b.errors()) == ["bad.jpg", "gone"]


def test_decode_ahead_passes_errors_and_stops_its_thread():
    from vlmtools.embed import _DecodeAhead

    batches = [([0], None, ([], None, []), []), ([1], None, ([], None, []), [])]

    def to_batch(indices, tensor, raw, failed):
        if indices == [1]:
            raise RuntimeError("decoder broke")
        return indices, tensor, failed

    ahead = _DecodeAhead(batches, to_batch, "cpu")
    got = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for item in ahead:
            got.append(item)
    assert got == [(0, [0], None, [])] and not ahead.thread.is_alive()
    # a consumer that stops early (an error in the loop, Ctrl-C) stops the thread too
    many = [([i], None, ([], None, []), []) for i in range(50)]
    ahead = _DecodeAhead(many, lambda *b: b[0::3][:1] + (None, []), "cpu")
    iterator = iter(ahead)
    assert next(iterator)[0] == 0
    iterator.close()
    assert not ahead.thread.is_alive()


def test_brace_expansion():
    from vlmtools.wds import expand_braces, is_tar_input

    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"] and expand_braces("{x}.tar") == ["{x}.tar"]
    assert is_tar_input("shards/{000..009}.tar") and not is_tar_input("m.jsonl") and not is_tar_input("-")


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    """Three img2dataset-style tars: jpg/png/webp images with .json (+ .txt) sidecars, a failed download
    (json only), an unreadable image."""
    rng = np.random.default_rng(2)
    d = tmp_path / "shards"
    d.mkdir()
    key = 0
    for s in range(3):
        samples = []
        for j in range(4):
            k = f"{key:09d}"
            img = photo(rng, 80, 60)
            if j == 1:
                buf = io.BytesIO()
                img.save(buf, "PNG")
                samples.append((f"{k}.png", buf.getvalue()))
            elif j == 2:
                buf = io.BytesIO()
                img.save(buf, "WEBP")
                samples.append((f"{k}.webp", buf.getvalue()))
            else:
                samples.append((f"{k}.jpg", jpeg_bytes(img)))
            samples.append((f"{k}.txt", f"caption {key}".encode()))
            samples.append((f"{k}.json", json.dumps({"url": f"http://x/{key}", "key": k, "status": "success",
                                                     "label": s}).encode()))
            key += 1
        samples.append((f"{key:09d}.json", json.dumps({"status": "failed_to_download"}).encode()))
        key += 1
        if s == 2:
            samples.append((f"{key:09d}.jpg", b"\xff\xd8\xffbroken"))
            key += 1
        _write_tar(d / f"{s:05d}.tar", samples)
    return d


def test_embed_webdataset_tars_and_resume_per_shard(tmp_path, shards):
    out = tmp_path / "store"
    pattern = str(shards / "{00000..00002}.tar")
    args = ["embed", "images", pattern, "-o", str(out), "--workers", "0", "-b", "3", "--json", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 12 and summary["skipped"] == 1 and summary["shards_done"] == 3
    store = open_store(out)
    assert len(store) == 12 and store.info["input_shards"] == 3
    first = store.meta[0]
    assert first["id"] == "000000000" and first["caption"] == "caption 0" and first["url"] == "http://x/0"
    assert first["label"] == "0" and first["path"].endswith("00000.tar#000000000.jpg")
    assert [len(m) for _, m in store.shards()] == [4, 4, 4]  # store shard k = tar k
    assert [e["id"] for e in store.errors()] == ["000000015"]
    from vlmtools.store import check_store

    assert check_store(out)["ok"] and check_store(out)["missing_shards"] == []
    before = store.embeddings.copy()
    (out / "emb-00001.npy").unlink()  # lose one shard: a rerun redoes that tar only
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["shards_done"] == 1 and again["shards_kept"] == 2 and again["embedded"] == 4
    np.testing.assert_array_equal(open_store(out).embeddings, before)
    result = runner.invoke(app, ["embed", "images", str(shards / "{00000..00003}.tar"), "-o", str(tmp_path / "y"),
                                 *TINY])
    assert result.exit_code == 2 and "00003.tar" in result.output and not (tmp_path / "y").exists()


def test_three_ranks_as_processes_equal_one_process(tmp_path, image_dir, spawn):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"i{k}", "path": str(p)}) + "\n"
                                for k, p in enumerate(sorted(image_dir.glob("*.png")))))
    common = ["-m", "vlmtools", "embed", "images", str(manifest), "--shard-size", "3", "--workers", "0",
              "--dtype", "float32", *TINY]
    env = {**os.environ, "WORLD_SIZE": "3", "OMP_NUM_THREADS": "1"}
    procs = [spawn([sys.executable, *common, "-o", str(tmp_path / "multi")],
                   env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(3)]
    single = runner.invoke(app, [*common[2:], "-o", str(tmp_path / "single"), "--world-size", "1", "--rank", "0"])
    assert single.exit_code == 0, single.output
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        errs.append(err.decode())
    multi = tmp_path / "multi"
    # each rank writes its last shard before it looks for the others': the last to look finalizes
    info = json.loads((multi / "info.json").read_text())
    assert info["count"] == 20, (info, sorted(os.listdir(multi)), errs)
    a, b = open_store(multi), open_store(tmp_path / "single")
    assert len(a) == len(b) == 20 and a.meta == b.meta
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert len(list(multi.glob("emb-*.npy"))) == 7


def test_store_shards_read_as_autofaiss_reads_them(tmp_path, image_dir):
    """autofaiss (embedding_reader) takes every .npy file of a folder in name order, 2-d float16/float32,
    and reads shapes from the .npy headers: a store's shards are exactly that, with nothing else named .npy."""
    out = tmp_path / "s"
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(image_dir.glob("*.png"))))
    result = runner.invoke(app, ["embed", "images", str(manifest), "-o", str(out), "--shard-size", "6",
                                 "--workers", "0", *TINY])
    assert result.exit_code == 0, result.output
    runner.invoke(app, ["index", str(out)])
    files = sorted(f for f in os.listdir(out) if f.endswith(".npy"))
    assert files == [f"emb-{k:05d}.npy" for k in range(4)]
    rows = 0
    for f in files:
        with open(out / f, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
        assert len(shape) == 2 and not fortran and dtype in (np.float16, np.float32)
        rows += shape[0]
    whole = np.concatenate([np.load(out / f) for f in files]).astype(np.float32)
    store = open_store(out)
    assert rows == len(store) == 20
    np.testing.assert_array_equal(whole, store.embeddings)


def _clustered(rng, n, dim, centers):
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivfpq_index_nprobe_and_rerank_from_store(tmp_path):
    from vlmtools.index import train_size
    from vlmtools.search import exact_search, search_vectors
    from vlmtools.store import write_arrays

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 32)).astype(np.float32)
    x = _clustered(rng, 12000, 32, centers)
    store = tmp_path / "s"
    write_arrays(store, x, [{"id": str(i)} for i in range(len(x))], kind="image", model={"name": "m"},
                 dtype="float16", shard_size=5000)
    result = runner.invoke(app, ["index", str(store), "--index-key", "IVF64,PQ8", "--max-memory", "64M",
                                 "--target-recall", "0"])  # the untuned defaults
    assert result.exit_code == 0, result.output
    index_info = json.loads((store / "index.json").read_text())
    assert index_info["train_size"] == 10000  # max(64 per list, 10k), within half of 64M
    assert index_info["params"]["rerank"] == 10  # PQ codes rank coarsely: reranked by default
    reader = open_store(store)
    queries = _clustered(rng, 100, 32, centers)
    _, truth = exact_search(reader, queries, 10)

    def recall(rows):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), truth.tolist())])

    _, plain, method = search_vectors(reader, queries, 10, nprobe=64, rerank=0)
    _, reranked, method_r = search_vectors(reader, queries, 10, nprobe=64, rerank=8)
    assert method == "IVF64,PQ8" and method_r == "IVF64,PQ8, reranked 80"
    assert recall(reranked) >= 0.95 and recall(reranked) > recall(plain)
    assert search_vectors(reader, queries, 10, nprobe=64)[2] == "IVF64,PQ8, reranked 100"  # the saved default
    # --rerank saved by `index` (no rebuild), used by `search`, overridden there
    result = runner.invoke(app, ["index", str(store), "--rerank", "8"])
    assert result.exit_code == 0 and json.loads((store / "index.json").read_text())["params"]["rerank"] == 8
    np.testing.assert_array_equal(search_vectors(open_store(store), queries, 10, nprobe=64)[1], reranked)
    result = runner.invoke(app, ["index", str(store), "--rerank", "0"])
    assert result.exit_code == 0 and json.loads((store / "index.json").read_text())["params"]["rerank"] == 0
    assert search_vectors(open_store(store), queries, 10, nprobe=64)[2] == "IVF64,PQ8"
    # an index.json from before rerank was saved: PQ codes are reranked by default at search time
    record = json.loads((store / "index.json").read_text())
    del record["params"]["rerank"]
    (store / "index.json").write_text(json.dumps(record))
    assert search_vectors(open_store(store), queries, 10, nprobe=64)[2] == "IVF64,PQ8, reranked 100"
    # faiss pads short candidate lists with -1: those are dropped, never row 0
    scores, rows, _ = search_vectors(open_store(store), queries[:3], 10, nprobe=1, rerank=100)
    assert ((rows >= 0) | (rows == -1)).all() and np.isfinite(scores[rows >= 0]).all()
    result = runner.invoke(app, ["search", str(store), "--store", str(store), "-k", "3", "--nprobe", "0"])
    assert result.exit_code == 2 and "--nprobe" in result.output
    # the training sample stays within half the memory budget (but >= 10k rows)
    assert train_size("IVF65536_HNSW32,PQ64", 10**7, 512, "4G") == 2**31 // 2048
    assert train_size("IVF1024,PQ64", 10**6, 512, "64G") == 64 * 1024


def test_auto_index_for_ten_million_rows_fits_4g():
    """10^7 x 512 under --max-memory 4G: the key auto builds, what it holds, and the training sample."""
    from vlmtools.index import choose_index_key, default_params, estimate_bytes, parse_memory, train_size

    n, dim = 10**7, 512
    key = choose_index_key(n, dim, "4G")
    assert key == "IVF16384_HNSW32,PQ64x4fs"
    held = estimate_bytes(key, n, dim)  # 32 bytes of codes + 8 of id per row, centroids, codebooks
    assert held == n * 40 + 4 * dim * 16384 + 16 * 4 * dim and held < 0.5 * 2**30
    sample = train_size(key, n, dim, "4G")
    assert sample == 64 * 16384  # 64 rows per list, 2 GiB as float32: half the budget
    assert sample * 4 * dim <= parse_memory("4G") // 2 and held + sample * 4 * dim < parse_memory("4G")
    assert default_params(key) == {"rerank": 10, "nprobe": 128, "quantizer_efSearch": 256}


def test_rerank_reads_and_checks_only_the_candidate_rows(tmp_path):
    """search through a PQ index rescores candidates from the store without reading it all first, but a
    NaN row among the candidates is still refused, naming its shard."""
    from vlmtools.index import build_index
    from vlmtools.search import search_vectors
    from vlmtools.store import StoreProblem, write_arrays

    rng = np.random.default_rng(0)
    x = _clustered(rng, 12000, 32, rng.standard_normal((50, 32)).astype(np.float32))
    store = tmp_path / "s"
    write_arrays(store, x, [{"id": str(i)} for i in range(len(x))], kind="image", model={"name": "m"},
                 dtype="float32", shard_size=5000)
    build_index(store, index_key="IVF16,PQ8x4fs", target_recall=0)  # the untuned default: rerank 10
    reader = open_store(store)
    scores, rows, method = search_vectors(reader, x[:5], 3)
    assert method.endswith("reranked 30") and (rows[:, 0] == np.arange(5)).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # exact scores, not PQ estimates
    assert reader._finite == set()  # no shard was read through
    emb = np.load(store / "emb-00001.npy")
    emb[7, 3] = np.nan  # store row 5007, after the index was built
    np.save(store / "emb-00001.npy", emb)
    with pytest.raises(StoreProblem, match=r"emb-00001.npy: 1 row\(s\) hold NaN or inf values \(first: row 7\)"):
        search_vectors(open_store(store), x[5007:5008], 3)
    assert search_vectors(open_store(store), x[:5], 3)[1][:, 0].tolist() == list(range(5))  # elsewhere: fine


def test_row_view_reads_rows_lazily(tmp_path):
    from vlmtools.store import write_arrays

    x = np.random.default_rng(0).standard_normal((23, 8)).astype(np.float32)
    reader = write_arrays(tmp_path / "s", x, [{"id": str(i)} for i in range(23)], kind="image",
                          model={"name": "m"}, shard_size=5)
    view = reader.row_view()
    np.testing.assert_array_equal(view[3:17], reader.embeddings[3:17])
    rows = [22, 0, 7, 8]
    np.testing.assert_array_equal(reader.row_view(rows)[1:4], reader.embeddings[rows[1:4]])
    assert len(view) == 23 and view[30:40].shape == (0, 8)
    rows = [22, 0, 7, 8, 7, 14, 3]  # unsorted, repeated, across shards: returned in the order asked
    np.testing.assert_array_equal(view.take(rows), reader.embeddings[rows])
    with pytest.raises(IndexError):
        view.take([0, 23])
