"""Zero-shot CLIP and classification by description (CBD) on stored image embeddings.

clip: class vector = normalize(mean over templates of normalize(text(template(class)))), as open_clip's
      build_zero_shot_classifier; score = cosine(image, class vector).
cbd:  Menon & Vondrick (ICLR 2023): each descriptor d of class c is embedded as "{c}, which has {d}";
      class score = mean (or max, sum) over c's descriptors of cosine(image, descriptor). The per-descriptor
      similarities of a class are its explanation.

Everything is a matrix product on L2-normalized float32 rows. Text embeddings come from a text store
(`embed text`), else from an on-disk cache keyed by model and text hash, else from the model itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from vlmtools import formats
from vlmtools.console import info, progress, warn
from vlmtools.store import parse_where, select_rows  # noqa: F401  (re-exported for heads)
from vlmtools.errors import BadInput, StoreMismatch
from vlmtools.provenance import rows_note
from vlmtools.paths import cache_dir

METHODS = ("clip", "cbd")
AGGREGATES = ("mean", "max", "sum")
BACKGROUND = ("include", "exclude", "only")
CHUNK = 4096  # images scored at once: bounds the (images x descriptors) similarity matrix
DIGITS = 6    # scores are rounded in the output; cosine similarities need no more


# ----------------------------------------------------------------------------- text embedding cache

def _model_fingerprint(spec) -> dict:
    """The spec, plus size/mtime (or content hash) of any local file that defines its weights, so a
    replaced checkpoint under the same path never serves stale embeddings."""
    from vlmtools.models import PACKAGED_TAG, packaged_configs, packaged_weights

    fp = spec.as_dict()
    files: list[tuple[str, Path | None]] = []  # (name in the fingerprint, file)
    if spec.pretrained and os.path.sep in spec.pretrained:
        files.append((Path(spec.pretrained).name, Path(spec.pretrained)))
    if spec.pretrained == PACKAGED_TAG:
        files.append((f"{spec.name}.safetensors", packaged_weights(spec.name)))
    if spec.name.startswith("local-dir:"):
        # open_clip reads the config and the weights from the directory: any file in it may define the model
        model_dir = Path(spec.name[len("local-dir:"):]).expanduser().resolve()
        fp["dir"] = str(model_dir)
        if model_dir.is_dir():
            files += [(f.relative_to(model_dir).as_posix(), f) for f in sorted(model_dir.rglob("*")) if f.is_file()]
    config = packaged_configs().get(spec.name)
    if config is not None:
        fp["config_sha"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    for name, f in files:
        if f is not None and f.exists():
            st = f.stat()
            fp[f"file:{name}"] = [st.st_size, st.st_mtime_ns]
    return fp


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextCache:
    """Text embeddings of one model at one compute precision (fp32, fp16, bf16) on disk:
    <root>/<model>-<hash>/<batch>.npy + <batch>.json (its text keys). Each run that encodes new texts adds
    one batch; the .json is written last, after the .npy, so a batch without it is ignored. Both are
    written atomically, so concurrent runs never see half a file."""

    def __init__(self, spec, root: Path | None = None, compute: str = "fp32"):
        fp = {**_model_fingerprint(spec), "compute": compute}
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name)[:60]
        self.dir = (root or cache_dir("text")) / f"{slug}-{digest}"
        self.fingerprint = fp

    def lookup(self, texts: Sequence[str]) -> dict:
        """{text: embedding} for the texts found in the cache."""
        import numpy as np

        wanted = {text_key(t): t for t in texts}
        found: dict = {}
        if not self.dir.is_dir() or not wanted:
            return found
        dim = None
        for index in sorted(self.dir.glob("*.json")):
            try:
                entry = json.loads(index.read_text(encoding="utf-8"))
                keys = entry["keys"]
                emb = np.load(index.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
                problem = None
                if entry.get("model") != self.fingerprint:
                    problem = "it was written for another model"
                elif emb.ndim != 2 or emb.shape[0] != len(keys) or emb.dtype.kind != "f":
                    problem = f"its array does not match its {len(keys)} keys"
                elif (dim or emb.shape[1]) != emb.shape[1]:
                    problem = f"its rows have dim {emb.shape[1]}, others {dim}"
                elif not np.isfinite(emb).all():
                    problem = "it holds NaN/inf values"
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                problem = "it cannot be read"
            if problem:
                self._drop(index, problem)
                continue
            dim = emb.shape[1]
            for row, key in enumerate(keys):
                text = wanted.get(key)
                if text is not None and text not in found:
                    found[text] = np.array(emb[row], dtype=np.float32)
            if len(found) == len(wanted):
                break
        return found

    def _drop(self, index: Path, problem: str) -> None:
        """A bad entry is a cache miss (recomputed), removed when the cache is writable."""
        warn(f"text cache entry {index} ignored: {problem}; its texts are encoded again")
        for f in (index, index.with_suffix(".npy")):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass

    def add(self, texts: Sequence[str], embeddings) -> None:
        """Store a batch; a cache that cannot be written (read-only, disk full) is skipped with a warning."""
        import numpy as np

        keys = [text_key(t) for t in texts]
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with formats.atomic_path(self.dir / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.asarray(embeddings, dtype=np.float32))
            formats.write_json(self.dir / f"{name}.json", {"model": self.fingerprint, "keys": keys})
        except (OSError, BadInput) as exc:
            warn(f"cannot write the text cache in {self.dir} ({getattr(exc, 'strerror', None) or exc}); going on "
                 f"without it (--no-cache skips the cache)")


def text_store_lookup(reader, texts: Sequence[str]) -> dict:
    """{text: embedding} for the texts a text store holds (matched on its meta "text")."""
    row_of: dict[str, int] = {}
    for row, rec in enumerate(reader.meta):
        row_of.setdefault(rec.get("text"), row)
    emb = reader.embeddings
    return {t: emb[row_of[t]] for t in texts if t in row_of}


def compute_precision_for(precision: str, device: str) -> str:
    """What --precision means for --device (fp32, fp16 or bf16); only amp needs to resolve the device (and
    torch only where a GPU driver is present: models.resolve_device)."""
    from vlmtools.models import compute_precision, resolve_device

    return compute_precision(precision, resolve_device(device) if precision == "amp" else "cpu")


def embed_texts(texts: Sequence[str], spec, *, text_store=None, device: str = "auto",
                use_cache: bool = True, batch_size: int = 256, precision: str = "amp"):
    """Texts -> (len(texts), d) float32, L2-normalized: from the text store, the cache, then the model
    (at ``precision``, models.PRECISIONS)."""
    import numpy as np

    unique = list(dict.fromkeys(texts))
    found = text_store_lookup(text_store, unique) if text_store is not None else {}
    if text_store is not None and len(found) < len(unique):
        warn(f"{len(unique) - len(found)} of {len(unique)} texts are not in text store {text_store.path}; "
             f"encoding them with {spec}")
    missing = [t for t in unique if t not in found]
    # the cache's key needs the compute precision (amp resolves the device): only when a text is missing
    cache = TextCache(spec, compute=compute_precision_for(precision, device)) if use_cache and missing else None
    if missing and cache is not None:
        found.update(cache.lookup(missing))
        missing = [t for t in unique if t not in found]
    if missing:
        from vlmtools.models import load_model

        encoder = load_model(spec, device, precision)
        parts = []
        with progress("encoding texts", total=len(missing), unit="texts") as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start:start + batch_size]
                parts.append(encoder.encode_texts(batch, batch_size=batch_size))
                bar.advance(len(batch))
        new = np.concatenate(parts)
        if cache is not None:
            cache.add(missing, new)
        found.update(zip(missing, new))
    return np.stack([np.asarray(found[t], dtype=np.float32) for t in texts]) if texts else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- class prompts

def template_problem(template: str) -> str | None:
    """Why ``template`` cannot be filled with a class name by str.format, or None when it can: it must
    hold exactly one bare ``{}`` and no other field (write ``{{`` and ``}}`` for literal braces)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:  # a lone "{" or "}"
        return f"{exc} (write {{{{ or }}}} for a literal brace)"
    if fields != [("", "", None)]:
        shown = ", ".join("{" + n + (f"!{c}" if c else "") + (f":{s}" if s else "") + "}" for n, s, c in fields)
        return f"expected exactly one {{}} for the class name, found {shown or 'none'}"
    return None


