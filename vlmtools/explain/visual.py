"""`explain visual` and `eval explanations`: saliency maps for images, written as a maps directory, and
their evaluation against the manifest's object masks (mIoU, beside the lattice's ceiling), by RISE's causal
metrics (insertion, deletion, ID score; each map scored by the model it explains) and, for per-descriptor
maps, against the region each descriptor names (grounding).

A maps directory (formats.MAPS_FORMAT) holds info.json (model, method, classes, templates, method
settings), maps.jsonl (one line per map) and per map NAME.npy (float16 in [0, 1] at the image's
resolution) and NAME.png (the image with the map overlaid; class and score in the title).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vlmtools import formats
from vlmtools.console import progress, warn
from vlmtools.errors import BadInput
from vlmtools.explain.saliency import METHODS

MAPS_INFO = "info.json"
MAPS_INDEX = "maps.jsonl"
MAPS_ERRORS = "errors.jsonl"


def _safe_stem(text: str, used: set[str]) -> str:
    """A file stem for ``text`` (an image id) not in ``used``: unsafe characters replaced, -2, -3 ... added."""
    from vlmtools.explain.textual import _safe_name

    name = _safe_name(text)
    stem, n = name, 1
    while stem in used:
        n += 1
        stem = f"{name}-{n}"
    used.add(stem)
    return stem


# ----------------------------------------------------------------------------- inputs

def read_inputs(path: str) -> tuple[list[dict], bool]:
    """Image records from a predictions file (records with "pred") or a manifest; (records, is_predictions)."""
    if str(path) == "-":
        raise BadInput("explain visual reads a file (it needs the images' paths); - is not supported")
    first = next((rec for _, rec in formats.iter_jsonl(path, allow_plain=True)), None)
    if first is None:
        raise BadInput(f"{path}: no images listed")
    if isinstance(first, dict) and "pred" in first:
        return formats.read_predictions(path), True
    return formats.read_manifest(path), False


def class_list(records: Sequence[dict], classes: str | None, descriptors: dict | None,
               chosen: str | None) -> list[str]:
    """--classes, else the descriptor file's classes, else the labels and predictions of the input."""
    if classes is not None:
        out = formats.read_class_list(classes)
    elif descriptors is not None:
        out = list(descriptors)
    else:
        out = list(dict.fromkeys([c for r in records for c in (r.get("label"), r.get("pred")) if c is not None]))
    if chosen is not None and chosen not in out:
        out.append(chosen)
    if len(out) < 1:
        raise BadInput("no classes: the input has no labels or predictions; pass --classes")
    return out


# ----------------------------------------------------------------------------- model side

@dataclass
class Judge:
    """A CLIP model as the saliency methods see it: image tensors, class text embeddings, scores."""
    encoder: object
    tower: object
    classes: list[str]
    class_emb: object                       # torch (C, d)
    logit_scale: float
    mean: object = None
    std: object = None
    size: int = 224
    templates: list[str] = field(default_factory=list)
    rise_cache: dict = field(default_factory=dict)

    def tensor(self, image):
        """A PIL image -> (1, 3, S, S), resized without cropping so the map lines up with the image."""
        from vlmtools.images import square_tensor

        return square_tensor(image, self.size, self.mean, self.std).to(self.encoder.device)

    def cosine_fn(self, target):
        return lambda x: self.tower.embed(x) @ target

    def probs(self, x):
        """The classifier's class probabilities (B, K): softmax of logit scale × cosine to the classes."""
        import torch

        return torch.softmax(self.logit_scale * self.tower.embed(x) @ self.class_emb.T, dim=-1)

    def prob_fn(self, c: int):
        return lambda x: self.probs(x)[:, c]

    def text_embeddings(self, texts: Sequence[str]):
        import torch

        return torch.from_numpy(self.encoder.encode_texts(list(texts))).to(self.encoder.device)


def make_judge(spec, classes: list[str], templates: list[str], device: str = "auto",
               cam_layer: int | None = None, cbd: dict | None = None) -> Judge:
    """The model, its tower and the class embeddings: class-name prompts (``templates``), or with ``cbd``
    ({class: descriptor record}) the mean of the class's descriptor sentence embeddings, whose dot
    product with an image is the CBD class score (mean similarity to the descriptors)."""
    import numpy as np
    import torch

    from vlmtools.classify import build_descriptor_set, clip_class_embeddings, clip_texts
    from vlmtools.explain.saliency import ClipTower
    from vlmtools.images import normalize_params
    from vlmtools.models import load_model

    encoder = load_model(spec, device)
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    tower = ClipTower(encoder.model, cam_layer)
    if cbd is not None:
        dset = build_descriptor_set(classes, cbd)
        desc = encoder.encode_texts(dset.texts)
        emb = np.stack([desc[a:b].mean(axis=0) for a, b in zip(dset.offsets[:-1], dset.offsets[1:])])
    else:
        emb = clip_class_embeddings(encoder.encode_texts(clip_texts(classes, templates)), len(classes), len(templates))
    mean, std = normalize_params(encoder.preprocess)
    scale = float(encoder.model.logit_scale.exp()) if hasattr(encoder.model, "logit_scale") else 100.0
    return Judge(encoder, tower, list(classes), torch.from_numpy(emb.astype(np.float32)).to(encoder.device), scale,
                 mean.to(encoder.device), std.to(encoder.device), encoder.image_size, list(templates))


# ----------------------------------------------------------------------------- explain visual

@dataclass
class VisualOptions:
    method: str = "gradcam"
    masks: int = 4000
    cell: int = 7
    p: float = 0.5
    seed: int = 0
    batch: int = 64
    layer: int | None = None   # gradcam: block (ViT) or stage (ResNet) to hook; default the last


