"""Write a world to disk: images, masks, manifest, true attributes, classes, oracle descriptors (and vague
ones, study 000's stand-in for descriptors written without an example from the domain), captions.

The whole directory is generated in a temporary sibling and renamed into place, so a failed or interrupted
run leaves nothing behind. Files are byte-identical for the same arguments.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vlmtools.console import progress
from vlmtools.errors import BadInput
from vlmtools.formats import descriptor_record, dumps, dumps_line, iter_jsonl, manifest_record, read_json
from vlmtools.synth.world import (DOMAINS, VOCAB, WORLD_VERSION, caption, class_captions, make_classes,
                                  oracle_descriptors, sample_attributes, vague_descriptors)
from vlmtools.synth.render import render

DOMAIN_CHOICES = DOMAINS + ("both",)
MAX_CLASSES = 200

# What makes a world harder, each alone or together (make_world's keyword arguments; their defaults give
# the plain world, drawn exactly as before these options existed).
HARDER_DEFAULTS = {
    "names": "made-up",   # or informative: a made-up name after one attribute word ("Red Vobrine Skipper")
    "fine": 0.3,          # share of classes in fine-grained families (one object attribute differs)
    "family": 2,          # classes per family
    "overlap": 0.0,       # confusable siblings: probability an image shows a sibling's value instead
    "clutter": 0,         # up to this many neutral pebbles and twigs per image
    "occlusion": 0.0,     # up to this share of the object hidden behind a branch
    "object_scale": 1.0,  # object radius factor (smaller objects below 1)
    "noise": 0.0,         # extra pixel and blotch noise sigma
    "label_noise": 0.0,   # share of train-split labels replaced by another class (test labels stay true)
}
# Presets: settings of the options above (and of classes and per_class) that the user's own override.
# cub-like: where the studies' figures lie on CUB with CLIP: names that carry some meaning (zero-shot by
# name well above chance, below descriptors), families of look-alike species (a probe well below 100%),
# clutter and occlusion (maps have something to get wrong); checked in tests/test_harder_worlds.py.
PRESETS = {
    "cub-like": {"classes": 50, "per_class": 40, "names": "informative", "fine": 0.6, "family": 3,
                 "overlap": 0.2, "clutter": 3, "occlusion": 0.3, "object_scale": 0.85, "noise": 0.03},
}


def resolve_preset(preset: str | None, **given) -> dict:
    """The options of ``preset`` overridden by the ``given`` ones that are not None."""
    if preset is not None and preset not in PRESETS:
        raise BadInput(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    out = dict(PRESETS.get(preset, {}))
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def check_harder(options: dict) -> None:
    from vlmtools.synth.world import NAME_STYLES, VOCAB

    o = {**HARDER_DEFAULTS, **options}
    unknown = sorted(set(options) - set(HARDER_DEFAULTS))
    if unknown:
        raise BadInput(f"unknown world option(s) {', '.join(unknown)}")
    if o["names"] not in NAME_STYLES:
        raise BadInput(f"--names {o['names']!r}: expected one of {', '.join(NAME_STYLES)}")
    if not 2 <= o["family"] <= len(VOCAB["colour"]):
        raise BadInput(f"--family {o['family']}: expected 2 to {len(VOCAB['colour'])} classes")
    for key, low, high in (("fine", 0, 1), ("overlap", 0, 0.5), ("occlusion", 0, 0.8), ("noise", 0, 0.3),
                           ("label_noise", 0, 0.9), ("object_scale", 0.4, 1.2)):
        if not low <= float(o[key]) <= high:
            raise BadInput(f"--{key.replace('_', '-')} {o[key]}: expected a number in [{low}, {high}]")
    if not 0 <= int(o["clutter"]) <= 12:
        raise BadInput(f"--clutter {o['clutter']}: expected 0 to 12 pieces")


def check_arguments(classes: int, per_class: int, domain: str, image_size: int, test_fraction: float) -> None:
    if not 2 <= classes <= MAX_CLASSES:
        raise BadInput(f"--classes {classes}: expected 2 to {MAX_CLASSES}")
    if per_class < 1:
        raise BadInput(f"--per-class {per_class}: expected at least 1")
    if domain not in DOMAIN_CHOICES:
        raise BadInput(f"--domain {domain!r}: expected one of {', '.join(DOMAIN_CHOICES)}")
    if not 32 <= image_size <= 512:
        raise BadInput(f"--image-size {image_size}: expected 32 to 512 pixels")
    if not 0.0 <= test_fraction < 1.0:
        raise BadInput(f"--test-fraction {test_fraction}: expected a number in [0, 1)")


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_lines(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(dumps_line(rec))


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BadInput(f"{out}: directory exists and is not empty (pass --force to replace a world)")
        if not (out / "world.json").exists():
            raise BadInput(f"{out}: not a synth world (no world.json); refusing to replace it even with --force")


IMAGE_CAPTIONS = 3  # captions per image in image_captions.jsonl


def _remove_stale_temps(out: Path) -> None:
    """Remove the temporary folders (.OUT.PID.xxx.tmp, .OUT.old-PID) of killed runs whose process is gone."""
    import re

    from vlmtools.formats import pid_alive

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:(\d+)\..+\.tmp|old-(\d+))$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _keep_unchanged_times(old: Path, new: Path) -> None:
    """Files the rebuild wrote byte for byte as before keep their old modification time, so stores
    embedded from the old world (whose input digest covers size and mtime) stay valid."""
    import filecmp

    for f in new.rglob("*"):
        before = old / f.relative_to(new)
        if f.is_file() and before.is_file() and filecmp.cmp(f, before, shallow=False):
            st = before.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def make_world(out_dir: str | os.PathLike, classes: int = 20, per_class: int = 50, domain: str = "photo",
               seed: int = 0, image_size: int = 64, test_fraction: float = 0.3, force: bool = False,
               **harder) -> dict:
    """Generate a world into ``out_dir``; returns a summary dict. See the module docstring for the files,
    HARDER_DEFAULTS for the keyword options that make it harder."""
    check_arguments(classes, per_class, domain, image_size, test_fraction)
    check_harder(harder)
    out = Path(out_dir)
    _prepare_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        summary = _generate(tmp, classes, per_class, domain, seed, image_size, test_fraction,
                            {**HARDER_DEFAULTS, **harder})
        tmp.chmod(0o755)
        if out.exists():  # empty dir, or a world we may replace (--force): swap, then delete the old one
            _keep_unchanged_times(out, tmp)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary["out"] = str(out)
    return summary


def _nuisance(rng: np.random.Generator, o: dict) -> dict | None:
    """One image's nuisances under the world's options (None for a plain world: no draws at all)."""
    out = {}
    if o["object_scale"] != 1.0:
        out["scale"] = float(o["object_scale"])
    if o["clutter"]:
        out["clutter"] = int(rng.integers(0, int(o["clutter"]) + 1))
    if o["occlusion"]:
        out["occlusion"] = float(rng.uniform(0, o["occlusion"]))
    if o["noise"]:
        out["noise"] = float(o["noise"])
    return out or None


def _generate(root: Path, n_classes: int, per_class: int, domain: str, seed: int, image_size: int,
              test_fraction: float, options: dict) -> dict:
    defs = make_classes(n_classes, seed, fine=options["fine"], family=options["family"],
                        overlap=options["overlap"], names=options["names"])
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng([seed, 5])
    nuisance_rng = np.random.default_rng([seed, 9])
    label_rng = np.random.default_rng([seed, 11])
    names = [c["name"] for c in defs]
    n_test = int(round(per_class * test_fraction))
    manifest, attributes = [], []
    total = n_classes * per_class
    with progress("rendering", total=total, unit="images") as bar:
        for c, cls in enumerate(defs):
            for j in range(per_class):
                index = c * per_class + j
                image_id = f"{index:05d}"
                attrs = sample_attributes(rng, cls, domain)
                image, mask, geometry = render(rng, attrs, image_size, _nuisance(nuisance_rng, options))
                (root / "images" / f"{image_id}.png").write_bytes(_png_bytes(image))
                (root / "masks" / f"{image_id}.png").write_bytes(_png_bytes(mask.astype(np.uint8) * 255))
                split = "test" if j < n_test else "train"
                label, noisy = cls["name"], {}
                if split == "train" and options["label_noise"] and label_rng.random() < options["label_noise"]:
                    label = names[(c + 1 + int(label_rng.integers(n_classes - 1))) % n_classes]
                    noisy = {"given_label": label}
                manifest.append(manifest_record(image_id, f"images/{image_id}.png", label, split,
                                                mask=f"masks/{image_id}.png", domain=attrs["domain"]))
                attributes.append({"id": image_id, "label": cls["name"], **noisy, **attrs, **geometry})
                bar.advance(1)
    _write_lines(root / "manifest.jsonl", manifest)
    _write_lines(root / "attributes.jsonl", attributes)
    (root / "classes.txt").write_text("".join(c["name"] + "\n" for c in defs), encoding="utf-8")
    descriptor_lines = []
    for cls in defs:
        descriptors, kinds = oracle_descriptors(cls)
        descriptor_lines.append(descriptor_record(cls["name"], descriptors, kinds, style="oracle"))
    _write_lines(root / "descriptors.jsonl", descriptor_lines)
    vague_rng = np.random.default_rng([seed, 13])
    _write_lines(root / "descriptors-vague.jsonl",
                 (descriptor_record(c["name"], *vague_descriptors(vague_rng, c), style="vague") for c in defs))
    _write_lines(root / "captions.jsonl",
                 ({"class": c["name"], "sentences": class_captions(c)} for c in defs))
    # per-image captions (text -> image pairs, e.g. for `train t2i`), from their own generator so the
    # other files do not change with them
    caption_rng = np.random.default_rng([seed, 7])
    _write_lines(root / "image_captions.jsonl",
                 ({"id": f"{a['id']}:{k}", "image_id": a["id"], "text": caption(caption_rng, a)}
                  for a in attributes for k in range(IMAGE_CAPTIONS)))
    world = {
        "format": WORLD_VERSION,
        "seed": seed,
        "classes": n_classes,
        "per_class": per_class,
        "domain": domain,
        "image_size": image_size,
        "test_fraction": test_fraction,
        "options": options,
        "vocabulary": {k: list(v) for k, v in VOCAB.items()},
        "definitions": defs,
    }
    (root / "world.json").write_text(dumps(world, indent=2) + "\n", encoding="utf-8")
    return {"classes": n_classes, "images": total, "train": total - n_test * n_classes,
            "test": n_test * n_classes, "domain": domain, "seed": seed, "image_size": image_size}


def load_world(world_dir: str | os.PathLike) -> dict:
    """A world's world.json (class definitions, seed, settings), checked to be one."""
    path = Path(world_dir) / "world.json"
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != WORLD_VERSION:
        raise BadInput(f"{path}: not a {WORLD_VERSION} world description")
    return info


def read_attributes(world_dir: str | os.PathLike) -> dict[str, dict]:
    """A world's true attributes per image id, from attributes.jsonl."""
    return {str(rec["id"]): rec for _, rec in iter_jsonl(Path(world_dir) / "attributes.jsonl")}
