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


def check_layout(dtype: str, shard_size: int) -> None:
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise BadInput("--shard-size must be at least 1")


class StoreWriter:
    """Writes one worker's shards into a store directory, and info.json (count null until complete)."""

    def __init__(self, path: str | Path, *, kind: str, model: dict, dim: int, dtype: str = "float16",
                 shard_size: int = 10000, preprocess: str | None = None, extra_info: dict | None = None):
        check_layout(dtype, shard_size)
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
        info = formats.read_json(info_path)
        formats.check_format(info, formats.STORE_FORMAT, str(info_path))
        checks = [("kind", self.kind), ("model", self.model), ("dim", self.dim), ("dtype", self.dtype),
                  ("shard_size", self.shard_size)] + list(self.extra_info.items())
        for key, mine in checks:
            if info.get(key) != mine:
                this_run = {**info, key: mine, "input_count": self.extra_info.get("input_count")}
                raise StoreMismatch(f"{self.path} already holds a store {_describe(key, info)}; this run has "
                                    f"{_describe(key, this_run)}. Use another output directory or delete it")
        return info

    def _write_info(self, count: int | None) -> None:
        info = formats.store_info(kind=self.kind, model=self.model, dim=self.dim, dtype=self.dtype,
                                  shard_size=self.shard_size, count=count, preprocess=self.preprocess,
                                  extra=self.extra_info)
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
        with formats.atomic_path(self.path / formats.emb_name(stem)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, emb)

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
        self._write_info(count=count)
        return formats.read_json(self.path / INFO)


def _describe(key: str, info: dict) -> str:
    """A store setting in words, for mismatch messages."""
    value = info.get(key)
    if key == "model" and isinstance(value, dict):
        return f"model {value.get('name')} (pretrained={value.get('pretrained')})"
    if key == "input_sha":
        return f"input of {info.get('input_count')} rows with digest {value}"
    return f"{key}={value!r}"


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
    import numpy as np

    return [(stem, int(np.load(f, mmap_mode="r").shape[0])) for stem, f in _shard_files(path)]


class StoreReader:
    """A store on disk as one (N, dim) matrix and N metadata rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BadInput(f"{self.path}: {'is a file, not a store directory' if self.path.exists() else 'no such store directory'}")
        info_path = self.path / INFO
        if not info_path.exists():
            raise BadInput(f"{self.path}: not a vlmtools store (no {INFO})")
        self.info = formats.read_json(info_path)
        formats.check_format(self.info, formats.STORE_FORMAT, str(info_path))
        if self.info.get("count") is None:
            raise BadInput(f"{self.path}: the store is incomplete (an embed run did not finish); rerun it to resume")
        self._emb = None
        self._meta = None

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

    def shards(self):
        """(embeddings memmap, meta rows) per shard, in row order."""
        import numpy as np

        for stem, f in _shard_files(self.path):
            emb = np.load(f, mmap_mode="r")
            meta = [rec for _, rec in formats.iter_jsonl(self.path / formats.meta_name(stem))]
            if len(meta) != emb.shape[0]:
                raise BadInput(f"{f}: {emb.shape[0]} rows but {len(meta)} meta rows; the store is damaged")
            yield emb, meta

    def emb_shards(self):
        """Embedding shards only (memory-mapped), in row order: for index building and exact search
        over stores too large to parse every meta row."""
        import numpy as np

        for _, f in _shard_files(self.path):
            yield np.load(f, mmap_mode="r")

    @property
    def embeddings(self):
        """All rows as one float32 matrix (shards memory-mapped, then concatenated once)."""
        import numpy as np

        if self._emb is None:
            parts = [np.load(f, mmap_mode="r") for _, f in _shard_files(self.path)]
            self._emb = (np.concatenate(parts).astype(np.float32, copy=False) if parts
                         else np.zeros((0, self.dim), dtype=np.float32))
            self._check_rows(len(self._emb), "embedding")
        return self._emb

    def row_view(self, rows=None) -> "RowView":
        """The embedding rows (all, or the store rows ``rows``) as a lazily read matrix: slicing it reads
        only those rows from the memory-mapped shards, as float32 (bounded memory for stores of any size)."""
        import numpy as np

        view = RowView([np.load(f, mmap_mode="r") for _, f in _shard_files(self.path)], self.dim, rows)
        self._check_rows(view.total, "embedding")
        return view

    @property
    def meta(self) -> list[dict]:
        if self._meta is None:
            self._meta = [rec for stem, _ in _shard_files(self.path)
                          for _, rec in formats.iter_jsonl(self.path / formats.meta_name(stem))]
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

    def __init__(self, parts, dim: int, rows=None):
        import numpy as np

        self.parts, self.dim = parts, dim
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
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def take(self, rows):
        """Store rows (sorted or not) as float32."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.parts[s][rows[sel] - self.starts[s]]
        return out


def open_store(path: str | Path, spec=None, kind: str | None = None) -> StoreReader:
    """Open a finished store; refuse it if ``spec`` (a ModelSpec) differs from the one that wrote it,
    or if ``kind`` ("image"/"text") differs."""
    reader = StoreReader(path)
    if kind is not None and reader.kind != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise BadInput(f"{path}: is a {reader.kind} store, expected {article} {kind} store")
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