def _check_options(opts: VisualOptions, descriptors: str | None, head: str | None) -> None:
    from vlmtools.explain.saliency import check_rise

    if opts.method not in METHODS:
        raise BadInput(f"--method {opts.method!r}: expected one of {', '.join(METHODS)}")
    if opts.method == "rise":
        check_rise(opts.masks, opts.cell, opts.p, opts.batch)
    if descriptors is not None and opts.method not in ("gradcam", "rise"):
        raise BadInput(f"--descriptors needs --method gradcam or rise (a map per descriptor sentence); "
                       f"{opts.method} maps do not depend on a text")
    if opts.method == "ala" and head is None:
        raise BadInput("--method ala needs --head HEAD (from `vlmtools train ala`)")
    if head is not None and opts.method != "ala":
        raise BadInput("--head is for --method ala")
    if opts.layer is not None and opts.method != "gradcam":
        raise BadInput("--layer is for --method gradcam")


def _check_out_dir(out: Path, force: bool) -> None:
    """-o must be new or an empty directory; with ``force``, an earlier maps directory (nothing else)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: is a file; -o takes a directory for the maps")
    if out.exists() and any(out.iterdir()):
        if not (out / MAPS_INFO).is_file():
            raise BadInput(f"{out}: exists, is not empty and is not a maps directory; pass a new directory")
        if not force:
            raise BadInput(f"{out}: exists and holds maps; pass --force to replace them, or name a new directory")


def _maps_dir_files(out: Path) -> list[Path]:
    """The files an earlier `explain visual` wrote into ``out``: info.json, maps.jsonl, errors.jsonl and
    the maps and overlays maps.jsonl lists (only names inside ``out``)."""
    own = [out / MAPS_INFO, out / MAPS_INDEX, out / MAPS_ERRORS]
    if (out / MAPS_INDEX).is_file():
        for _, rec in formats.iter_jsonl(out / MAPS_INDEX):
            for key in ("map", "png"):
                name = rec.get(key) if isinstance(rec, dict) else None
                if isinstance(name, str) and name and Path(name).name == name:
                    own.append(out / name)
    return own


def _install_maps(tmp: Path, out: Path) -> None:
    """Move the finished maps from ``tmp`` to ``out``: a rename when ``out`` is absent or empty once an
    earlier maps directory's own files are removed; else file by file, info.json and maps.jsonl last."""
    import os
    import shutil

    if out.exists():
        for f in _maps_dir_files(out):
            if f.is_file() or f.is_symlink():
                f.unlink()
        if not any(out.iterdir()):
            out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    last = {MAPS_INDEX, MAPS_INFO}
    for f in sorted(tmp.iterdir(), key=lambda f: (f.name in last, f.name == MAPS_INFO)):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _head_settings(info: dict) -> dict:
    """An ALA head's training seed and what else made it (config, training options but the seed, device
    and paths): heads that differ only in the seed make maps that eval explanations groups as seeds."""
    skip = {"seed", "device", "cache", "manifest"}
    training = {k: v for k, v in (info.get("training") or {}).items() if k not in skip}
    return {"seed": info.get("seed"), "head_config": info.get("config"), "head_training": training,
            "head_classes": info.get("classes")}


def _truth(rec: dict) -> str:
    """The overlay title's last line: the image's true label beside the explained class."""
    return f"\ntrue label: {rec['label']}" if rec.get("label") is not None else ""


def _warn_off_label(same: list[bool], cls: str | None, is_pred: bool, cbd: str | None,
                    head: bool = False) -> None:
    """Most maps explaining a class other than the image's label are seldom what the user meant: say so,
    and how to explain something meaningful."""
    off = same.count(False)
    if not same or off * 2 <= len(same):
        return
    if cls is not None:
        why = f"--class {cls} is not their label"
    elif is_pred:
        why = "the predictions are mostly wrong"
    elif head:
        why = "a manifest is explained for the ALA head's own top class, and the head mostly picks a wrong one"
    else:
        why = ("a manifest is explained for the model's own top class" + (" by description (--cbd)" if cbd else
               " by name, and a model that does not know the class names mostly picks a wrong one"))
    hint = "" if is_pred or head else ("; explain a classify output (its \"pred\")" + ("" if cbd else
                                                                                     " or score classes with --cbd FILE"))
    warn(f"the explained class differs from the true label for {off} of {len(same)} images ({why}); every "
         f"overlay's title names both{hint}")


def overlay_png(path: Path, image, saliency, title: str) -> None:
    from matplotlib.figure import Figure

    w, h = image.size
    fig = Figure(figsize=(3.2, 3.2 * h / w + 0.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image)
    ax.imshow(saliency, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8, parse_math=False)
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight",
                    metadata={"Software": "vlmtools", "Title": title.replace("\n", " / "), "Description": "map"})


