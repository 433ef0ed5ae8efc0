"""Embedding stores: sharded NPY + row-aligned JSONL metadata + info.json (see formats.py, man 5).

Writer: shards are written atomically (temp + rename, meta before emb, so an emb file's presence means
its shard is complete); a rerun keeps finished shards and redoes the rest. Several workers may fill one
store (each writes the shards it owns); whoever finds every expected shard on disk writes the final count.
Reader: memory-maps shards in lexicographic (= row) order and presents one matrix + metadata.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from vlmtools import formats
from vlmtools.errors import BadInput, StoreMismatch

INFO = "info.json"
ERRORS = "errors.jsonl"
_SHARD_RE = re.compile(r"^emb-(.+)\.npy$")
DTYPES = ("float16", "float32")
KINDS = ("image", "text", "features")  # features: a frozen tower's feature maps per image (train ala's cache)


def check_layout(dtype: str, shard_size: int) -> None:
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise BadInput("--shard-size must be at least 1")


class StoreWriter:
    """Writes one worker's shards into a store directory, and info.json (count null until complete)."""

    def __init__(self, path: str | Path, *, kind: str, model: dict, dim: int, dtype: str = "float16",
                 shard_size: int = 10000, preprocess: str | None = None, extra_info: dict | None = None,
                 renewable: Sequence[str] = (), mismatch_fix: str | None = None):
        check_layout(dtype, shard_size)
        self.renewable = set(renewable)  # extra_info keys that may differ from the store's (then updated)
        self.mismatch_fix = mismatch_fix  # what the mismatch message tells the user to do (default: -o / --force)
        self.path = Path(path)
        self.kind, self.model, self.dim, self.dtype = kind, model, dim, dtype
        self.shard_size, self.preprocess = shard_size, preprocess
        self.extra_info = extra_info or {}
        if self.path.exists() and not self.path.is_dir():
            raise BadInput(f"{self.path}: is a file; a store is a directory (pass a new directory to -o)")
        self.path.mkdir(parents=True, exist_ok=True)
        existing = self._check_existing_info()
        if existing is None:
            self._write_info(count=None)  # marks the store as in progress (count null) until finalize

    def _check_existing_info(self) -> None:
        info_path = self.path / INFO
        if not info_path.exists():
            if any(self.path.glob(formats.EMB_PATTERN)):
                raise BadInput(f"{self.path}: has shards but no {INFO}; not a vlmtools store")
            if any(not _is_temp(p) for p in self.path.iterdir()):
                raise BadInput(f"{self.path}: exists and is not an empty directory or a vlmtools store")
            return None
        info = read_info(self.path)
        checks = [("kind", self.kind), ("model", self.model), ("dim", self.dim), ("dtype", self.dtype),
                  ("shard_size", self.shard_size)] + list(self.extra_info.items())
        for key, mine in checks:
            if info.get(key) != mine and key not in self.renewable:
                this_run = {**info, key: mine, "input_count": self.extra_info.get("input_count")}
                fix = ("pass --retry-errors if you fixed images that had failed, or --force to rebuild it"
                       if key == "files_sha" else "use another output directory, or pass --force to rebuild it")
                fix = self.mismatch_fix or fix
                raise StoreMismatch(f"{self.path} already holds a store {_describe(key, info)}; this run has "
                                    f"{_describe(key, this_run)}: {fix}")
        return info

    def _write_info(self, count: int | None, content_sha256: str | None = None) -> None:
        info = formats.store_info(kind=self.kind, model=self.model, dim=self.dim, dtype=self.dtype,
                                  shard_size=self.shard_size, count=count, preprocess=self.preprocess,
                                  extra=self.extra_info, content_sha256=content_sha256)
        formats.write_json(self.path / INFO, info)

    def stem(self, shard: int) -> str:
        return formats.shard_stem(shard)

    def shard_done(self, shard: int) -> bool:
        return (self.path / formats.emb_name(self.stem(shard))).exists()

    def reopen_failed(self) -> list[int]:
        """Forget the shards that recorded failed inputs, so that a rerun tries those inputs again."""
        reopened = []
        for f in sorted(self.path.glob("errors-*.jsonl")):
            stem = f.name[len("errors-"):-len(".jsonl")]
            (self.path / formats.emb_name(stem)).unlink(missing_ok=True)
            reopened.append(int(stem))
        if reopened:
            self._write_info(count=None)
        return reopened

    def clean_partial(self, shards: Iterable[int]) -> None:
        """Remove temp files a killed run left for these shards (only this worker's shards: others may be
        writing theirs right now)."""
        for shard in shards:
            stem = self.stem(shard)
            for name in (formats.emb_name(stem), formats.meta_name(stem), errors_name(stem)):
                for tmp in self.path.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)

    def write_shard(self, shard: int, embeddings, meta: Sequence[dict], errors: Sequence[dict] = ()) -> None:
        """Write one shard: its errors and meta first, the emb file last (its presence marks the shard done)."""
        import numpy as np

        emb = np.asarray(embeddings, dtype=self.dtype)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"shard {shard}: expected (n, {self.dim}) embeddings, got {emb.shape}")
        if len(meta) != emb.shape[0]:
            raise ValueError(f"shard {shard}: {emb.shape[0]} embeddings but {len(meta)} meta rows")
        stem = self.stem(shard)
        if errors:
            formats.write_jsonl(self.path / errors_name(stem), errors)
        else:
            (self.path / errors_name(stem)).unlink(missing_ok=True)
        formats.write_jsonl(self.path / formats.meta_name(stem), meta)
        formats.failpoint(f"store.mid_shard:{shard}")
        with formats.atomic_path(self.path / formats.emb_name(stem)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, emb)
        formats.failpoint(f"store.after_shard:{shard}")

    def finalize(self, expected_shards: int | None = None) -> dict | None:
        """Once all ``expected_shards`` are on disk, count their rows and write the final info.json.
        Returns the info, or None while other workers' shards are still missing."""
        if expected_shards is not None and not all(self.shard_done(k) for k in range(expected_shards)):
            return None
        count = sum(n for _, n in _shard_rows(self.path))
        # Per-shard error files (one per writer, so workers never clash) merged into one, in row order.
        errors = [rec for f in sorted(self.path.glob("errors-*.jsonl")) for _, rec in formats.iter_jsonl(f)]
        if errors:
            formats.write_jsonl(self.path / ERRORS, errors)
        else:
            (self.path / ERRORS).unlink(missing_ok=True)
        formats.failpoint("store.finalize")
        self._write_info(count=count, content_sha256=content_digest(self.path, {
            "kind": self.kind, "model": self.model, "dim": self.dim, "dtype": self.dtype}))
        return formats.read_json(self.path / INFO)


