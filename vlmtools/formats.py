"""Every file contract of vlmtools, in one place. All readers and writers go through this module.

Documented for users in man/vlmtools-formats.5; keep the two in step.

- manifest      JSONL, one image per line: {"id", "path", "label"?, "split"?, "mask"?, "domain"?, ...}
                Bare image paths (one per line) are accepted wherever a manifest is read.
- descriptors   JSONL, one class per line: {"class", "descriptors": [str], "kinds"?: [str], ...}
                "kinds" (parallel to "descriptors") marks each one "object" or "background".
- store         directory of emb-*.npy + meta-*.jsonl shards, info.json ("format": STORE_FORMAT)
- index         index.faiss + index.json ("format": INDEX_FORMAT) inside a store
- predictions   JSONL, one image per line (see PREDICTION_KEYS)
- maps          directory written by `vlmtools explain visual`: info.json ("format": MAPS_FORMAT),
                maps.jsonl (one line per map), NAME.npy (float16 in [0, 1], image resolution), NAME.png
- synth world   directory written by `vlmtools synth make` (world.json "format": WORLD_FORMAT): images/,
                masks/, manifest.jsonl, attributes.jsonl, classes.txt, descriptors.jsonl, captions.jsonl,
                image_captions.jsonl
- head          NAME.safetensors (weights) + NAME.json ("format": HEAD_FORMAT): a trained head (see HEAD_KEYS)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from vlmtools.errors import BadInput
from vlmtools.redact import has_secrets, scrub_obj

STORE_FORMAT = "vlmtools.store/1"
INDEX_FORMAT = "vlmtools.index/1"
PREDICTIONS_FORMAT = "vlmtools.predictions/1"
DESCRIPTORS_FORMAT = "vlmtools.descriptors/1"
MANIFEST_FORMAT = "vlmtools.manifest/1"
WORLD_FORMAT = "vlmtools.synth/1"
MAPS_FORMAT = "vlmtools.maps/1"
EXPLAIN_EVAL_FORMAT = "vlmtools.explain-eval/1"
HEAD_FORMAT = "vlmtools.head/1"
EVAL_FORMAT = "vlmtools.eval/1"  # eval NDJSON rows (the first, "kind": "summary", carries it)
COMPARE_FORMAT = "vlmtools.compare/1"  # eval compare's summary row
SERVE_FORMAT = "vlmtools.serve/1"  # GET / of vlmtools serve

MANIFEST_KEYS = ("id", "path", "label", "split", "mask", "domain")
DESCRIPTOR_KINDS = ("object", "background")
# Which run wrote a predictions line (classify adds them to every line; eval reports them as provenance).
RUN_KEYS = ("method", "model", "store", "precision")
PREDICTION_KEYS = ("id", "path", "label", "pred", "topk", "explanation", "explanation_true", *RUN_KEYS)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# Store shard names: emb-{shard:05d}.npy. Shard k always holds input rows [k*shard_size, (k+1)*shard_size)
# (less those that failed), whichever worker wrote it, so several workers (RANK/WORLD_SIZE) can fill one
# store without coordination, and lexicographic order of names is row order (as autofaiss assumes).
EMB_PATTERN = "emb-*.npy"


def shard_stem(shard: int) -> str:
    return f"{shard:05d}"


def emb_name(stem: str) -> str:
    return f"emb-{stem}.npy"


def meta_name(stem: str) -> str:
    return f"meta-{stem}.jsonl"


def source_name(path: str | os.PathLike) -> str:
    """How messages name an input: its path, or <stdin> for ``-``."""
    return "<stdin>" if str(path) == "-" else str(path)


# ----------------------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a directory; expected a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"{path}: cannot be created (a parent is not a directory)") from None
    except PermissionError:
        raise BadInput(f"{path}: permission denied") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files, and some writers (safetensors) replace the temp file: set the usual
        # permissions on whatever is there now
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def open_output(path: str | os.PathLike | None, mode: str = "w") -> Iterator[IO]:
    """Open an output for text writing: ``-``/None is stdout; a file is written atomically."""
    if path is None or str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding="utf-8") as fh:
            yield fh


@contextlib.contextmanager
def open_input(path: str | os.PathLike) -> Iterator[IO]:
    """Open a text input; ``-`` is stdin. A missing file is BadInput (exit 2)."""
    if str(path) == "-":
        yield sys.stdin
        return
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file")
    if p.is_dir():
        raise BadInput(f"{p}: is a directory, expected a file")
    with open(p, encoding="utf-8") as fh:
        yield fh


# ----------------------------------------------------------------------------- the JSON writer
# Every JSON vlmtools writes (files, stdout, HTTP answers) is made here: strict JSON, so a non-finite
# number is written as null (NaN/Infinity are not JSON: other readers refuse the line), and with every
# secret a command registered (vlmtools.redact: an API key) replaced by [redacted], whatever field holds it.

def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps for everything vlmtools writes: no NaN/Infinity (written as null), no registered secret,
    non-ASCII kept. ``kwargs`` go to json.dumps (indent, sort_keys, separators)."""
    if has_secrets():
        obj = scrub_obj(obj)
    if not kwargs:
        try:
            return _ENCODER.encode(obj)  # the common case, kept fast: store meta rows, predictions
        except ValueError:  # a NaN or infinity somewhere in it
            return _ENCODER.encode(_finite(obj))
    kwargs.setdefault("ensure_ascii", False)
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = dumps(obj, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- strict JSON
# Every JSON input is parsed strictly: a duplicate key would silently keep the last value, and a deeply
# nested or endless line would end in a RecursionError or eat the memory.

MAX_DEPTH = 64              # nesting levels of [ and { in one JSON value
MAX_LINE = 64 * 1024 * 1024  # bytes in one JSONL line
MAX_JSON = 64 * 1024 * 1024  # bytes in one JSON file (a head, info.json, index.json, ...)
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET_RE = re.compile(r"[\[\]{}]")


class JsonProblem(ValueError):
    """Valid JSON syntax that vlmtools refuses (a duplicate key, too deep)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonProblem(f"duplicate key {key!r} in one JSON object")
            seen.add(key)
    return out


def _check_depth(text: str) -> None:
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # cannot be deeper
    depth = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise JsonProblem(f"JSON nested more than {MAX_DEPTH} levels deep")


def parse_json(text: str) -> Any:
    """json.loads, refusing duplicate keys and deep nesting (JsonProblem); syntax errors raise
    json.JSONDecodeError as usual."""
    _check_depth(text)
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise JsonProblem(f"JSON nested more than {MAX_DEPTH} levels deep") from None


def loads(text: str, where: str) -> Any:
    """Strict JSON (see parse_json); any problem is BadInput naming ``where`` (a file or file:line)."""
    try:
        return parse_json(text)
    except JsonProblem as exc:
        raise BadInput(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def read_capped(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a file, refusing one longer than ``limit`` (BadInput) before reading it all: a JSON
    file that is huge, or endless (/dev/zero, a FIFO someone keeps writing), must not eat the memory."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file")
    if p.is_dir():
        raise BadInput(f"{p}: is a directory, expected a {what}")
    with open(p, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BadInput(f"{p}: larger than {limit // (1024 * 1024)} MiB; not a {what} vlmtools wrote")
    return data


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        text = read_capped(p, MAX_JSON, "JSON file").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(f"{p}: not UTF-8 text") from None
    return loads(text, str(p))


_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps with options builds an encoder per call


def dumps_line(record: dict) -> str:
    return dumps(record) + "\n"


def write_jsonl(path: str | os.PathLike | None, records: Iterable[dict]) -> int:
    """Write records as JSONL (atomically for files, ``-`` for stdout); returns the count."""
    n = 0
    with open_output(path) as fh:
        for record in records:
            fh.write(dumps_line(record))
            n += 1
    return n


def _decoded_lines(fh: IO, name: str) -> Iterator[str]:
    """Lines of a text stream, decoded one line at a time (from its byte buffer where it has one) so that
    a file that is not UTF-8 is BadInput naming the right line, not a traceback."""
    raw = getattr(fh, "buffer", None)
    if raw is None:  # an in-memory text stream: already decoded
        yield from fh
        return
    for lineno, line in enumerate(iter(lambda: raw.readline(MAX_LINE + 1), b""), 1):
        if len(line) > MAX_LINE:
            raise BadInput(f"{name}:{lineno}: line longer than {MAX_LINE // (1024 * 1024)} MiB; is this a JSONL file?")
        try:
            yield line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{name}:{lineno}: not UTF-8 text") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole text input (``-`` for stdin) as a string; missing or non-UTF-8 files are BadInput."""
    name = source_name(path)
    with open_input(path) as fh:
        return "".join(_decoded_lines(fh, name))


def iter_jsonl(path: str | os.PathLike, *, allow_plain: bool = False, strip_plain: bool = True,
               strict: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, record) from a JSONL file or ``-``; blank lines are skipped. Lines are parsed
    strictly (see parse_json) and limited to MAX_LINE bytes.

    With ``allow_plain``, a line that does not start with ``{`` is yielded as a plain string (stripped of
    surrounding blanks unless ``strip_plain`` is false: then only the line ending is removed, as file
    names may end in a space). ``strict=False`` skips the duplicate-key and depth checks (about half the
    parsing time on short lines) for files vlmtools wrote itself, such as store metadata.
    """
    name = source_name(path)
    with open_input(path) as fh:
        for lineno, raw_line in enumerate(_decoded_lines(fh, name), 1):
            line = raw_line.strip()
            if not line:
                continue
            if allow_plain and not line.startswith("{"):
                yield lineno, line if strip_plain else raw_line.rstrip("\r\n")
                continue
            if strict:
                yield lineno, loads(line, f"{name}:{lineno}")
                continue
            try:
                yield lineno, json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                yield lineno, loads(line, f"{name}:{lineno}")  # for the message


def read_meta_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a store's meta JSONL (which vlmtools wrote itself): one json.loads over the whole file
    (4x faster than line by line on short rows); anything unusual (not UTF-8, a line too long or not an
    object, a count that differs from the lines) goes through iter_jsonl, whose errors name the line."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        lines = [line for line in data.decode("utf-8-sig").split("\n") if line.strip()]
        if len(data) <= MAX_LINE or all(len(line.encode("utf-8")) <= MAX_LINE for line in lines):
            rows = json.loads("[" + ",".join(lines) + "]")
            if len(rows) == len(lines) and all(type(r) is dict for r in rows):
                return rows
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    return [rec for _, rec in iter_jsonl(path, strict=False)]


# ----------------------------------------------------------------------------- manifests

def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def manifest_record(id: str, path: str, label: str | None = None, split: str | None = None,
                    **extra: Any) -> dict:
    """Build a manifest record with keys in canonical order, dropping None values."""
    record = {"id": id, "path": path, "label": label, "split": split, **extra}
    return {k: v for k, v in record.items() if v is not None}


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a manifest (JSONL) or bare image paths, one per line. Relative paths in a manifest file
    are resolved against the manifest's directory."""
    name = source_name(path)
    base = None if str(path) == "-" else Path(path).resolve().parent
    records = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path, allow_plain=True, strip_plain=False):
        if isinstance(rec, str):
            rec = {"id": rec, "path": rec}
        if not isinstance(rec, dict) or "path" not in rec:
            raise BadInput(f"{name}:{lineno}: a manifest line needs a \"path\" key")
        rec = dict(rec)
        for key in ("path", "mask"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise BadInput(f"{name}:{lineno}: \"{key}\" must be a string, not {_short(rec[key])}")
        for key in ("id", "label"):
            if isinstance(rec.get(key), (list, dict, bool)):
                raise BadInput(f"{name}:{lineno}: \"{key}\" must be a string or a number, not {_short(rec[key])}")
        if rec.get("id") is None:
            rec.pop("id", None)
        rec.setdefault("id", rec["path"])
        rec["id"] = str(rec["id"])
        if rec.get("label") is None:
            rec.pop("label", None)  # unlabelled image
        else:
            rec["label"] = str(rec["label"])  # labels are class names: 3 and "3" are the same class
        if base is not None:
            for key in ("path", "mask"):
                if rec.get(key) and not os.path.isabs(rec[key]):
                    rec[key] = str(base / rec[key])
        if rec["id"] in seen:
            raise BadInput(f"{name}:{lineno}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    return records


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names from a plain list (one per line), a manifest (distinct labels, first-seen order),
    or a descriptor JSONL (its classes, in order). Duplicates in a plain list are an error."""
    name = source_name(path)
    classes: list[str] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path, allow_plain=True):
        if isinstance(rec, str):
            if rec in seen:
                raise BadInput(f"{name}:{lineno}: duplicate class {rec!r}")
            cls = rec
        elif isinstance(rec, dict) and "class" in rec:
            cls = str(rec["class"])
            if cls in seen:
                raise BadInput(f"{name}:{lineno}: duplicate class {cls!r}")
        elif isinstance(rec, dict) and "label" in rec:
            if rec["label"] is None or str(rec["label"]) in seen:
                continue  # unlabelled image, or a class already listed
            cls = str(rec["label"])
        else:
            raise BadInput(f"{name}:{lineno}: expected a class name, a manifest line with \"label\" "
                           f"or a descriptor line with \"class\"")
        seen.add(cls)
        classes.append(cls)
    if not classes:
        raise BadInput(f"{name}: no classes found")
    return classes


# ----------------------------------------------------------------------------- descriptors

def descriptor_record(cls: str, descriptors: list[str], kinds: list[str] | None = None,
                      **extra: Any) -> dict:
    record: dict[str, Any] = {"class": cls, "descriptors": list(descriptors)}
    if kinds is not None:
        record["kinds"] = list(kinds)
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def validate_descriptor_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict) or "class" not in rec or "descriptors" not in rec:
        raise BadInput(f"{where}: a descriptor line needs \"class\" and \"descriptors\"")
    descs = rec["descriptors"]
    if not isinstance(descs, list) or not all(isinstance(d, str) for d in descs):
        raise BadInput(f"{where}: \"descriptors\" must be a list of strings")
    kinds = rec.get("kinds")
    if kinds is not None:
        if not isinstance(kinds, list) or len(kinds) != len(descs):
            raise BadInput(f"{where}: \"kinds\" must be a list as long as \"descriptors\"")
        bad = [k for k in kinds if k not in DESCRIPTOR_KINDS]
        if bad:
            raise BadInput(f"{where}: unknown descriptor kind {bad[0]!r} (expected one of {DESCRIPTOR_KINDS})")
    return rec


class DescriptorLines:
    """Checks descriptor lines one at a time, as they stream by: shape, duplicate classes and (unless
    ``allow_empty``) empty descriptor lists, each a BadInput naming file:line."""

    def __init__(self, name: str, allow_empty: bool = False):
        self.name, self.allow_empty = name, allow_empty
        self.seen: set[str] = set()

    def check(self, lineno: int, rec: Any) -> dict:
        where = f"{self.name}:{lineno}"
        rec = validate_descriptor_record(rec, where)
        cls = str(rec["class"])
        if cls in self.seen:
            raise BadInput(f"{where}: duplicate class {cls!r}")
        if not rec["descriptors"] and not self.allow_empty:
            raise BadInput(f"{where}: class {cls!r} has an empty descriptor list")
        self.seen.add(cls)
        return rec


def iter_descriptors(path: str | os.PathLike, *, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, checked descriptor record) from a descriptor JSONL file or ``-``."""
    lines = DescriptorLines(source_name(path), allow_empty)
    for lineno, rec in iter_jsonl(path):
        yield lineno, lines.check(lineno, rec)


def read_descriptors(path: str | os.PathLike, *, allow_empty: bool = False) -> dict[str, dict]:
    """Read descriptor JSONL into {class: record}, keeping file order (checked as iter_descriptors does)."""
    out = {str(rec["class"]): rec for _, rec in iter_descriptors(path, allow_empty=allow_empty)}
    if not out:
        raise BadInput(f"{source_name(path)}: no descriptor lines found")
    return out


def descriptor_kinds(rec: dict) -> list[str]:
    return list(rec.get("kinds") or ["object"] * len(rec["descriptors"]))


# ----------------------------------------------------------------------------- store info

def store_info(*, kind: str, model: dict, dim: int, dtype: str, shard_size: int, count: int,
               preprocess: str | None = None, extra: dict | None = None, content_sha256: str | None = None) -> dict:
    """info.json of a store. ``content_sha256`` (vlmtools.store.content_digest) is set when the store is
    finished: indexes record it, `store check` recomputes it."""
    from importlib.metadata import PackageNotFoundError, version

    import vlmtools

    try:
        open_clip_version = version("open_clip_torch")
    except PackageNotFoundError:
        open_clip_version = None
    info = {
        "format": STORE_FORMAT,
        "kind": kind,
        "model": model,
        "dim": dim,
        "dtype": dtype,
        "normalized": True,
        "count": count,
        "shard_size": shard_size,
        "preprocess": " ".join(preprocess.split()) if preprocess else None,
        "open_clip_version": open_clip_version,
        "vlmtools_version": vlmtools.__version__,
    }
    if extra:
        info.update(extra)
    if content_sha256 is not None:
        info["content_sha256"] = content_sha256
    return info


def check_format(info: dict, expected: str, where: str) -> None:
    fmt = info.get("format")
    if fmt != expected:
        major = str(fmt).rsplit("/", 1)[0] if fmt else None
        if major == expected.rsplit("/", 1)[0]:
            raise BadInput(f"{where}: format {fmt} is newer than this vlmtools reads ({expected}); upgrade vlmtools")
        raise BadInput(f"{where}: not a {expected.split('/')[0]} file (format={fmt!r})")


# ----------------------------------------------------------------------------- predictions
# One JSON object per image, written by `classify`, read by `eval` and `explain`:
#   every key of the image's manifest row (id, path, label?, split?, domain?, mask?, ...), then
#   "pred": the top-1 class,
#   "topk": [{"class", "score"}, ...] best first (topk[0].class == pred; fewer than k when there are
#           fewer classes),
#   "explanation": [{"descriptor", "kind", "score"}, ...] the predicted class's descriptors, best first
#           (method cbd only; kind "object" | "background" | "name" for a class scored by its name),
#   "explanation_true": the same for the true class (with --explain-true, when the label is a class).
# Scores are cosine similarities (class scores: their mean, max or sum over descriptors).

EXPLANATION_KINDS = DESCRIPTOR_KINDS + ("name",)


def prediction_record(meta: dict, pred: str, topk: list[tuple[str, float]],
                      explanation: list[dict] | None = None,
                      explanation_true: list[dict] | None = None, precision: dict | None = None) -> dict:
    """A predictions line: the manifest row's keys, then the prediction keys (which win on a clash).
    ``precision``: {"image", "text"}, the encoder precision each side's embeddings were computed at."""
    record = {k: v for k, v in meta.items() if k not in PREDICTION_KEYS or k in ("id", "path", "label")}
    record["pred"] = pred
    record["topk"] = [{"class": c, "score": s} for c, s in topk]
    if explanation is not None:
        record["explanation"] = explanation
    if explanation_true is not None:
        record["explanation_true"] = explanation_true
    if precision is not None:
        record["precision"] = precision
    return record


class PredictionLines:
    """Predictions lines for one classify run, each byte for byte ``dumps_line`` of
    ``prediction_record(...)`` followed by the run's keys ``run`` (RUN_KEYS but precision), about twice as
    fast on CUB's 5,794 rows: each class's and descriptor's entry is encoded once, and no record is built.
    Explanations are (descriptor, kind, score) triples. Where the fast form might differ (a registered
    secret, a value JSON cannot hold as such), the record is built and encoded as usual."""

    def __init__(self, precision: dict | None, run: dict):
        self._precision, self._run = precision, run
        tail = _ENCODER.encode({"precision": precision, **run} if precision is not None else run)
        self._tail = ((", " + tail[1:]) if len(tail) > 2 else "}") + "\n"
        self._text: dict[str, str] = {}
        self._heads: dict = {}  # a topk entry (by class), an explanation entry (by descriptor, kind): up to the score
        self._replaced = frozenset(PREDICTION_KEYS[3:])  # manifest keys the prediction drops or replaces

    def _str(self, value: str) -> str:
        text = self._text.get(value)
        if text is None:
            text = self._text[value] = _ENCODER.encode(value)
        return text

    def _entries(self, keyed, make_head) -> str | None:
        """The JSON list of (key, score) entries; each key's text up to its score is ``make_head(key)``, made once.
        None where a score is not a finite float (an int, a numpy scalar, NaN or inf)."""
        heads, parts = self._heads, []
        for key, score in keyed:
            if type(score) is not float or score - score != 0:
                return None
            head = heads.get(key)
            if head is None:
                head = heads[key] = make_head(key)
            parts.append("%s%r}" % (head, score))
        return "[" + ", ".join(parts) + "]"

    def _topk_head(self, name: str) -> str:
        return f'{{"class": {self._str(name)}, "score": '

    def _explanation_head(self, key: tuple) -> str:
        return f'{{"descriptor": {self._str(key[0])}, "kind": {self._str(key[1])}, "score": '

    def line(self, meta: dict, topk: list[tuple[str, float]], explanation: list[tuple] | None = None,
             explanation_true: list[tuple] | None = None) -> str:
        fast = None if has_secrets() else self._fast(meta, topk, explanation, explanation_true)
        if fast is not None:
            return fast
        as_dicts = (lambda triples: None if triples is None else
                    [{"descriptor": d, "kind": k, "score": v} for d, k, v in triples])
        record = prediction_record(meta, topk[0][0], topk, as_dicts(explanation), as_dicts(explanation_true),
                                   self._precision)
        record.update(self._run)
        return dumps_line(record)

    def _fast(self, meta, topk, explanation, explanation_true) -> str | None:
        if not self._replaced.isdisjoint(meta):
            return None
        try:
            head = _ENCODER.encode(meta)
        except (ValueError, TypeError):
            return None
        topk_text = self._entries(topk, self._topk_head)
        if topk_text is None:
            return None
        parts = [head[:-1], ", " if len(head) > 2 else "", '"pred": ', self._str(topk[0][0]), ', "topk": ',
                 topk_text]
        for key, triples in (("explanation", explanation), ("explanation_true", explanation_true)):
            if triples is not None:
                text = self._entries((((d, k), v) for d, k, v in triples), self._explanation_head)
                if text is None:
                    return None
                parts.append(f', "{key}": {text}')
        parts.append(self._tail)
        return "".join(parts)


def _check_scored_list(value: Any, key: str, name_key: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise BadInput(f"{where}: \"{key}\" must be a non-empty list")
    for item in value:
        if (not isinstance(item, dict) or not isinstance(item.get(name_key), str)
                or not isinstance(item.get("score"), (int, float)) or isinstance(item.get("score"), bool)):
            raise BadInput(f"{where}: each \"{key}\" entry needs a string \"{name_key}\" and a numeric \"score\"")
        if not math.isfinite(item["score"]):
            raise BadInput(f"{where}: \"{key}\" holds a score of {item['score']} (NaN/inf: a damaged store or run?)")


def validate_prediction(rec: Any, where: str, *, require_label: bool = False) -> dict:
    """Check one predictions line; BadInput naming ``where`` (file:line) otherwise."""
    if not isinstance(rec, dict):
        raise BadInput(f"{where}: a predictions line must be a JSON object")
    for key in ("id", "pred", "topk"):
        if key not in rec:
            raise BadInput(f"{where}: a predictions line needs \"{key}\" (is this a `vlmtools classify` output?)")
    if not isinstance(rec["pred"], str):
        raise BadInput(f"{where}: \"pred\" must be a class name")
    _check_scored_list(rec["topk"], "topk", "class", where)
    if rec["topk"][0]["class"] != rec["pred"]:
        raise BadInput(f"{where}: \"pred\" is {rec['pred']!r} but topk starts with {rec['topk'][0]['class']!r}")
    for key in ("explanation", "explanation_true"):
        if key in rec:
            _check_scored_list(rec[key], key, "descriptor", where)
    if require_label and rec.get("label") is None:
        raise BadInput(f"{where}: image {rec['id']!r} has no \"label\"; evaluation needs the true class "
                       f"of every image (classify a store whose manifest has labels)")
    return rec


def read_predictions(path: str | os.PathLike, *, require_label: bool = False) -> list[dict]:
    """Read and validate a predictions file (or ``-``); duplicate ids are BadInput naming the line."""
    name = source_name(path)
    records: list[dict] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path):
        where = f"{name}:{lineno}"
        rec = validate_prediction(rec, where, require_label=require_label)
        rec["id"] = str(rec["id"])
        if rec["id"] in seen:
            raise BadInput(f"{where}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    if not records:
        raise BadInput(f"{name}: no predictions found")
    return records


def write_predictions(path: str | os.PathLike | None, records: Iterable[dict]) -> int:
    """Write predictions JSONL (atomically to a file, or ``-`` for stdout); returns the count."""
    return write_jsonl(path, records)


# ----------------------------------------------------------------------------- saliency maps
# A maps directory (`vlmtools explain visual -o DIR`): info.json = maps_info(...); maps.jsonl, one line
# per map: {"id", "path", "label"?, "class", "score" (cosine; ala: the head's logit), "prob", "method", "map": "NAME.npy",
# "png"?: "NAME.png", and for per-descriptor maps "descriptor", "kind", "descriptor_score"};
# errors.jsonl lists the images that could not be read.

def maps_info(*, method: str, model: dict, classes: list[str], templates: list[str], settings: dict,
              head: str | None = None, descriptors: str | None = None, cbd: str | None = None,
              lattice: list[int] | None = None) -> dict:
    import vlmtools

    info = {"format": MAPS_FORMAT, "method": method, "model": model, "classes": list(classes),
            "templates": list(templates), "settings": settings, "vlmtools_version": vlmtools.__version__}
    if head is not None:
        info["head"] = head
    if descriptors is not None:
        info["descriptors"] = descriptors
    if cbd is not None:
        info["cbd"] = cbd
    if lattice is not None:  # the cell grid [h, w] the maps are drawn at before upsampling
        info["lattice"] = [int(v) for v in lattice]
    return info


# ----------------------------------------------------------------------------- output locks
# An output that a run appends to over time (describe's JSONL, a store filled without ranks) carries a
# lock file beside it, PATH.lock, holding {"pid", "host", "started"}. A second run exits 2 naming the
# holder; a lock whose process is gone (same host) is stale and taken over with a warning.

def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name.rstrip("/") + ".lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def _lock_holder(lock: Path) -> dict | None:
    """The lock's record, or None when it is stale (its process is gone, or the file is torn)."""
    import socket

    try:
        rec = json.loads(lock.read_text(encoding="utf-8"))
        pid = int(rec["pid"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rec.get("host") == socket.gethostname() and not pid_alive(pid):
        return None
    return rec


_held_locks: set[Path] = set()  # locks this process holds: taking one again (a nested block) is a no-op


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold PATH.lock while the block runs; BadInput if a live process holds it. Re-entrant within a
    process (train takes its head's lock for the whole run, save_head again for the write)."""
    import socket
    import time

    from vlmtools.console import warn

    lock = lock_path(path)
    key = lock.absolute()
    if key in _held_locks:
        yield lock
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"{path}: cannot be created (a parent is not a directory)") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = _lock_holder(lock)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if holder is not None:
                raise BadInput(f"{path}: another vlmtools run is writing it (pid {holder.get('pid')} on "
                               f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish, "
                               f"or remove {lock} if that process is gone") from None
            warn(f"{lock}: removing a stale lock left by a run that ended without cleaning up")
            lock.unlink(missing_ok=True)
            continue
        except PermissionError:
            raise BadInput(f"{lock}: permission denied (cannot lock the output)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        break
    else:
        raise BadInput(f"{path}: could not take the lock {lock}; try again")
    _held_locks.add(key)
    try:
        yield lock
    finally:
        _held_locks.discard(key)
        try:
            if json.loads(lock.read_text(encoding="utf-8")).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (weights files, index files)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def failpoint(name: str) -> None:
    """Fault injection for the test suite: when $VLMTOOLS_FAILPOINT is ``name`` the process kills itself
    (SIGKILL, like `kill -9`) right here; ``name=stop`` stops it (SIGSTOP) instead. No-op otherwise."""
    wanted = os.environ.get("VLMTOOLS_FAILPOINT")
    if wanted and wanted.split("=")[0] == name:
        import signal

        os.kill(os.getpid(), signal.SIGSTOP if wanted.endswith("=stop") else signal.SIGKILL)


# ----------------------------------------------------------------------------- heads
# A trained head is two files side by side: NAME.safetensors (the weights, nothing else) and NAME.json,
# written last (its presence marks the head complete), holding:
#   "format": HEAD_FORMAT, "kind": the registry name that rebuilds it (vlmtools.heads.HEADS),
#   "config": the constructor arguments of that kind, "tensors": {name: shape} of the safetensors file,
#   "classes": class names in output order (null for heads that do not classify, e.g. t2i),
#   "input_dim", "model": the model spec {"name", "pretrained"} of the stores it was trained on,
#   "training": every training option (the loop's and the command's), "seed",
#   "inputs": {role: {"path", "sha", "rows"}} (sha256 of the rows used: ids, labels and embeddings),
#   "curve": [{"epoch", "loss", "val"?...}] one entry per epoch, "best_epoch",
#   "metrics": {"train": {...}, "val": {...}} final metrics of the kept (best) weights,
#   "vlmtools_version", "weights_sha256": sha256 of NAME.safetensors (checked on load; absent in heads
#   written before it was recorded).

HEAD_KEYS = ("format", "kind", "config", "tensors", "classes", "input_dim", "model", "training", "seed",
             "inputs", "curve", "best_epoch", "metrics", "vlmtools_version")
HEAD_SUFFIXES = (".json", ".safetensors")


def head_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(NAME.json, NAME.safetensors) of a head given as NAME, NAME.json or NAME.safetensors."""
    p = Path(path)
    if p.suffix in HEAD_SUFFIXES:
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def head_info(*, kind: str, config: dict, tensors: dict, classes: list[str] | None, input_dim: int,
              model: dict, training: dict, seed: int, inputs: dict, curve: list[dict], best_epoch: int | None,
              metrics: dict, extra: dict | None = None) -> dict:
    import vlmtools

    info = {"format": HEAD_FORMAT, "kind": kind, "config": config, "tensors": tensors,
            "classes": None if classes is None else list(classes), "input_dim": int(input_dim), "model": model,
            "training": training, "seed": seed, "inputs": inputs, "curve": curve, "best_epoch": best_epoch,
            "metrics": metrics, "vlmtools_version": vlmtools.__version__}
    if extra:
        info.update(extra)
    return info


def validate_head_info(info: Any, where: str) -> dict:
    """Check a head JSON's shape (not its weights: vlmtools.heads.load_head compares those)."""
    if not isinstance(info, dict):
        raise BadInput(f"{where}: a head file must hold a JSON object")
    check_format(info, HEAD_FORMAT, where)
    for key in ("kind", "config", "tensors", "input_dim", "model"):
        if key not in info:
            raise BadInput(f"{where}: a head file needs \"{key}\"")
    if not isinstance(info["config"], dict) or not isinstance(info["tensors"], dict):
        raise BadInput(f"{where}: \"config\" and \"tensors\" must be objects")
    classes = info.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise BadInput(f"{where}: \"classes\" must be a non-empty list of class names")
        if len(set(classes)) != len(classes):
            dup = next(c for c in classes if classes.count(c) > 1)
            raise BadInput(f"{where}: duplicate class {dup!r} in \"classes\"")
    model = info["model"]
    if not isinstance(model, dict) or "name" not in model:
        raise BadInput(f"{where}: \"model\" must be an object with \"name\" and \"pretrained\"")
    if not isinstance(info["input_dim"], int) or info["input_dim"] < 1:
        raise BadInput(f"{where}: \"input_dim\" must be a positive integer")
    return info
