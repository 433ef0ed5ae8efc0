"""Webdataset tar shards as `embed images` input (the layout img2dataset writes: ``KEY.jpg`` + ``KEY.json``
(+ ``KEY.txt``) per sample, samples grouped by key, one tar per shard).

``expand_braces('shards/{00000..00009}.tar')`` gives the ten names (numeric ranges keep their zero padding;
``{a,b}`` lists too, as in bash). ``tar_inputs`` lists every tar's members once (headers only: tarfile
seeks over the data of an uncompressed tar) and returns one record per image with where its bytes lie, so
that DataLoader workers read images by offset, in any order, without unpacking anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from vlmtools.errors import BadInput

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{000..012}`` (zero padding kept), ``{a,b,c}``, nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [f"{v:0{width}d}" for v in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # "{x}" is literal in bash
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + item + t for item in items for t in expand_braces(tail)]


def is_tar_input(arg: str) -> bool:
    return arg != "-" and expand_braces(arg)[0].endswith(".tar")


@dataclass
class TarInput:
    """Records (meta rows) and byte locations of every image in a list of tars, and where each tar's
    rows start: store shard k holds the images of tar k (the unit of resume)."""

    records: list[dict] = field(default_factory=list)
    sources: list[tuple[str, int, int]] = field(default_factory=list)  # (tar path, data offset, size)
    bounds: list[int] = field(default_factory=lambda: [0])            # row where each tar starts; + end
    tars: list[str] = field(default_factory=list)


def _split_key(name: str) -> tuple[str, str]:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'); webdataset: the extension starts at the basename's first dot."""
    base = os.path.basename(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return name[:len(name) - len(base)] + stem, ext.lower()


def tar_inputs(pattern: str) -> TarInput:
    """Every image of the tars named by ``pattern`` (brace-expanded), with its ``.json`` sidecar merged into
    its record (and ``.txt`` as "caption" when the json has none). id = the sample key."""
    import tarfile

    tars = expand_braces(pattern)
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise BadInput(f"{missing[0]}: no such tar file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = TarInput(tars=[os.path.abspath(t) for t in tars])
    seen: set[str] = set()
    for tar_path in out.tars:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:  # uncompressed only: members must be seekable
                for member in tf:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_KEYS and "image" not in sample:
                        sample["image"] = (member.name, member.offset_data, member.size)
                    elif ext in ("json", "txt"):
                        fh = tf.extractfile(member)
                        sample[ext] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError) as exc:
            raise BadInput(f"{tar_path}: not a readable (uncompressed) tar: {exc}") from None
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            name, offset, size = sample["image"]
            rec: dict = {}
            if "json" in sample:
                try:
                    side = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise BadInput(f"{tar_path}:{key}.json: not valid JSON ({exc})") from None
                if isinstance(side, dict):
                    rec.update(side)
            if "txt" in sample and "caption" not in rec:
                rec["caption"] = sample["txt"].decode("utf-8", "replace").strip()
            sample_id = str(key)
            if sample_id in seen:
                raise BadInput(f"{tar_path}: duplicate sample key {sample_id!r} (keys must be unique across shards)")
            seen.add(sample_id)
            rec.update({"id": sample_id, "path": f"{tar_path}#{name}"})
            if rec.get("label") is None:
                rec.pop("label", None)
            else:
                rec["label"] = str(rec["label"])
            out.records.append(rec)
            out.sources.append((tar_path, offset, size))
        out.bounds.append(len(out.records))
    if not out.records:
        raise BadInput(f"{pattern}: no images ({'|'.join(IMAGE_KEYS)} members) in {len(tars)} tar file(s)")
    return out


def split_member_path(path) -> tuple[str, str] | None:
    """``'TAR#MEMBER'`` (the path `embed images` records for a tar member) -> (tar path, member name), or
    None for a plain path (also when a file of that exact name exists)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = os.fspath(path)
    cut = path.find(".tar#")
    if cut < 0 or os.path.exists(path):
        return None
    return path[:cut + 4], path[cut + 5:]


_MEMBERS: dict[tuple[str, int, int], dict[str, tuple[int, int]]] = {}


def member_source(tar_path: str, member: str) -> tuple[str, int, int]:
    """Where the bytes of ``member`` lie in ``tar_path``: (tar path, data offset, size) for read_source.
    A tar's headers are listed once per process (and again when the tar changes)."""
    import tarfile

    st = os.stat(tar_path)  # FileNotFoundError for a missing tar, as for a missing image
    key = (os.path.abspath(tar_path), st.st_size, st.st_mtime_ns)
    if key not in _MEMBERS:
        with tarfile.open(tar_path, "r:") as tf:
            _MEMBERS[key] = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
    try:
        offset, size = _MEMBERS[key][member]
    except KeyError:
        raise FileNotFoundError(f"{tar_path}: no member {member!r}") from None
    return tar_path, offset, size


def read_source(source) -> bytes:
    """The bytes of one input: a file path, or a (tar path, offset, size) member location."""
    if isinstance(source, str):
        with open(source, "rb") as fh:
            return fh.read()
    path, offset, size = source
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)