def _describe(key: str, info: dict) -> str:
    """A store setting in words, for mismatch messages."""
    value = info.get(key)
    if key == "model" and isinstance(value, dict):
        return f"model {value.get('name')} (pretrained={value.get('pretrained')})"
    if key == "input_sha":
        return f"input of {info.get('input_count')} rows with digest {value} (ids, paths, labels, ...)"
    if key == "files_sha":
        return f"image files with size/mtime digest {value} (a file was replaced or touched)"
    return f"{key}={value!r}"


def _is_store_file(name: str) -> bool:
    return (name in (INFO, ERRORS, "index.faiss", "index.json") or _SHARD_RE.match(name) is not None
            or re.match(r"^(meta|errors)-.+\.jsonl$", name) is not None
            or (name.startswith(".") and name.endswith(".tmp")))


def clear_store(path: str | Path) -> None:
    """Empty a store directory for --force: only the files a store is made of; anything else there is
    refused (it may not be a store at all)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise BadInput(f"{path}: is a file; a store is a directory")
    files = list(path.iterdir())
    foreign = [f.name for f in files if not _is_store_file(f.name)]
    if foreign:
        raise BadInput(f"{path}: holds files that are not part of a store ({', '.join(sorted(foreign)[:3])}); "
                       f"--force only replaces a store")
    for f in files:
        f.unlink()


def errors_name(stem: str) -> str:
    return f"errors-{stem}.jsonl"


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _shard_files(path: Path) -> list[tuple[str, Path]]:
    out = []
    for f in sorted(path.glob(formats.EMB_PATTERN)):
        m = _SHARD_RE.match(f.name)
        if m:
            out.append((m.group(1), f))
    return out


def _shard_rows(path: Path) -> list[tuple[str, int]]:
    return [(stem, shard_header(f)[0][0]) for stem, f in _shard_files(path)]


DIGEST_KEYS = ("kind", "model", "dim", "dtype")


def content_digest(path: Path, info: dict) -> str:
    """sha256 over what a reader takes from a store: info.json's kind, model, dim and dtype, then each
    shard's name, embedding bytes and metadata bytes, in row order. Written into info.json when a store
    is finished ("content_sha256"), recorded by its index, and recomputed by `store check`: an edited
    setting, a swapped or replaced shard or meta file, or an index copied from another store shows."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    files = [f for stem, emb in _shard_files(path) for f in (emb, path / formats.meta_name(stem))]
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL on large blocks
        sums = list(pool.map(lambda f: formats.file_sha256(f) if f.exists() else "missing", files))
    h = hashlib.sha256(formats.dumps({k: info.get(k) for k in DIGEST_KEYS}, sort_keys=True).encode("utf-8"))
    for f, digest in zip(files, sums):
        h.update(f"\n{f.name} {digest}".encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------- validation
# One validator for every reader (classify, search, index, eval's stores, `store check`): it names the
# file and what is wrong before any work starts, instead of a traceback from numpy or a wrong answer.

class StoreProblem(BadInput):
    """A store on disk that cannot be read as it is."""


def shard_header(f: Path) -> tuple[tuple, str, int]:
    """(shape, dtype name, data offset) of an .npy shard from its header alone; StoreProblem if the header
    is damaged, the array holds Python objects, or the file is shorter than its header says."""
    import numpy as np

    try:
        with open(f, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
        size = f.stat().st_size
    except (ValueError, OSError, EOFError) as exc:
        raise StoreProblem(f"{f}: not a readable .npy shard ({' '.join(str(exc).split())[:120]})") from None
    if dtype.hasobject:
        raise StoreProblem(f"{f}: holds Python objects (dtype {dtype}); a shard holds float16/float32 "
                           f"numbers only, and vlmtools never unpickles")
    if dtype.name not in DTYPES:
        raise StoreProblem(f"{f}: dtype {dtype.name}; a shard holds float16 or float32")
    if len(shape) != 2:
        raise StoreProblem(f"{f}: shape {shape}; a shard is a 2-D (rows, dim) array")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size < expected:
        raise StoreProblem(f"{f}: truncated ({size} bytes, its header promises {expected})")
    if size > expected:
        raise StoreProblem(f"{f}: {size - expected} bytes after its data (its header promises {expected}); "
                           f"not a shard vlmtools wrote (appended to, or two files joined?)")
    return shape, dtype.name, offset


def _count_lines(f: Path) -> int:
    with open(f, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def check_info(info, where: str) -> dict:
    """info.json's shape: a JSON object of our format with kind, model, dim, dtype and count."""
    if not isinstance(info, dict):
        raise StoreProblem(f"{where}: expected a JSON object, found a {type(info).__name__}")
    formats.check_format(info, formats.STORE_FORMAT, where)
    if info.get("kind") not in KINDS:
        raise StoreProblem(f"{where}: \"kind\" must be one of {', '.join(KINDS)}, not {info.get('kind')!r}")
    model = info.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise StoreProblem(f"{where}: \"model\" must be an object with a \"name\" (the model that wrote the store)")
    dim = info.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise StoreProblem(f"{where}: \"dim\" must be a positive whole number, not {dim!r}")
    if info.get("dtype") not in DTYPES:
        raise StoreProblem(f"{where}: \"dtype\" must be one of {', '.join(DTYPES)}, not {info.get('dtype')!r}")
    count = info.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise StoreProblem(f"{where}: \"count\" must be a whole number or null, not {count!r}")
    return info


def read_info(path: Path) -> dict:
    info_path = path / INFO
    if not info_path.exists():
        raise BadInput(f"{path}: not a vlmtools store (no {INFO})")
    return check_info(formats.read_json(info_path), str(info_path))


def validate_shard(path: Path, info: dict, stem: str, f: Path) -> int:
    """The rows of one shard, checked against info (dim, dtype) and its meta file (row count)."""
    (rows, dim), dtype, _ = shard_header(f)
    if dim != info["dim"]:
        raise StoreProblem(f"{f}: rows of dim {dim}, but {INFO} says dim {info['dim']} (shards of "
                           f"different models mixed in one store?)")
    if dtype != info["dtype"]:
        raise StoreProblem(f"{f}: dtype {dtype}, but {INFO} says {info['dtype']} (was {INFO} edited?)")
    meta = path / formats.meta_name(stem)
    if not meta.is_file():
        raise StoreProblem(f"{f}: its metadata {meta.name} " + ("is not a file" if meta.exists() else "is missing"))
    n_meta = _count_lines(meta)
    if n_meta != rows:
        raise StoreProblem(f"{f}: {rows} rows but {meta.name} has {n_meta} lines")
    return rows


def _count_problem(path: Path, info: dict, total: int) -> str | None:
    count = info.get("count")
    if count is not None and total != count:
        return (f"{path}: the shards hold {total} rows but {INFO} counts {count}; the store is damaged "
                f"(rerun the embed command with --force)")
    return None


def validate_shards(path: Path, info: dict) -> list[tuple[str, Path, int]]:
    """(stem, emb file, rows) of every shard, each checked against info (dim, dtype) and its meta file
    (row count); StoreProblem naming the first bad file."""
    shards = [(stem, f, validate_shard(path, info, stem, f)) for stem, f in _shard_files(path)]
    problem = _count_problem(path, info, sum(n for _, _, n in shards))
    if problem:
        raise StoreProblem(problem)
    return shards


def check_finite(emb, f, first_row: int = 0, rows=None) -> None:
    """StoreProblem if a row holds NaN or inf (a damaged shard would give arbitrary predictions). Rows
    are numbered from ``first_row`` (a slice of the shard) or, for rows gathered from it, by ``rows``."""
    import numpy as np

    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(rows[bad[0]]) if rows is not None else int(bad[0]) + first_row
        raise StoreProblem(f"{f}: {len(bad)} row(s) hold NaN or inf values (first: row {first}); "
                           f"the store is damaged (rerun the embed command with --force)")


def load_shard(f: Path, check: bool = True):
    """A validated shard, memory-mapped, never unpickled; with ``check``, NaN/inf rows refused."""
    import numpy as np

    shard_header(f)
    emb = np.load(f, mmap_mode="r", allow_pickle=False)
    if check:
        check_finite(emb, f)
    return emb


UNIT_TOLERANCE = 0.01  # |norm - 1| allowed in a normalized store (float16 rounding is ~1e-3)
_CANONICAL_SHARD = re.compile(r"^emb-\d{5,}\.npy$")


def check_store(path: str | Path, deep: bool = True) -> dict:
    """The report `vlmtools store check` prints: {"store", "ok", "problems", "rows", "shards",
    "missing_shards", "errors", "duplicate_ids", "info"}. It looks for what any reader would trip on or
    misuse, every shard on its own (rows and shards count the readable ones): headers, dims, dtypes,
    sizes, meta row counts, missing shards, stray shard files and the index files' sizes. ``deep`` also
    reads every row (NaN/inf; rows of a normalized store that are not unit length, all-zero rows) and
    every id (duplicates), and recomputes the content digest (edited settings, swapped or replaced
    files) and the index's digests."""
    path = Path(path)
    report: dict = {"store": str(path), "ok": False, "problems": [], "rows": 0, "shards": 0,
                    "missing_shards": [], "errors": 0, "duplicate_ids": 0, "info": None}
    problems = report["problems"]
    try:
        if not path.is_dir():
            raise BadInput(f"{path}: {'is a file, not a store directory' if path.exists() else 'no such store directory'}")
        info = report["info"] = read_info(path)
    except BadInput as exc:
        problems.append(str(exc))
        return report
    shards, files = [], _shard_files(path)
    for stem, f in files:
        try:
            shards.append((stem, f, validate_shard(path, info, stem, f)))
        except BadInput as exc:
            problems.append(str(exc))
    report["rows"] = sum(n for _, _, n in shards)
    report["shards"] = len(shards)
    stray = sorted(f.name for f in path.glob("*.npy") if not _CANONICAL_SHARD.match(f.name))
    if stray:
        problems.append(f"{path}: {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}: not shards vlmtools "
                        f"writes (emb-NNNNN.npy); readers would take an emb-*.npy file for a shard: remove it")
    have = {int(stem) for stem, _ in files if stem.isdigit()}
    expected = info.get("input_count"), info.get("shard_size")
    if all(isinstance(v, int) and v > 0 for v in expected):
        import math

        # webdataset input: one shard per input tar, whatever its size
        n_shards = info.get("input_shards") or math.ceil(expected[0] / expected[1])
    else:  # a store written from arrays: at least the gaps show
        n_shards = max(have) + 1 if have else 0
    report["missing_shards"] = [k for k in range(n_shards) if k not in have]
    count_problem = _count_problem(path, info, sum(n for _, _, n in shards)) if len(shards) == len(files) else None
    if info.get("count") is None:
        missing = report["missing_shards"]
        problems.append(f"{path}: incomplete (an embed run did not finish"
                        + (f"; shards {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} "
                           f"are missing: with --world-size W, shard k belongs to rank k mod W" if missing else "")
                        + "); rerun it to resume")
    elif report["missing_shards"]:
        missing = report["missing_shards"]
        problems.append(f"{path}: shard(s) {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} "
                        f"missing from a finished store (deleted?); rerun the embed command with --force")
    elif count_problem:
        problems.append(count_problem)
    errors = path / ERRORS
    report["errors"] = _count_lines(errors) if errors.exists() else 0
    problems.extend(_index_problems(path, info, deep))
    if deep:
        import numpy as np

        unit = info.get("normalized") is True and info.get("kind") in ("image", "text")
        seen: set[str] = set()
        for stem, f, _ in shards:
            try:
                emb = np.load(f, mmap_mode="r", allow_pickle=False)
                check_finite(emb, f)
                if unit:
                    _check_unit(emb, f)
                for lineno, rec in formats.iter_jsonl(path / formats.meta_name(stem)):
                    key = str(rec.get("id")) if isinstance(rec, dict) else None
                    if key in seen:
                        report["duplicate_ids"] += 1
                        if report["duplicate_ids"] == 1:
                            problems.append(f"{path / formats.meta_name(stem)}:{lineno}: duplicate id {key!r}")
                    seen.add(key)
            except BadInput as exc:
                problems.append(str(exc))
        recorded = info.get("content_sha256")
        if recorded is not None and len(shards) == len(files) and content_digest(path, info) != recorded:
            problems.append(f"{path}: its content differs from the digest {INFO} records (a setting in {INFO} "
                            f"was edited, or a shard or meta file was changed, swapped or replaced); rerun the "
                            f"embed command with --force")
    report["ok"] = not problems
    return report


def _check_unit(emb, f: Path, block: int = 65536) -> None:
    """StoreProblem naming the first row of a normalized store that is all zeros or not unit length:
    search and classify scores of such rows are not cosine similarities (scores of 2,500 or 0)."""
    import numpy as np

    for start in range(0, emb.shape[0], block):
        norms = np.linalg.norm(np.asarray(emb[start:start + block], dtype=np.float32), axis=1)
        bad = np.flatnonzero(np.abs(norms - 1) > UNIT_TOLERANCE)
        if bad.size:
            row = int(bad[0])
            what = "all zeros" if norms[row] == 0 else f"of length {norms[row]:.4g}"
            raise StoreProblem(f"{f}: {bad.size} row(s) in rows {start}..{start + block - 1} are not unit length "
                               f"(first: row {start + row}, {what}); a store holds normalized embeddings")


def _index_problems(path: Path, info: dict, deep: bool) -> list[str]:
    """What is wrong with the store's index files, as a reader would find it (index.json's record of
    index.faiss and of the store it was built from)."""
    from vlmtools.index import INDEX_FILE, INDEX_INFO

    faiss_path, info_path = path / INDEX_FILE, path / INDEX_INFO
    if not info_path.exists():
        return []
    try:
        record = formats.read_json(info_path)
        formats.check_format(record, formats.INDEX_FORMAT, str(info_path))
    except BadInput as exc:
        return [str(exc)]
    if not faiss_path.is_file():
        return [f"{faiss_path}: missing, but {INDEX_INFO} describes an index; rebuild it: vlmtools index {path} --force"]
    out = []
    size = record.get("faiss_bytes")
    if size is not None and faiss_path.stat().st_size != size:
        out.append(f"{faiss_path}: {faiss_path.stat().st_size} bytes, {INDEX_INFO} records {size} (truncated "
                   f"or replaced); rebuild it: vlmtools index {path} --force")
    elif deep and record.get("faiss_sha256") and formats.file_sha256(faiss_path) != record["faiss_sha256"]:
        out.append(f"{faiss_path}: its digest differs from the one {INDEX_INFO} records; rebuild it: "
                   f"vlmtools index {path} --force")
    built_for = record.get("store_content_sha256")
    if built_for is not None and built_for != info.get("content_sha256"):
        out.append(f"{info_path}: built for another store content (copied from another store, or the store "
                   f"was rewritten since); rebuild it: vlmtools index {path} --force")
    return out


class StoreReader:
    """A store on disk as one (N, dim) matrix and N metadata rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInput(f"{self.path}: {'is a file, not a store directory' if self.path.exists() else 'no such store directory'}")
        self.info = read_info(self.path)
        if self.info.get("count") is None:
            raise BadInput(f"{self.path}: the store is incomplete (an embed run did not finish); rerun it to resume")
        self._shards = validate_shards(self.path, self.info)
        self._emb = None
        self._meta = None
        self._maps: dict[Path, object] = {}  # shard -> its memory map, reused
        self._finite: set[Path] = set()  # shards already read through for NaN/inf (once per reader)

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def spec(self):
        from vlmtools.models import ModelSpec

        m = self.info["model"]
        return ModelSpec(m["name"], m.get("pretrained"))

    def check_model(self, spec) -> None:
        if spec is not None:
            spec.check_matches(self.info["model"], f"store {self.path}")

    def _load(self, f: Path, check: bool = True, keep: bool = False):
        """A shard memory-mapped; its NaN/inf check (a full read) runs once per reader, and only when
        ``check``. ``keep`` keeps the map for the reader's life (rerank's random reads: a fresh map would
        page-fault again on every search); full passes map each shard afresh and let it go when done, so
        that the pages they read do not pile up in the process's resident set."""
        emb = self._maps.get(f)
        if emb is None:
            emb = load_shard(f, check=False)
            if keep:
                self._maps[f] = emb
        if check and f not in self._finite:
            check_finite(emb, f)
            self._finite.add(f)
        return emb

    def shards(self):
        """(embeddings memmap, meta rows) per shard, in row order."""
        for stem, f, _ in self._shards:
            emb = self._load(f)
            meta = formats.read_meta_rows(self.path / formats.meta_name(stem))
            if len(meta) != emb.shape[0]:
                raise BadInput(f"{f}: {emb.shape[0]} rows but {len(meta)} meta rows; the store is damaged")
            yield emb, meta

    def emb_shards(self):
        """Embedding shards only (memory-mapped), in row order: for index building and exact search
        over stores too large to parse every meta row."""
        for _, f, _ in self._shards:
            yield self._load(f)

    @property
    def embeddings(self):
        """All rows as one float32 matrix (shards memory-mapped, then concatenated once)."""
        import numpy as np

        if self._emb is None:
            parts = [self._load(f) for _, f, _ in self._shards]
            self._emb = (np.concatenate(parts).astype(np.float32, copy=False) if parts
                         else np.zeros((0, self.dim), dtype=np.float32))
            self._check_rows(len(self._emb), "embedding")
        return self._emb

    def row_view(self, rows=None, check: str = "all") -> "RowView":
        """The embedding rows (all, or the store rows ``rows``) as a lazily read matrix: slicing it reads
        only those rows from the memory-mapped shards, as float32 (bounded memory for stores of any size).
        ``check="rows"`` checks for NaN/inf only the rows read (search's rerank reads a few rows of a store
        that may be far larger than memory) instead of every shard up front."""
        if check not in ("all", "rows"):
            raise ValueError(f"check={check!r}: expected 'all' or 'rows'")
        files = [f for _, f, _ in self._shards]
        view = RowView([self._load(f, check == "all", keep=check == "rows") for f in files], self.dim, rows,
                       files=files if check == "rows" else None)
        self._check_rows(view.total, "embedding")
        return view

    @property
    def meta(self) -> list[dict]:
        if self._meta is None:
            self._meta = [rec for stem, _, _ in self._shards
                          for rec in formats.read_meta_rows(self.path / formats.meta_name(stem))]
            self._check_rows(len(self._meta), "meta")
        return self._meta

    def _check_rows(self, n: int, what: str) -> None:
        if n != len(self):
            raise BadInput(f"{self.path}: {n} {what} rows but info.json counts {len(self)}; the store is damaged "
                           f"(rerun the embed command into a new directory)")

    def __len__(self) -> int:
        return int(self.info["count"])

    def errors(self) -> list[dict]:
        """Inputs that failed, in input order."""
        path = self.path / ERRORS
        return [rec for _, rec in formats.iter_jsonl(path)] if path.exists() else []


class RowView:
    """Rows of memory-mapped shards, read on slicing: ``view[a:b]`` -> (b-a, dim) float32 array."""

    def __init__(self, parts, dim: int, rows=None, files=None):
        import numpy as np

        self.parts, self.dim = parts, dim
        self.files = files  # given: check each row read for NaN/inf (names the shard)
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.total = int(self.starts[-1])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.total if self.rows is None else len(self.rows)

    def __getitem__(self, item):
        import numpy as np

        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("RowView supports contiguous slices only")
        start, stop, _ = item.indices(len(self))
        if self.rows is not None:
            return self.take(self.rows[start:stop])
        out = []
        for s in range(len(self.parts)):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo < hi:
                out.append(np.asarray(self.parts[s][lo - self.starts[s]:hi - self.starts[s]], dtype=np.float32))
                if self.files is not None:
                    check_finite(out[-1], self.files[s], lo - self.starts[s])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def take(self, rows):
        """Store rows (sorted or not) as float32."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.total):
            raise IndexError(f"store rows out of range 0..{self.total - 1}")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")  # sorted reads: each shard's rows in one pass, in page order
        ordered = rows[order]
        bounds = np.searchsorted(ordered, self.starts)
        for s, part in enumerate(self.parts):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                local = ordered[lo:hi] - self.starts[s]
                got = part[local]
                if self.files is not None:  # names the shard's own row, as a full check would
                    check_finite(got, self.files[s], rows=local)
                out[order[lo:hi]] = got
        return out


def open_store(path: str | Path, spec=None, kind: str | None = None) -> StoreReader:
    """Open a finished store; refuse it if ``spec`` (a ModelSpec) differs from the one that wrote it,
    or if ``kind`` ("image"/"text") differs."""
    reader = StoreReader(path)
    if kind is not None and reader.kind != kind:
        def a(word: str) -> str:
            return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"

        raise BadInput(f"{path}: is {a(reader.kind)} store, expected {a(kind)} store")
    reader.check_model(spec)
    return reader


def write_arrays(path: str | Path, embeddings, meta: Sequence[dict], *, kind: str, model: dict,
                 dtype: str = "float32", shard_size: int = 10000, extra_info: dict | None = None) -> StoreReader:
    """Write a whole store from arrays in one go (tests, small derived stores). Rows are L2-normalized."""
    import numpy as np

    emb = np.asarray(embeddings, dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    writer = StoreWriter(path, kind=kind, model=model, dim=emb.shape[1], dtype=dtype, shard_size=shard_size,
                         extra_info=extra_info)
    for shard, start in enumerate(range(0, len(emb), shard_size)):
        writer.write_shard(shard, emb[start:start + shard_size], meta[start:start + shard_size])
    writer.finalize()
    return open_store(path)


def store_summary(path: str | Path) -> dict:
    """What `vlmtools store info` shows: the store's settings and counts, read from info.json and the
    shard headers (cheap: no rows are read)."""
    report = check_store(path, deep=False)
    if report["info"] is None:
        raise BadInput(report["problems"][0])
    info = report["info"]
    p = Path(path)
    return {"store": str(p), "kind": info["kind"], "model": info["model"], "dim": info["dim"],
            "dtype": info["dtype"], "rows": report["rows"], "count": info.get("count"),
            "complete": info.get("count") is not None, "shards": report["shards"],
            "shard_size": info.get("shard_size"), "missing_shards": report["missing_shards"],
            "errors": report["errors"], "index": (p / "index.faiss").exists(),
            "bytes": sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
            "problems": report["problems"]}


def list_shards(path: str | Path) -> list[dict]:
    """One row per shard for `vlmtools store ls`: name, rows, dtype, bytes, meta lines, failed inputs."""
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{p}: {'is a file, not a store directory' if p.exists() else 'no such store directory'}")
    read_info(p)
    rows = []
    for stem, f in _shard_files(p):
        try:
            (n, dim), dtype, _ = shard_header(f)
            problem = None
        except StoreProblem as exc:
            n, dim, dtype, problem = None, None, None, str(exc)
        meta, errs = p / formats.meta_name(stem), p / errors_name(stem)
        rows.append({"shard": f.name, "rows": n, "dim": dim, "dtype": dtype, "bytes": f.stat().st_size,
                     "meta_rows": _count_lines(meta) if meta.exists() else None,
                     "errors": _count_lines(errs) if errs.exists() else 0, "problem": problem})
    return rows


def export_parquet(path: str | Path, out: str | Path) -> list[Path]:
    """Write the store's metadata as Parquet beside nothing else: OUT/meta-XXXXX.parquet, one per shard,
    row-aligned with emb-XXXXX.npy (embedding-reader's "parquet_npy" layout: sorted names, equal counts).
    Image stores get an ``image_path`` column, text stores a ``caption`` column (clip-retrieval's names).
    Values that are not scalars are written as JSON text."""
    import json

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInput("store export needs pyarrow: pip install 'vlmtools[parquet]'") from None
    reader = open_store(path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: is a file; -o names a directory for the Parquet files")
    if out.exists() and any(out.glob("meta-*.parquet")):
        raise BadInput(f"{out}: already holds Parquet metadata; use an empty directory")
    written = []
    alias = {"image": ("image_path", "path"), "text": ("caption", "text")}.get(reader.kind, ("image_path", "path"))
    for stem, _, _ in reader._shards:
        meta = [rec for _, rec in formats.iter_jsonl(reader.path / formats.meta_name(stem), strict=False)]
        columns: dict[str, list] = {}
        for rec in meta:
            for key in rec:
                columns.setdefault(key, [])
        if alias[1] in columns and alias[0] not in columns:
            columns[alias[0]] = []
        for rec in meta:
            for key, values in columns.items():
                value = rec.get(alias[1] if key == alias[0] and key not in rec else key)
                values.append(json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value)
        table = pa.table({k: pa.array(v) if _scalar_column(v) else pa.array([None if x is None else str(x) for x in v])
                          for k, v in columns.items()})
        target = out / f"meta-{stem}.parquet"
        with formats.atomic_path(target) as tmp:
            pq.write_table(table, tmp)
        written.append(target)
    return written


def _scalar_column(values: list) -> bool:
    kinds = {type(v) for v in values if v is not None}
    return len(kinds) <= 1 or kinds <= {int, float}


# ----------------------------------------------------------------------------- row selection

def parse_where(where: Sequence[str]) -> list[tuple[str, str]]:
    """``--where KEY=VALUE`` options as (key, value) pairs."""
    out = []
    for w in where:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise BadInput(f"--where {w!r}: expected KEY=VALUE (e.g. split=test)")
        out.append((key, value))
    return out


def select_rows(meta: list[dict], where: Sequence[tuple[str, str]]) -> list[int]:
    """Rows whose metadata has every KEY=VALUE (values compared as text)."""
    return [i for i, rec in enumerate(meta)
            if all(str(rec.get(k)) == v for k, v in where)]