def save_map(out: Path, stem: str, image, saliency, title: str, png: bool = True) -> dict:
    import numpy as np

    with formats.atomic_path(out / f"{stem}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, saliency.astype(np.float16))
    names = {"map": f"{stem}.npy"}
    if png:
        overlay_png(out / f"{stem}.png", image, saliency, title)
        names["png"] = f"{stem}.png"
    return names


def to_image_size(saliency, image):
    """A model-resolution map (S, S) -> the image's (H, W), in [0, 1]."""
    import torch

    from vlmtools.explain.saliency import unit_range, upsample

    w, h = image.size
    return unit_range(upsample(torch.from_numpy(saliency), (h, w)).numpy())


def compute_maps(judge: Judge, x, c: int, opts: VisualOptions, targets=None, head=None) -> list:
    """The maps (S, S) for one image: one for the class, or one per target text embedding."""
    from vlmtools.explain import saliency as sal

    m = opts.method
    if m == "rollout":
        return sal.rollout(judge.tower.attentions(x), size=tuple(x.shape[-2:]))
    if m == "ala":
        return [head.attention_map(x)]
    fns = [judge.cosine_fn(t) for t in targets] if targets is not None else None
    if m == "gradcam":
        fns = fns or [judge.cosine_fn(judge.class_emb[c])]
        return [sal.gradcam(x, fn, judge.tower.cam_layer, judge.tower.to_grid)[0] for fn in fns]
    # rise: the class probability, or each descriptor sentence's similarity; the same masks for all
    fns = fns or [judge.prob_fn(c)]
    key = (opts.masks, opts.cell, opts.p, opts.seed, tuple(x.shape[-2:]))
    if judge.rise_cache.get("key") != key:  # the same seeded masks for every image: draw them once
        judge.rise_cache.update(key=key, masks=sal.rise_masks(opts.masks, opts.cell, opts.p, key[-1], opts.seed,
                                                              x.device))
    masks = judge.rise_cache["masks"]
    return [sal.rise(x, fn, opts.masks, opts.cell, opts.p, opts.seed, opts.batch, mask_tensor=masks) for fn in fns]


def _head_prediction(head, x, wanted: str | None):
    """(class index, class, logits, probabilities) of an ALA head on x: its prediction, or ``wanted``."""
    import torch

    logits = head.logits(x)[0]
    probs = torch.softmax(logits, dim=-1)
    names = head.classes
    if wanted is not None and wanted not in names:
        raise BadInput(f"class {wanted!r} is not one of the ALA head's classes ({', '.join(names[:5])}"
                       f"{', ...' if len(names) > 5 else ''})")
    c = names.index(wanted) if wanted is not None else int(probs.argmax())
    return c, names[c], logits, probs


def explain_visual(input_path: str, out_dir, *, opts: VisualOptions, model: str | None = None,
                   pretrained: str | None = None, classes: str | None = None, templates: str = "photo",
                   cls: str | None = None, descriptors: str | None = None, head: str | None = None,
                   cbd: str | None = None, where: Sequence[str] = (), limit: int | None = None, png: bool = True,
                   device: str = "auto", force: bool = False) -> dict:
    """Write maps for the images of a predictions file or manifest into ``out_dir`` (new or empty; with
    ``force`` an earlier maps directory, whose own files are replaced); returns a summary {"maps",
    "images", "failed"}. Unreadable images are listed in errors.jsonl and skipped."""
    from vlmtools.classify import parse_where
    from vlmtools.images import load_rgb
    from vlmtools.models import ModelSpec
    from vlmtools.prompts import descriptor_sentence, load_templates

    _check_options(opts, descriptors, head)
    if limit is not None and limit < 0:
        raise BadInput("--limit must be >= 0")
    conditions = parse_where(where)
    records, is_pred = read_inputs(input_path)
    records = [r for r in records if all(str(r.get(k)) == v for k, v in conditions)]
    if limit:
        records = records[:limit]
    if not records:
        raise BadInput(f"{input_path}: no images to explain" + (" (after --where)" if conditions else ""))
    desc_records = formats.read_descriptors(descriptors) if descriptors is not None else None
    cbd_records = formats.read_descriptors(cbd) if cbd is not None else None
    for recs, path in ((desc_records, descriptors), (cbd_records, cbd)):
        if cls is not None and recs is not None and not (recs.get(cls) or {}).get("descriptors"):
            raise BadInput(f"--class {cls!r} has no descriptors in {path}"
                           + ("" if cls in recs else f" (its classes: {', '.join(list(recs)[:5])}, ...)"))
    names = class_list(records, classes, desc_records or cbd_records, cls)
    template_list = load_templates(templates)
    final = Path(out_dir)
    _check_out_dir(final, force)

    import shutil
    import tempfile

    final.parent.mkdir(parents=True, exist_ok=True)
    # written beside -o and renamed into place at the end: an interrupted run leaves nothing half-written
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        out.chmod(0o777 & ~formats._UMASK)  # mkdtemp makes it 0700
        head_obj = None
        if head is not None:
            from vlmtools.heads.ala import load_ala_for_explain

            head_obj, spec = load_ala_for_explain(head, model, pretrained, device)
        else:
            spec = ModelSpec.parse(model, pretrained)
        if is_pred:
            _warn_other_model(records, spec, input_path)
        judge = make_judge(spec, names, template_list, device, cam_layer=opts.layer, cbd=cbd_records)
        if head_obj is not None:
            head_obj.attach(judge.encoder)
        index = {c: i for i, c in enumerate(names)}

        import torch

        rows, errors, used, explained_vs_label = [], [], set(), []
        with progress(f"{opts.method} maps", total=len(records), unit="images") as bar:
            for rec in records:
                try:
                    image = load_rgb(rec["path"])
                except Exception as exc:  # PIL raises many kinds for missing, truncated or unknown files
                    errors.append({"id": rec["id"], "path": rec["path"], "error": f"{type(exc).__name__}: {exc}"})
                    warn(f"{rec['path']}: cannot read the image ({type(exc).__name__}); skipped")
                    bar.advance(1)
                    continue
                x = judge.tensor(image)
                with torch.no_grad():
                    cos = (judge.tower.embed(x) @ judge.class_emb.T)[0]
                    probs = torch.softmax(judge.logit_scale * cos, dim=-1)
                if head_obj is not None:  # an ALA map: the head's own prediction, logit and probability
                    c, target, cos, probs = _head_prediction(head_obj, x, cls or (rec["pred"] if is_pred else None))
                else:
                    target = cls or (rec["pred"] if is_pred else names[int(probs.argmax())])
                    c = index[target]
                if rec.get("label") is not None:
                    explained_vs_label.append(str(rec["label"]) == target)
                base = {k: rec[k] for k in ("id", "path", "label") if rec.get(k) is not None}
                base.update({"class": target, "score": round(float(cos[c]), 6), "prob": round(float(probs[c]), 6),
                             "method": opts.method})
                if desc_records is not None:
                    drec = desc_records.get(target)
                    if drec is None or not drec["descriptors"]:
                        warn(f"{rec['id']}: class {target!r} has no descriptors in {descriptors}; skipped")
                        bar.advance(1)
                        continue
                    sentences = [descriptor_sentence(target, d) for d in drec["descriptors"]]
                    emb = judge.text_embeddings(sentences)
                    maps = compute_maps(judge, x, c, opts, targets=list(emb))
                    with torch.no_grad():
                        dsims = (judge.tower.embed(x) @ emb.T)[0]
                    kinds = formats.descriptor_kinds(drec)
                    for j, (d, m) in enumerate(zip(drec["descriptors"], maps)):
                        stem = _safe_stem(f"{rec['id']}.d{j:02d}", used)
                        full = to_image_size(m, image)
                        files = save_map(out, stem, image, full, f"{target}: {d} ({float(dsims[j]):.3f})"
                                         + _truth(rec), png)
                        rows.append({**base, "descriptor": d, "kind": kinds[j], "descriptor_score":
                                     round(float(dsims[j]), 6), **files})
                else:
                    (m,) = compute_maps(judge, x, c, opts, head=head_obj)
                    stem = _safe_stem(rec["id"], used)
                    full = to_image_size(m, image)
                    what = "logit" if head_obj is not None else "cos"
                    title = (f"{rec['id']} · {opts.method}\nexplains {target} ({what} {float(cos[c]):.3f}, "
                             f"p {float(probs[c]):.2f})" + _truth(rec))
                    rows.append({**base, **save_map(out, stem, image, full, title, png)})
                bar.advance(1)
        if not rows:  # nothing to show: exit 2 and leave no maps directory behind
            first = errors[0]["error"] if errors else "no class of theirs has descriptors"
            raise BadInput(f"{input_path}: no map made for any of {len(records)} image(s) (first: {first})")
        _warn_off_label(explained_vs_label, cls, is_pred, cbd, head=head_obj is not None)
        settings = {"masks": opts.masks, "cell": opts.cell, "p": opts.p, "seed": opts.seed} \
            if opts.method == "rise" else ({"layer": opts.layer} if opts.layer is not None else {})
        if head_obj is not None:
            settings = _head_settings(head_obj.info)
        lattice = head_obj.lattice if head_obj is not None else judge.tower.lattice(judge.size, opts.method)
        formats.write_json(out / MAPS_INFO, formats.maps_info(
            method=opts.method, model=spec.as_dict(), classes=names, templates=template_list,
            settings=settings, head=str(Path(head).resolve()) if head else None,
            descriptors=str(Path(descriptors).resolve()) if descriptors else None,
            cbd=str(Path(cbd).resolve()) if cbd else None, lattice=lattice))
        formats.write_jsonl(out / MAPS_INDEX, rows)
        if errors:
            formats.write_jsonl(out / MAPS_ERRORS, errors)
        _install_maps(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {"maps": len(rows), "images": len(records), "failed": len(errors), "out": str(final)}


def _warn_other_model(records: Sequence[dict], spec, input_path) -> None:
    """The predictions' model (classify records it) is the one whose decisions are explained: say so when
    the maps are made with another."""
    made_with = {str(r["model"]) for r in records if r.get("model")}
    if made_with and made_with != {str(spec)}:
        warn(f"{input_path}: the predictions were made with {', '.join(sorted(made_with))}; the maps are made "
             f"with {spec}, which may not predict the same classes (pass the predictions' model)")


# ----------------------------------------------------------------------------- eval explanations

def read_maps_dir(path) -> tuple[dict, list[dict]]:
    """(info.json, maps.jsonl rows) of a maps directory, checked as far as its index goes: each row an
    object with an "id" and a "map" file name that stays inside the directory (no "..", no absolute
    path, no symlink out of it) and exists; no (id, descriptor) listed twice. BadInput naming the line."""
    d = Path(path)
    if not d.is_dir():
        raise BadInput(f"{d}: not a directory (expected the -o directory of `vlmtools explain visual`)")
    meta = formats.read_json(d / MAPS_INFO) if (d / MAPS_INFO).exists() else None
    if meta is None:
        raise BadInput(f"{d}: no {MAPS_INFO}; not a maps directory from `vlmtools explain visual`")
    formats.check_format(meta, formats.MAPS_FORMAT, str(d / MAPS_INFO))
    rows, seen = [], {}
    root = d.resolve()
    for lineno, rec in formats.iter_jsonl(d / MAPS_INDEX):
        where = f"{d / MAPS_INDEX}:{lineno}"
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), (str, int)) or isinstance(rec.get("id"), bool) \
                or not isinstance(rec.get("map"), str) or not rec["map"]:
            raise BadInput(f"{where}: a maps line needs an \"id\" and a \"map\" file name")
        target = (d / rec["map"]).resolve()
        if Path(rec["map"]).is_absolute() or ".." in Path(rec["map"]).parts or not target.is_relative_to(root):
            raise BadInput(f"{where}: map {rec['map']!r} is outside {d}; a maps line names a file in its directory")
        if not target.is_file():
            raise BadInput(f"{where}: map file {d / rec['map']} is missing")
        key = (str(rec["id"]), rec.get("descriptor"))
        if key in seen:
            raise BadInput(f"{where}: image {key[0]!r} is listed again (first at line {seen[key]})"
                           + (f" for descriptor {key[1]!r}" if key[1] is not None else "")
                           + "; each map is scored once")
        seen[key] = lineno
        rows.append(rec)
    return meta, rows