def check_templates(templates: Sequence[str], source: str | None = None, option: str | None = None) -> None:
    """BadInput naming the first template that clip_texts cannot fill, and where it came from
    (``source``: the --templates value; a file is named with the template's line; ``option``: the option
    that gave the template itself, e.g. "--source")."""
    for t in templates:
        problem = template_problem(t)
        if problem is not None:
            where = f"{option}: " if option else f"{_template_where(source, t)}: " if source is not None else ""
            raise BadInput(f"{where}template {t!r}: {problem}")


def _template_where(source: str, template: str) -> str:
    """file:line of a template in a template file (as prompts.load_templates reads it), else --templates."""
    path = Path(source)
    if path.is_file():
        for lineno, line in enumerate(formats.read_text(path).splitlines(), 1):
            if line.strip().replace("{c}", "{}") == template:
                return f"{path}:{lineno}"
        return str(path)
    return f"--templates {source}"


def clip_texts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompt list: templates of class 0, then of class 1, ... (as open_clip builds them)."""
    from vlmtools.prompts import wordify

    check_templates(templates)
    return [t.format(wordify(c)) for c in classes for t in templates]


def normalize(x, axis: int = -1):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def clip_class_embeddings(text_emb, n_classes: int, n_templates: int):
    """(C*T, d) prompt embeddings -> (C, d): normalize, average over templates, normalize again."""
    import numpy as np

    emb = normalize(np.asarray(text_emb, dtype=np.float32)).reshape(n_classes, n_templates, -1)
    return normalize(emb.mean(axis=1)).astype(np.float32)


@dataclass
class DescriptorSet:
    """The descriptors of all classes as one flat list, grouped by class in class order: class c owns rows
    offsets[c]:offsets[c+1]. A class left with no descriptor is scored by its name (kind "name"), as
    prompts.empty_sentence writes it."""
    classes: list[str]
    descriptors: list[str]
    kinds: list[str]
    texts: list[str]
    offsets: list[int]
    fallback: list[str] = field(default_factory=list)  # classes scored by their name

    @property
    def counts(self):
        import numpy as np

        return np.diff(np.asarray(self.offsets))


def build_descriptor_set(classes: Sequence[str], records: dict, *, wrap: str = "cbd",
                         background: str = "include", empty: str = "menon") -> DescriptorSet:
    """``records``: {class: descriptor record} (formats.read_descriptors). Classes missing from it, with
    empty lists, or left empty by ``background``, fall back to their name: "{class}, which has " as
    Menon & Vondrick do (``empty`` menon), or the bare name (``empty`` name)."""
    from vlmtools.prompts import descriptor_sentence, empty_sentence

    if background not in BACKGROUND:
        raise BadInput(f"--background {background!r}: expected one of {', '.join(BACKGROUND)}")
    descriptors, kinds, texts, offsets, fallback = [], [], [], [0], []
    for cls in classes:
        rec = records.get(cls)
        pairs = list(zip(rec["descriptors"], formats.descriptor_kinds(rec))) if rec else []
        if background == "exclude":
            pairs = [(d, k) for d, k in pairs if k != "background"]
        elif background == "only":
            pairs = [(d, k) for d, k in pairs if k == "background"]
        if pairs:
            for d, k in pairs:
                descriptors.append(d)
                kinds.append(k)
                texts.append(descriptor_sentence(cls, d, wrap))
        else:
            fallback.append(cls)
            descriptors.append(cls)
            kinds.append("name")
            texts.append(empty_sentence(cls, wrap, empty))
        offsets.append(len(descriptors))
    return DescriptorSet(list(classes), descriptors, kinds, texts, offsets, fallback)


# ----------------------------------------------------------------------------- scoring

def cbd_scores(images, desc_emb, offsets: Sequence[int], aggregate: str = "mean"):
    """images (N, d), desc_emb (M, d), class c = columns offsets[c]:offsets[c+1] ->
    (class scores (N, C), descriptor similarities (N, M))."""
    import numpy as np

    sims = images @ desc_emb.T
    starts = np.asarray(offsets[:-1])
    if aggregate == "max":
        return np.maximum.reduceat(sims, starts, axis=1), sims
    totals = np.add.reduceat(sims, starts, axis=1)
    if aggregate == "sum":
        return totals, sims
    if aggregate == "mean":
        return totals / np.diff(np.asarray(offsets)).astype(np.float32), sims
    raise BadInput(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")


def top_k(scores, k: int):
    """(N, C) scores -> (indices, values), each (N, min(k, C)), best first."""
    import numpy as np

    k = max(1, min(k, scores.shape[1]))
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)


def rank_descriptors(sims, offsets: Sequence[int], class_idx):
    """For image i, the descriptors of class class_idx[i], best first, without a Python loop:
    (columns (N, L), similarities (N, L), lengths (N,)); entries past lengths[i] are padding."""
    import numpy as np

    offsets = np.asarray(offsets)
    counts = np.diff(offsets)
    class_idx = np.asarray(class_idx)
    width = int(counts.max())
    slot = np.arange(width)[None, :]
    lengths = counts[class_idx]
    valid = slot < lengths[:, None]
    cols = np.where(valid, offsets[class_idx][:, None] + slot, 0)
    vals = np.where(valid, np.take_along_axis(sims, cols, axis=1), -np.inf)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1), lengths


class Classifier:
    """A method and its class-side embeddings; scores stored image embeddings."""

    def __init__(self, classes: list[str], method: str, class_emb=None, dset: DescriptorSet | None = None,
                 desc_emb=None, aggregate: str = "mean"):
        self.classes, self.method = classes, method
        self.class_emb, self.dset, self.desc_emb, self.aggregate = class_emb, dset, desc_emb, aggregate

    def score(self, images):
        """(N, d) -> (class scores (N, C), descriptor similarities (N, M) or None)."""
        import numpy as np

        images = np.asarray(images, dtype=np.float32)
        if self.method == "clip":
            return images @ self.class_emb.T, None
        return cbd_scores(images, self.desc_emb, self.dset.offsets, self.aggregate)

    def _explanations(self, sims, class_idx) -> list[list[tuple[str, str, float]]]:
        import numpy as np

        cols, vals, lengths = rank_descriptors(sims, self.dset.offsets, class_idx)
        cols, vals, lengths = cols.tolist(), vals.astype(np.float64).round(DIGITS).tolist(), lengths.tolist()
        d, kinds = self.dset.descriptors, self.dset.kinds
        return [[(d[j], kinds[j], v) for j, v in zip(c[:n], s[:n])] for c, s, n in zip(cols, vals, lengths)]

    def predict(self, images, meta: Sequence[dict], *, k: int = 5, explain: bool = True,
                explain_true: bool = False, chunk: int = CHUNK) -> Iterator[tuple]:
        """(meta row, topk [(class, score)] best first, explanation, explanation_true) per image, in row
        order; an explanation is [(descriptor, kind, score)] best first, or None (formats.PredictionLines
        writes them as predictions lines)."""
        import numpy as np

        index = {c: i for i, c in enumerate(self.classes)}
        for start in range(0, len(meta), chunk):
            rows = meta[start:start + chunk]
            scores, sims = self.score(images[start:start + chunk])
            idx, vals = top_k(scores, k)
            idx, vals = idx.tolist(), vals.astype(np.float64).round(DIGITS).tolist()
            explained = explained_true = None
            if sims is not None and explain:
                explained = self._explanations(sims, [i[0] for i in idx])
            if sims is not None and explain_true:
                true_idx = np.array([index.get(r.get("label"), -1) for r in rows])
                has = np.flatnonzero(true_idx >= 0)
                explained_true = [None] * len(rows)
                if len(has):
                    for pos, e in zip(has.tolist(), self._explanations(sims[has], true_idx[has])):
                        explained_true[pos] = e
            names = self.classes
            for n, rec in enumerate(rows):
                yield (rec, [(names[i], v) for i, v in zip(idx[n], vals[n])],
                       explained[n] if explained is not None else None,
                       explained_true[n] if explained_true is not None else None)


def clip_classifier(classes: list[str], templates: list[str], spec, **text_opts) -> Classifier:
    emb = embed_texts(clip_texts(classes, templates), spec, **text_opts)
    return Classifier(classes, "clip", class_emb=clip_class_embeddings(emb, len(classes), len(templates)))


def cbd_classifier(dset: DescriptorSet, spec, aggregate: str = "mean", **text_opts) -> Classifier:
    if aggregate not in AGGREGATES:
        raise BadInput(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    emb = embed_texts(dset.texts, spec, **text_opts)
    return Classifier(dset.classes, "cbd", dset=dset, desc_emb=emb, aggregate=aggregate)


# ----------------------------------------------------------------------------- inputs

def descriptors_from_text_store(reader) -> tuple[dict, str | None]:
    """Rebuild {class: descriptor record} from a text store embedded from descriptor JSONL."""
    if reader.info.get("source") != "descriptors":
        raise BadInput(f"{reader.path}: this text store was not embedded from descriptor JSONL; "
                       f"pass --descriptors too")
    records: dict[str, dict] = {}
    for rec in reader.meta:
        r = records.setdefault(str(rec["class"]), {"class": str(rec["class"]), "descriptors": [], "kinds": []})
        r["descriptors"].append(rec["descriptor"])
        r["kinds"].append(rec.get("kind") or "object")
    return records, reader.info.get("wrap")


def _line_of_class(path, cls: str) -> str:
    """file:line of a class in a descriptor JSONL, for messages."""
    for lineno, rec in formats.iter_jsonl(path):
        if isinstance(rec, dict) and str(rec.get("class")) == cls:
            return f"{path}:{lineno}"
    return str(path)


def match_classes(classes: list[str], records: dict, *, classes_from: str, descriptors_from: str,
                  allow_missing: bool, descriptor_file=None) -> None:
    """Descriptor classes must all be in the class list; listed classes without descriptors are an error
    unless ``allow_missing`` (then they are scored by their name)."""
    known = set(classes)
    for cls in records:
        if cls not in known:
            where = _line_of_class(descriptor_file, cls) if descriptor_file is not None else descriptors_from
            raise BadInput(f"{where}: class {cls!r} is not in the class list {classes_from}")
    missing = [c for c in classes if c not in records]
    if missing and not allow_missing:
        raise BadInput(f"{classes_from}: class {missing[0]!r} has no descriptors in {descriptors_from}"
                       + (f" (nor do {len(missing) - 1} more)" if len(missing) > 1 else "")
                       + "; add them, or pass --allow-empty to score such classes by their name")


def check_labels(meta: Sequence[dict], classes: Sequence[str], store) -> None:
    """Labels outside the class list are always wrong: say so (and refuse when no label is a class,
    which is a naming mismatch, e.g. "Black_footed_Albatross" vs "Black-footed Albatross")."""
    from collections import Counter

    labels = Counter(str(r["label"]) for r in meta if r.get("label") is not None)
    if not labels:
        return
    known = set(classes)
    unknown = {lab: n for lab, n in labels.items() if lab not in known}
    if len(unknown) == len(labels):
        example = next(iter(unknown))
        raise BadInput(f"{store}: no image label is one of the classes (e.g. label {example!r}, "
                       f"class {classes[0]!r}); the class names must match the manifest labels exactly")
    if unknown:
        shown = ", ".join(f"{lab!r} ({n})" for lab, n in list(unknown.items())[:5])
        warn(f"{sum(unknown.values())} images have labels that are not classes and will count as wrong: "
             f"{shown}{' ...' if len(unknown) > 5 else ''}")


# ----------------------------------------------------------------------------- the command

def str_labels(meta: Sequence[dict]) -> list[dict]:
    """Labels are class names: stores written before manifests were normalized may hold 3 for "3", or
    a null label. Rows whose label is already a string (or absent) are kept as they are, not copied."""
    out = []
    for rec in meta:
        label = rec.get("label")
        if label is None and "label" in rec:
            rec = {k: v for k, v in rec.items() if k != "label"}
        elif label is not None and not isinstance(label, str):
            rec = {**rec, "label": str(label)}
        out.append(rec)
    return out


def _clip_setup(meta, image_store, classes, templates, spec, text_opts) -> tuple[Classifier, str]:
    from vlmtools.prompts import load_templates

    if classes is not None:
        class_list = formats.read_class_list(classes)
    else:
        class_list = list(dict.fromkeys(str(r["label"]) for r in meta if r.get("label") is not None))
        if not class_list:
            raise BadInput(f"{image_store}: no labels to take classes from; pass --classes FILE")
        info(f"classes: the {len(class_list)} distinct labels of {image_store}")
    check_labels(meta, class_list, image_store)
    template_list = load_templates(templates or "photo")
    check_templates(template_list, templates or "photo")
    return clip_classifier(class_list, template_list, spec, **text_opts), f"{len(template_list)} template(s)"


def _cbd_setup(meta, image_store, classes, descriptors, wrap, aggregate, background, allow_empty, spec,
               text_opts, empty: str = "menon") -> tuple[Classifier, str]:
    texts = text_opts["text_store"]
    if descriptors is not None:
        records = formats.read_descriptors(descriptors, allow_empty=allow_empty)
        descriptors_from = str(descriptors)
        # the texts to look up in a text store are those it was embedded with
        store_wrap = texts.info.get("wrap") if texts is not None else None
    elif texts is not None:
        records, store_wrap = descriptors_from_text_store(texts)
        descriptors_from = f"text store {texts.path}"
    else:
        raise BadInput("--method cbd needs --descriptors FILE (or a --text-store embedded from one)")
    if classes is not None:
        class_list = formats.read_class_list(classes)
        match_classes(class_list, records, classes_from=str(classes), descriptors_from=descriptors_from,
                      allow_missing=allow_empty,
                      descriptor_file=None if descriptors is None or str(descriptors) == "-" else descriptors)
    else:
        class_list = list(records)
    check_labels(meta, class_list, image_store)
    dset = build_descriptor_set(class_list, records, wrap=wrap or store_wrap or "cbd", background=background,
                                empty=empty)
    if dset.fallback:
        shown = ", ".join(repr(c) for c in dset.fallback[:5])
        how = "the bare name" if empty == "name" else 'Menon\'s "{class}, which has "; --empty name: the bare name'
        warn(f"{len(dset.fallback)} classes have no descriptors (after --background {background}) and are "
             f"scored by their name ({how}): {shown}{' ...' if len(dset.fallback) > 5 else ''}")
    clf = cbd_classifier(dset, spec, aggregate=aggregate, **text_opts)
    return clf, f"{len(dset.descriptors)} descriptors, {aggregate}"


def selected_images(images, where: Sequence[str], image_store) -> tuple[list[dict], list[int] | None]:
    """(meta rows, their row numbers or None for all) of an image store's images matching ``where``;
    BadInput when none do or the store is empty."""
    meta = str_labels(images.meta)
    rows = select_rows(meta, parse_where(where)) if where else None
    if rows is not None and not rows:
        raise BadInput(f"{image_store}: no image matches --where {' '.join(where)}")
    meta = [meta[i] for i in rows] if rows is not None else meta
    if not meta:
        raise BadInput(f"{image_store}: the store holds no images")
    return meta, rows


def store_spec(reader, model: str | None = None, pretrained: str | None = None):
    """The model of a store's embeddings: the one it records, unless the user names one, which must match
    (``--model NAME`` alone means the store's weights of NAME)."""
    from vlmtools.models import spec_for_store

    try:
        return spec_for_store(reader.info["model"], model, pretrained)
    except StoreMismatch as exc:
        raise StoreMismatch(f"{reader.path}: {exc}") from None


def classify_store(image_store, output="-", *, spec=None, model: str | None = None,
                   pretrained: str | None = None, method: str | None = None, classes=None,
                   templates: str | None = None, descriptors=None, wrap: str | None = None,
                   aggregate: str = "mean", background: str = "include", allow_empty: bool = False,
                   empty: str = "menon",
                   text_store=None, k: int = 5, explain: bool = True, explain_true: bool = False,
                   where: Sequence[str] = (), device: str = "auto", use_cache: bool = True,
                   precision: str = "amp") -> dict:
    """`vlmtools classify`: read the stores, build the classifier, write predictions. Every input is
    checked before anything is written. The model: ``spec`` if given, else the store's, where
    ``model``/``pretrained`` (the CLI options) may name it but must match it. Returns a summary."""
    import numpy as np

    from vlmtools.models import PRECISIONS
    from vlmtools.store import open_store

    t0 = time.perf_counter()
    if k < 1:
        raise BadInput("-k must be at least 1")
    images = open_store(image_store, spec, kind="image")
    spec = spec or store_spec(images, model, pretrained)
    texts = open_store(text_store, spec, kind="text") if text_store is not None else None
    if texts is not None and texts.dim != images.dim:
        raise BadInput(f"{text_store}: {texts.dim}-d embeddings, but image store {image_store} has {images.dim}-d")
    if method is None:
        method = "cbd" if descriptors is not None or (texts is not None and texts.info.get("source") == "descriptors") \
            else "clip"
    if method not in METHODS:
        raise BadInput(f"--method {method!r}: expected one of {', '.join(METHODS)}")

    meta, rows = selected_images(images, where, image_store)
    # read chunk by chunk from the memory-mapped shards (bounded memory); the shards' NaN/inf check runs
    # here, before any text is encoded, so that a damaged store fails before a model loads
    emb = images.row_view(rows)
    text_opts = dict(text_store=texts, device=device, use_cache=use_cache, precision=precision)
    if precision not in PRECISIONS:  # resolved (which may need torch for amp) only where texts are encoded
        raise BadInput(f"--precision {precision!r}: expected one of {'|'.join(PRECISIONS)}")

    if method == "clip":
        for opt, value in (("--descriptors", descriptors), ("--wrap", wrap)):
            if value is not None:
                raise BadInput(f"{opt} applies to --method cbd, not clip")
        clf, detail = _clip_setup(meta, image_store, classes, templates, spec, text_opts)
    else:
        if templates is not None:
            raise BadInput("--templates applies to --method clip; cbd embeds \"{class}, which has {descriptor}\"")
        clf, detail = _cbd_setup(meta, image_store, classes, descriptors, wrap, aggregate, background, allow_empty,
                                 spec, text_opts, empty)

    # what the scores rest on: the image store's precision, the text store's (texts missing from it, and
    # all texts without one, are encoded or cached at this run's)
    computed = {"image": images.info.get("compute"),
                "text": texts.info.get("compute") if texts is not None else compute_precision_for(precision, device)}
    t1 = time.perf_counter()
    correct = labelled = 0
    run = dict(zip(formats.RUN_KEYS, (method, str(spec), str(image_store))))
    lines = formats.PredictionLines(computed, run)
    with formats.open_output(output) as fh:
        for row, topk, explanation, explanation_true in clf.predict(emb, meta, k=k, explain=explain,
                                                                     explain_true=explain_true):
            if row.get("label") is not None:
                labelled += 1
                correct += topk[0][0] == row["label"]
            fh.write(lines.line(row, topk, explanation, explanation_true))
    summary = {"images": len(meta), "classes": len(clf.classes), "method": method, "model": spec.as_dict(),
               "precision": computed,
               "labelled": labelled, "top1": correct / labelled if labelled else None,
               "seconds": round(time.perf_counter() - t0, 3), "scoring_seconds": round(time.perf_counter() - t1, 3)}
    acc = f"; top-1 {100 * summary['top1']:.2f}% on {labelled} labelled" if labelled else ""
    info(f"classified {rows_note(meta, where)} with {method} ({len(clf.classes)} classes, {detail}) "
         f"in {summary['seconds']:.2f} s{acc}")
    return summary