def load_map(d, row: dict):
    """A map of a checked maps directory (read_maps_dir) as float32: a 2-D array of finite values, else
    BadInput naming the file (NaN or inf would make every metric of it meaningless)."""
    import numpy as np

    f = Path(d) / row["map"]
    try:
        sal = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{f}: not a readable map ({' '.join(str(exc).split())[:120]})") from None
    if sal.ndim != 2 or sal.dtype.kind != "f" or 0 in sal.shape:
        raise BadInput(f"{f}: a map is a non-empty 2-D float array, not {sal.dtype} of shape {sal.shape}")
    finite = np.isfinite(sal)
    if not finite.all():
        raise BadInput(f"{f}: {int((~finite).sum())} of {sal.size} values are NaN or inf; not a map to score")
    return sal.astype(np.float32)


def _load_mask(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as m:
        return np.asarray(m.convert("L")) > 127


@dataclass
class EvalOptions:
    """How `eval explanations` scores maps. The defaults are the study's protocol: the ALA authors' mIoU
    rule, RISE's causal metric (its kernel and its share of pixels per step), each map scored by the model
    it explains."""
    threshold: str = "0.5"          # metrics.binarize: 8-bit grey > 127, or mean+std, or another T
    step: int | None = None         # pixels per insertion/deletion step (None: ceil(H·W/224), RISE's)
    steps: int | None = None        # coarser: about this many steps (not the study's protocol)
    blur: str = "11,5"              # insertion canvas: gkern KLEN,SIGMA (RISE's 11,5), or 0: no blur
    scorer: str = "own"             # own: each map's model; clip: the CLIP classifier of its info.json
    causal: bool = True
    descriptors: bool = False       # grounding: per-descriptor maps against the region they name
    batch: int = 64

    def check(self) -> "EvalOptions":
        from vlmtools.explain.metrics import parse_threshold

        try:
            self.threshold = parse_threshold(self.threshold)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if self.step is not None and self.steps is not None:
            raise BadInput("--step and --steps: give one (--step N pixels per step is the study's protocol)")
        if self.step is not None and self.step < 1:
            raise BadInput("--step must be at least 1 pixel")
        if self.steps is not None and self.steps < 1:
            raise BadInput("--steps must be at least 1")
        if self.scorer not in SCORERS:
            raise BadInput(f"--scorer {self.scorer!r}: expected one of {', '.join(SCORERS)}")
        if self.batch < 1:
            raise BadInput("--batch-size must be at least 1")
        self.kernel()  # checks --blur
        return self

    def kernel(self):
        """The insertion canvas's kernel: gkern(KLEN, SIGMA), or the 1 × 1 identity for no blur (--blur 0)."""
        import numpy as np

        from vlmtools.explain.metrics import gkern

        text = str(self.blur).replace(" ", "")
        if text in ("0", "0.0", "none"):
            return np.ones((1, 1), dtype=np.float32)
        try:
            klen, sigma = text.split(",")
            klen, sigma = int(klen), float(sigma)
        except ValueError:
            raise BadInput(f"--blur {self.blur!r}: expected KLEN,SIGMA of RISE's gkern (default 11,5), or 0 "
                           f"for no blur") from None
        if klen < 1 or klen % 2 == 0 or not sigma > 0:
            raise BadInput(f"--blur {self.blur!r}: KLEN must be odd and >= 1, SIGMA > 0")
        return gkern(klen, sigma)

    def pixel_step(self, n_pixels: int) -> int:
        import math

        from vlmtools.explain.metrics import default_step

        if self.step is not None:
            return self.step
        if self.steps is not None:
            return max(1, math.ceil(n_pixels / self.steps))
        return default_step(n_pixels)

    def describe_steps(self) -> str:
        if self.step is not None:
            return f"{self.step} px per step"
        if self.steps is not None:
            return f"{self.steps} steps (not the study's protocol)"
        return "ceil(H·W/224) px per step"


SCORERS = ("own", "clip")


class ClipScorer:
    """Insertion/deletion scored by a CLIP classifier (class-name prompts, or CBD with --cbd)."""

    def __init__(self, judge: Judge, meta: dict):
        self.judge, self.classes = judge, judge.classes
        how = f"cbd {Path(meta['cbd']).name}" if meta.get("cbd") else "names"
        model = meta["model"]
        tag = model.get("pretrained")
        self.name = f"clip {model['name']}{':' + tag if tag and tag not in ('none', 'vlmtools') else ''} {how}"

    def tensor(self, image):
        return self.judge.tensor(image)

    def probs(self, x):
        return self.judge.probs(x)


class AlaScorer:
    """Insertion/deletion scored by an ALA head: its perception branch's softmax, on its own tower."""

    def __init__(self, head_path: str, device: str):
        from vlmtools.heads.ala import load_ala_for_explain
        from vlmtools.images import normalize_params
        from vlmtools.models import load_model

        if not Path(head_path).with_suffix(".json").exists() and not Path(str(head_path) + ".json").exists():
            raise BadInput(f"{head_path}: the ALA head of these maps is gone; its maps are scored by it (pass "
                           f"--scorer clip to score them with the CLIP classifier instead)")
        self.head, spec = load_ala_for_explain(head_path, None, None, device)
        self.encoder = load_model(spec, device)
        for p in self.encoder.model.parameters():
            p.requires_grad_(False)
        self.head.attach(self.encoder)
        self.mean, self.std = (t.to(self.encoder.device) for t in normalize_params(self.encoder.preprocess))
        self.classes = self.head.classes
        self.name = f"ala {Path(head_path).name}"

    def tensor(self, image):
        from vlmtools.images import square_tensor

        return square_tensor(image, self.encoder.image_size, self.mean, self.std).to(self.encoder.device)

    def probs(self, x):
        return self.head.probs(x)


def _scorer_key(meta: dict, scorer: str) -> tuple:
    if meta["method"] == "ala" and scorer == "own":
        return ("ala", meta.get("head"))
    return ("clip",) + _scorer(meta)


def _make_scorer(meta: dict, scorer: str, device: str):
    from vlmtools.models import ModelSpec

    if _scorer_key(meta, scorer)[0] == "ala":
        if not meta.get("head"):
            raise BadInput("ala maps without a \"head\" in info.json: pass --scorer clip")
        return AlaScorer(meta["head"], device)
    spec = ModelSpec(meta["model"]["name"], meta["model"].get("pretrained"))
    cbd = formats.read_descriptors(meta["cbd"]) if meta.get("cbd") else None
    return ClipScorer(make_judge(spec, meta["classes"], meta["templates"], device, cbd=cbd), meta)


def _causal_scores(scorer, image, sal, opts: EvalOptions, kernel) -> dict:
    """RISE's insertion and deletion AUCs of one map, scored by ``scorer`` for its own prediction on the
    full image (RISE's class: the top class of the model's output on the unchanged input)."""
    import torch

    from vlmtools.explain.metrics import auc, causal_curve
    from vlmtools.explain.saliency import upsample

    x = scorer.tensor(image)
    with torch.no_grad():
        c = int(scorer.probs(x)[0].argmax())
    s = upsample(torch.from_numpy(sal), tuple(x.shape[-2:])).numpy()
    step = opts.pixel_step(x.shape[-2] * x.shape[-1])

    def fn(t):
        return scorer.probs(t)[:, c]

    ins = auc(causal_curve(x, s, fn, "insertion", step, opts.batch, kernel=kernel)[1])
    dele = auc(causal_curve(x, s, fn, "deletion", step, opts.batch)[1])
    return {"insertion": round(ins, 6), "deletion": round(dele, 6), "id_score": round(ins - dele, 6),
            "scorer": scorer.name, "scored_class": scorer.classes[c], "step": step}


def _grounding(sal, mask, kind: str, threshold: str) -> dict:
    """A per-descriptor map against the region its descriptor names (object: the mask; background: the
    rest): hit = the map's peak (first maximum in raster order) lies in the region; energy = the share of
    the map's mass inside it; chance = the region's share of the image (a random peak's hit rate)."""
    import numpy as np

    from vlmtools.explain.metrics import iou

    region = mask if kind == "object" else ~mask
    total = float(sal.sum())
    peak = int(np.argmax(sal))
    return {"kind": kind, "hit": bool(total > 0 and region.reshape(-1)[peak]),
            "energy": round(float(sal[region].sum()) / total, 6) if total > 0 else 0.0,
            "chance": round(float(region.mean()), 6), "iou": round(iou(sal, region, threshold), 6)}


def _check_maps(loaded, by_id: dict, manifest: str, descriptors: bool, causal: bool) -> list:
    """(directory, info, map row, manifest record) of every map to evaluate; BadInput before any work."""
    todo = []
    for d, meta, rows in loaded:
        chosen = [r for r in rows if ("descriptor" in r) == descriptors]
        if not chosen:
            raise BadInput(f"{d}: no per-descriptor maps (make them with explain visual --descriptors)"
                           if descriptors else
                           f"{d}: no class maps to evaluate (per-descriptor maps: pass --descriptors)")
        for r in chosen:
            rec = by_id.get(str(r["id"]))
            if rec is None:
                raise BadInput(f"{d}: image {r['id']!r} is not in {manifest}")
            if not rec.get("mask"):
                n = sum(1 for rr in chosen if not by_id.get(str(rr["id"]), {}).get("mask"))
                raise BadInput(f"{manifest}: image {r['id']!r} (and {n - 1} more) has no \"mask\"; eval "
                               f"explanations needs an object mask per image (a \"mask\" path in the manifest)")
            load_map(d, r)  # every map readable and finite before the slow part
            if causal and not Path(rec["path"]).is_file():
                raise BadInput(f"{manifest}: image {r['id']!r}: {rec['path']}: no such image file")
            todo.append((d, meta, r, rec))
    return todo


def evaluate_maps(maps_dirs: Sequence[str], manifest: str, *, opts: EvalOptions | None = None,
                  output: str = "-", summary_out: str | None = None, device: str = "auto") -> dict:
    """mIoU (and insertion, deletion, ID with ``opts.causal``; the grounding of per-descriptor maps with
    ``opts.descriptors``) of the maps of each directory; per-map JSONL to ``output``; returns (and writes
    to ``summary_out``) per-directory means and, per row of directories whose settings differ only in the
    seed (group_runs), mean ± std over them (seeds)."""
    import numpy as np

    from vlmtools.explain.metrics import iou, lattice_ceiling
    from vlmtools.images import read_image

    opts = (opts or EvalOptions()).check()
    causal = opts.causal and not opts.descriptors
    kernel = opts.kernel()
    if not maps_dirs:
        raise BadInput("give at least one maps directory")
    by_id = {r["id"]: r for r in formats.read_manifest(manifest)}
    loaded = [(str(d), *read_maps_dir(d)) for d in maps_dirs]
    labels = group_runs(loaded, descriptors=opts.descriptors)
    if causal:
        _warn_mixed_scorers(loaded, labels, opts.scorer)
    todo = _check_maps(loaded, by_id, manifest, opts.descriptors, causal)
    results, per_dir, scorers, mismatched = [], {}, {}, 0
    with progress("evaluating maps", total=len(todo), unit="maps") as bar:
        for d, meta, r, rec in todo:
            sal = load_map(d, r)
            try:
                mask = _load_mask(rec["mask"])
            except Exception as exc:
                raise BadInput(f"{rec['mask']}: cannot read the mask ({type(exc).__name__})") from None
            if sal.shape != mask.shape:
                raise BadInput(f"{Path(d) / r['map']}: map is {sal.shape[1]}x{sal.shape[0]} but the mask "
                               f"{rec['mask']} is {mask.shape[1]}x{mask.shape[0]}: maps of another size (made "
                               f"from other images?)")
            row = {"id": r["id"], "method": meta["method"], "label": labels[d], "maps": d, "class": r["class"]}
            if opts.descriptors:
                row.update(descriptor=r["descriptor"], **_grounding(sal, mask, r.get("kind", "object"),
                                                                    opts.threshold))
            else:
                row["iou"] = round(iou(sal, mask, opts.threshold), 6)
                if meta.get("lattice"):
                    row["iou_ceiling"] = round(lattice_ceiling(mask, meta["lattice"]), 6)
            if causal:
                key = _scorer_key(meta, opts.scorer)
                if key not in scorers:
                    scorers[key] = _make_scorer(meta, opts.scorer, device)
                row.update(_causal_scores(scorers[key], read_image(rec["path"]), sal, opts, kernel))
                mismatched += row["scored_class"] != r["class"]
            results.append(row)
            per_dir.setdefault(d, []).append(row)
            bar.advance(1)
    if mismatched:
        warn(f"{mismatched} of {len(results)} maps explain a class other than their scorer's prediction on the "
             f"full image; insertion and deletion score the prediction (\"scored_class\"), as RISE does")
    from vlmtools.console import data_to_terminal, hint_data_elsewhere

    if data_to_terminal(output):  # a terminal gets the table (summary_table); a pipe or -o the rows
        hint_data_elsewhere("the per-map NDJSON rows")
    else:
        formats.write_jsonl(output, results)
    summary = _summarize(loaded, labels, per_dir, opts, causal)
    if summary_out is not None:
        formats.write_json(summary_out, summary)
    return summary


def _means(rows: list[dict], descriptors: bool) -> dict:
    import numpy as np

    if descriptors:
        out = {"n": len(rows), "hit": float(np.mean([r["hit"] for r in rows]))}
        for kind in ("object", "background"):
            rs = [r for r in rows if r["kind"] == kind]
            out[f"n_{kind}"] = len(rs)
            for k in ("hit", "energy", "chance", "iou"):
                out[f"{k}_{kind}"] = float(np.mean([r[k] for r in rs])) if rs else None
        return out
    keys = [k for k in ("iou", "iou_ceiling", "insertion", "deletion", "id_score") if k in rows[0]]
    out = {"n": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    if "scorer" in rows[0]:
        out["scorer"] = rows[0]["scorer"]
        out["step"] = rows[0]["step"]
    return out


def _summarize(loaded, labels: dict, per_dir: dict, opts: EvalOptions, causal: bool) -> dict:
    import numpy as np

    dirs = []
    for d, meta, _ in loaded:
        dirs.append({"maps": d, "method": meta["method"], "label": labels[d],
                     "seed": meta.get("settings", {}).get("seed"), "lattice": meta.get("lattice"),
                     **_means(per_dir[d], opts.descriptors)})
    groups: dict = {}
    for row in dirs:
        groups.setdefault(row["label"], []).append(row)
    methods = []
    for label, rs in groups.items():
        m = {"method": rs[0]["method"], "label": label, "runs": len(rs), "maps": [r["maps"] for r in rs],
             "lattice": rs[0]["lattice"]}
        for k, v in rs[0].items():
            if k in ("maps", "method", "label", "seed", "lattice", "n") or k.startswith("n_"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                vals = [r[k] for r in rs if r.get(k) is not None]
                m[k] = float(np.mean(vals))
                m[f"{k}_std"] = float(np.std(vals))
            else:
                m[k] = v
        methods.append(m)
    return {"format": formats.EXPLAIN_EVAL_FORMAT, "kind": "grounding" if opts.descriptors else "maps",
            "threshold": "8-bit grey > 127 (ALA authors' compute_miou.py)" if opts.threshold == "0.5"
            else opts.threshold, "scorer": opts.scorer if causal else None,
            "steps": opts.describe_steps() if causal else None, "blur": opts.blur if causal else None,
            "directories": dirs, "methods": methods}


def run_settings(meta: dict) -> dict:
    """What made a maps directory, except the seed: runs equal in these are seeds of one row."""
    settings = {k: v for k, v in (meta.get("settings") or {}).items() if k != "seed"}
    # an ALA head that recorded its training settings is known by them (the path differs per seed)
    fields = ("method", "model", "classes", "templates", "descriptors", "cbd") + \
        (() if "head_config" in settings else ("head",))
    out = {k: meta.get(k) for k in fields}
    return {**out, **settings}


def _short(key: str, value) -> str:
    import hashlib

    if key == "model" and isinstance(value, dict):
        return "/".join(str(v) for v in value.values() if v)
    if key in ("head", "descriptors", "cbd") and value:
        return Path(str(value)).name
    if isinstance(value, (list, dict)):
        if isinstance(value, list) and len(value) <= 3:
            return ",".join(map(str, value))
        return f"{len(value)}:{hashlib.sha1(json_key(value).encode()).hexdigest()[:6]}"
    return str(value)


def _scorer(meta: dict) -> tuple:
    """What insertion/deletion score with: the model and its class embeddings."""
    return (json_key(meta["model"]), tuple(meta["classes"]), tuple(meta["templates"]), meta.get("cbd"))


def group_runs(loaded: Sequence[tuple[str, dict, list]], descriptors: bool = False) -> dict[str, str]:
    """{directory: row label}. Directories whose info.json agree in everything but the seed share a row
    (their class maps, or per-descriptor maps with ``descriptors``, must be of the same images; else exit
    2); a label is the method and the settings in which its row differs from another row, e.g. "gradcam
    layer=2"."""
    keys = {d: run_settings(meta) for d, meta, _ in loaded}
    distinct: dict[str, dict] = {}
    for d, _, _ in loaded:
        distinct.setdefault(json_key(keys[d]), keys[d])
    fields = list(dict.fromkeys(k for s in distinct.values() for k in s if k != "method"))
    varying = [k for k in fields if len({json_key(s.get(k)) for s in distinct.values()}) > 1]
    names: dict[str, str] = {}
    for key, s in distinct.items():
        parts = [f"{k}={_short(k, s.get(k))}" for k in varying if s.get(k) is not None]
        label = " ".join([s["method"], *parts])
        while label in names.values():  # differ only where the short form hides it: number them
            label += "'"
        names[key] = label
    images: dict[str, tuple[str, set]] = {}
    for d, _, rows in loaded:
        ids = {str(r["id"]) for r in rows if ("descriptor" in r) == descriptors}
        first = images.setdefault(json_key(keys[d]), (d, ids))
        if first[1] != ids:
            extra = sorted(first[1] ^ ids)
            raise BadInput(f"{first[0]} and {d}: made with the same settings (one row, seeds) but of different "
                           f"images ({len(first[1])} vs {len(ids)} maps; e.g. {extra[0]!r} in one only); "
                           f"evaluate them in separate calls or make them from the same images")
    return {d: names[json_key(keys[d])] for d, _, _ in loaded}


def _warn_mixed_scorers(loaded, labels: dict[str, str], scorer: str = "own") -> None:
    """Rows scored by different CLIP classifiers are not comparable: warn. (ALA maps scored by their own
    head are the study's protocol, shown in the table's scorer column.)"""
    scorers: dict[tuple, tuple[str, list[str]]] = {}
    for d, meta, _ in loaded:
        if _scorer_key(meta, scorer)[0] == "ala":
            continue
        how = "descriptors " + Path(meta["cbd"]).name if meta.get("cbd") else "class-name prompts"
        _, rows = scorers.setdefault(_scorer(meta), (f"{_short('model', meta['model'])} with {how}", []))
        if labels[d] not in rows:
            rows.append(labels[d])
    if len(scorers) > 1:
        kinds = "; ".join(f"{how}: {', '.join(rows)}" for how, rows in scorers.values())
        warn(f"insertion/deletion of these rows are scored by different models or class embeddings, so their "
             f"Ins/Del/ID are not comparable ({kinds})")


def json_key(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


SHORT_LABEL = 16  # row labels longer than this are shown as "METHOD #n", spelled out in a legend


def short_labels(labels: Sequence[tuple[str, str]]) -> list[str]:
    """(method, full label) per row -> the labels the table shows: the full one when short, else the method,
    numbered when several rows share it ("ala #2")."""
    counts: dict[str, int] = {}
    for method, _ in labels:
        counts[method] = counts.get(method, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for method, full in labels:
        seen[method] = seen.get(method, 0) + 1
        if len(full) <= SHORT_LABEL:
            out.append(full)
        else:
            out.append(method if counts[method] == 1 else f"{method} #{seen[method]}")
    return out


def summary_table(summary: dict) -> None:
    """The per-method table on stderr: mIoU (with the lattice ceiling), Ins, Del, ID as mean ± std over
    runs; short row labels, so the numbers keep their width at 80 columns, and a legend below for what each
    label stands for and who scored it; with --descriptors, the grounding hit rates."""
    from rich.table import Table

    if summary.get("kind") == "grounding":
        return _grounding_table(summary)
    first = summary["methods"][0]
    keys = [k for k in ("iou", "insertion", "deletion", "id_score") if k in first]
    heads = {"iou": "mIoU ↑", "insertion": "Ins ↑", "deletion": "Del ↓", "id_score": "ID ↑"}
    ceiling = any(m.get("iou_ceiling") is not None for m in summary["methods"])
    title = f"explanations (mIoU: {summary['threshold']}"
    if summary.get("steps"):
        title += f"; insertion/deletion: {summary['steps']}, scored by " + \
            ("each map's own model" if summary["scorer"] == "own" else "the CLIP classifier of each map (--scorer clip)")
    table = Table(title=title + ")")
    table.add_column("method", no_wrap=True)
    table.add_column("runs", justify="right")
    for k in keys:  # "0.275 ± 0.058" may break after the ±, never inside a number
        table.add_column(heads[k], justify="right", min_width=5)
        if k == "iou" and ceiling:
            table.add_column("ceiling", justify="right", min_width=5)
    shown = short_labels([(m["method"], m["label"]) for m in summary["methods"]])
    for m, label in zip(summary["methods"], shown):
        cells = []
        for k in keys:
            cells.append(f"{m[k]:.3f}" + (f" ± {m[k + '_std']:.3f}" if m["runs"] > 1 else ""))
            if k == "iou" and ceiling:
                lat = m.get("lattice")
                cells.append(f"{m['iou_ceiling']:.3f} ({lat[0]}×{lat[1]})" if m.get("iou_ceiling") is not None
                             else "–")
        table.add_row(label, str(m["runs"]), *cells)
    info_table(table)
    _legend(summary, shown)
    if ceiling:
        from vlmtools import console as c

        c.info("ceiling: the lattice ceiling, the best mIoU of any map constant on each cell of the lattice the "
               "maps are drawn at (rows × columns), against the same masks")


def _grounding_table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="grounding: how often a descriptor's map peaks on the region it names (obj: the "
                        "mask; bg: the rest; chance: the region's share of the image; energy: the map's share "
                        "inside it)")
    table.add_column("method", no_wrap=True)
    table.add_column("runs", justify="right")
    short = {"object": "obj", "background": "bg"}
    for kind in ("object", "background"):
        for what in ("hit", "chance", "energy"):
            table.add_column(f"{short[kind]} {what}", justify="right", min_width=5)
    shown = short_labels([(m["method"], m["label"]) for m in summary["methods"]])
    for m, label in zip(summary["methods"], shown):
        cells = []
        for kind in ("object", "background"):
            for what in ("hit", "chance", "energy"):
                v = m.get(f"{what}_{kind}")
                sd = m.get(f"{what}_{kind}_std")
                cells.append("–" if v is None else f"{v:.3f}" + (f" ± {sd:.3f}" if m["runs"] > 1 and what != "chance"
                                                                   and sd is not None else ""))
        table.add_row(label, str(m["runs"]), *cells)
    info_table(table)
    _legend(summary, shown)


def _legend(summary: dict, shown: list[str]) -> None:
    """Below the table: what each short row label stands for, its maps and who scored its insertion/deletion."""
    legend = [f"{label}: " + (f"{m['label']}; " if label != m["label"] else "") + f"maps {', '.join(m['maps'])}"
              + (f"; scored by {m['scorer']}" if m.get("scorer") else "")
              for m, label in zip(summary["methods"], shown) if label != m["label"] or len(summary["methods"]) > 1]
    if legend:
        from vlmtools import console as c

        digests = any(re.search(r"=\d+:[0-9a-f]{6}\b", m["label"]) for m in summary["methods"])
        lines = legend + (["(N:abcdef = a setting of N entries, abcdef the start of its sha1: the rows differ "
                           "there; the maps directories' info.json hold them)"] if digests else [])
        for line in lines:
            c.info(line)


def info_table(table) -> None:
    from vlmtools import console as c

    if not c._quiet:
        c.console.print(table)
