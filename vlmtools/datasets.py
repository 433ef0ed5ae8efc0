"""Dataset layouts -> manifest records (see formats.manifest_record). Used by `vlmtools data`.

Every importer returns a complete list of records (or raises BadInput before anything is written), with
absolute image paths, so that a manifest works from any directory it is saved in.

- folder  ImageFolder layout: ROOT/<class>/**/<image>; id = path relative to ROOT
- cub     CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/;
          id = CUB image id; class names cleaned as the CBD paper's code does (cub_class_name)
- csv     a table with a path column and optional label/id/split/domain/mask columns
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from vlmtools import formats
from vlmtools.console import warn
from vlmtools.errors import BadInput

NAME_STYLES = ("raw", "cub")
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
CSV_OPTIONAL = ("id", "split", "domain", "mask")

_NUMERIC_PREFIX = re.compile(r"^\d+\.")


def cub_class_name(raw: str) -> str:
    """"001.Black_footed_Albatross" -> "Black-footed Albatross", as in the CBD release (datasets.py,
    redefine_class_to_idx): drop the numeric prefix, "_" -> " ", and when there are more than two words,
    hyphenate all but the last ("Gray_crowned_Rosy_Finch" -> "Gray-crowned-Rosy Finch"). Their descriptor
    file is keyed by these names, so they must match exactly."""
    words = _NUMERIC_PREFIX.sub("", raw.strip()).replace("_", " ").split(" ")
    if len(words) > 2:
        return "-".join(words[:-1]) + " " + words[-1]
    return " ".join(words)


def clean_class_name(raw: str, style: str) -> str:
    if style == "raw":
        return raw
    if style == "cub":
        return cub_class_name(raw)
    raise BadInput(f"--names {style!r}: expected one of {', '.join(NAME_STYLES)}")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in formats.IMAGE_SUFFIXES and not path.name.startswith(".")


# ----------------------------------------------------------------------------- ImageFolder

# Folder names that mean a split, not a class (ROOT/train/<class>/..., as torchvision's ImageFolder
# datasets and Kaggle archives come).
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> list[Path]:
    """ROOT's split folders when ROOT/<split>/<class>/<image> is its layout: every top folder has a split's
    name (SPLIT_NAMES, any case) and holds class folders. [] otherwise."""
    tops = _subdirs(root)
    if tops and all(d.name.lower() in SPLIT_NAMES and _subdirs(d) for d in tops):
        return tops
    named = [d.name for d in tops if d.name.lower() in SPLIT_NAMES and _subdirs(d)]
    if named:
        warn(f"{root}: {', '.join(named)} look like split folders, but ROOT also holds other folders; every "
             f"top folder is taken as a class (for ROOT/<split>/<class>/<image>, keep only split folders there)")
    return []


def folder_records(root: str | os.PathLike, split: str | None = None, domain: str | None = None,
                   names: str = "raw") -> list[dict]:
    """One record per image under ROOT/<class>/ (searched recursively, sorted; hidden entries skipped), or
    under ROOT/<split>/<class>/ when ROOT's folders are splits (split_folders): the split is the folder's
    name and the id keeps it (train/daisy/a.png)."""
    from vlmtools.console import info

    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInput(f"{root}: {'is a file, expected' if root.exists() else 'no such'} directory")
    root = root.resolve()
    splits = split_folders(root)
    if splits:
        if split is not None:
            raise BadInput(f"{root} holds split folders ({', '.join(d.name for d in splits)}), which name each "
                           f"image's split; drop --split, or point ROOT at one split folder")
        info(f"{root}: split folders {', '.join(d.name for d in splits)} (ROOT/<split>/<class>/<image>); the "
             f"split of each image is its folder's name")
        records = []
        for d in splits:
            records += _class_folder_records(d, root, d.name, domain, names)
        return records
    return _class_folder_records(root, root, split, domain, names)


def _class_folder_records(top: Path, root: Path, split: str | None, domain: str | None,
                          names: str) -> list[dict]:
    """Records of TOP/<class>/**/<image>; ids are paths relative to ROOT."""
    class_dirs = _subdirs(top)
    if not class_dirs:
        raise BadInput(f"{top}: no class folders (expected ROOT/<class>/<image>)")
    records = []
    for class_dir in class_dirs:
        label = clean_class_name(class_dir.name, names)
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted walk = stable order
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if is_image(path):
                    rel = path.relative_to(root).as_posix()
                    records.append(formats.manifest_record(rel, str(path), label, split, domain=domain))
    if not records:
        raise BadInput(f"{top}: no images found in its class folders "
                       f"(suffixes: {', '.join(sorted(formats.IMAGE_SUFFIXES))})")
    return records


# ----------------------------------------------------------------------------- CUB-200-2011

def _read_pairs(path: Path, allowed: tuple[str, ...] | None = None) -> dict[str, str]:
    """'<id> <value>' lines -> {id: value}; a malformed line, a repeated id or a value outside ``allowed``
    is BadInput naming file:line."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise BadInput(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
            if parts[0] in out:
                raise BadInput(f"{path}:{lineno}: id {parts[0]} appears twice")
            if allowed is not None and parts[1] not in allowed:
                raise BadInput(f"{path}:{lineno}: expected {' or '.join(allowed)} after the id, got {parts[1]!r}")
            out[parts[0]] = parts[1]
    return out


def find_cub_root(root: Path) -> Path:
    """Accept the CUB_200_2011 directory itself or the folder that holds it (as the tarball unpacks)."""
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        return root / "CUB_200_2011"
    return root


def cub_records(root: str | os.PathLike, segmentations: str | os.PathLike | None = None,
                only: str | None = None, domain: str | None = None, check: bool = True) -> list[dict]:
    """One record per line of images.txt (in its order), split "train" (1) / "test" (0) as
    train_test_split.txt says; ``only`` keeps one split. With ``segmentations``, each record's mask is
    DIR/<the image's relative path with .png>, as the CUB segmentation archive lays them out."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInput(f"{root}: no such directory")
    root = find_cub_root(root.resolve())
    missing = [name for name in CUB_FILES if not (root / name).is_file()]
    if missing:
        raise BadInput(f"{root}: not a CUB-200-2011 root, missing {', '.join(missing)}")
    if not (root / "images").is_dir():
        raise BadInput(f"{root}: not a CUB-200-2011 root, missing the images/ directory")
    if only not in (None, "train", "test"):
        raise BadInput(f"--only {only!r}: expected train or test")
    seg_dir = None
    if segmentations is not None:
        seg_dir = Path(segmentations).expanduser()
        if not seg_dir.is_dir():
            raise BadInput(f"--segmentations {seg_dir}: no such directory")
        seg_dir = seg_dir.resolve()

    images = _read_pairs(root / "images.txt")
    labels = _read_pairs(root / "image_class_labels.txt")
    splits = _read_pairs(root / "train_test_split.txt", allowed=("1", "0"))
    classes = {cid: cub_class_name(raw) for cid, raw in _read_pairs(root / "classes.txt").items()}
    if not images:
        raise BadInput(f"{root / 'images.txt'}: no images listed")

    records = []
    for image_id, rel in images.items():
        for table, name in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt")):
            if image_id not in table:
                raise BadInput(f"{root / name}: no line for image id {image_id} ({rel})")
        class_id = labels[image_id]
        if class_id not in classes:
            raise BadInput(f"{root / 'image_class_labels.txt'}: image {image_id} has class id {class_id}, "
                           f"which classes.txt does not list")
        split = "train" if splits[image_id] == "1" else "test"
        if only is not None and split != only:
            continue
        path = root / "images" / rel
        if check and not path.is_file():
            raise BadInput(f"{path}: image {image_id} listed in images.txt is missing")
        mask = None
        if seg_dir is not None:
            mask = seg_dir / Path(rel).with_suffix(".png")
            if check and not mask.is_file():
                raise BadInput(f"{mask}: segmentation mask of image {image_id} is missing")
        records.append(formats.manifest_record(image_id, str(path), classes[class_id], split,
                                               mask=str(mask) if mask else None, domain=domain))
    return records


# ----------------------------------------------------------------------------- CSV / TSV

def _sniff_delimiter(header: str) -> str:
    return "\t" if "\t" in header else ","


def csv_records(path: str | os.PathLike, path_col: str = "path", label_col: str | None = None,
                check: bool = True) -> list[dict]:
    """Rows of a comma- or tab-separated file with a header. Relative paths (and masks) resolve against
    the file's directory. ``label_col=None`` means "label" if the header has it (else no labels); a
    label column named explicitly must exist. Other columns than path/label/id/split/domain/mask are ignored."""
    src = Path(path).expanduser()
    if str(path) == "-":
        raise BadInput("vlmtools data csv reads a file, not stdin (relative paths need its directory)")
    if not src.is_file():
        raise BadInput(f"{src}: no such file")
    base = src.resolve().parent
    with open(src, encoding="utf-8-sig", newline="") as fh:  # -sig: spreadsheets often write a BOM
        header = fh.readline()
        if not header.strip():
            raise BadInput(f"{src}: empty file (expected a header line with a {path_col!r} column)")
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter=_sniff_delimiter(header))
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        if path_col not in columns:
            raise BadInput(f"{src}:1: no {path_col!r} column (columns: {', '.join(columns)}); see --path-col")
        if label_col is not None and label_col not in columns:
            raise BadInput(f"{src}:1: no {label_col!r} column (columns: {', '.join(columns)}); see --label-col")
        if label_col is None:
            label_col = "label" if "label" in columns else None
            if label_col is None:
                warn(f"{src}: no 'label' column; the manifest will have no labels (see --label-col)")

        records, seen = [], set()
        for row in reader:
            lineno = reader.line_num
            if None in row:  # DictReader puts surplus fields under the key None
                raise BadInput(f"{src}:{lineno}: {len(columns) + len(row[None])} fields but the header has "
                               f"{len(columns)} (an unquoted delimiter inside a value? quote it)")
            value = (row.get(path_col) or "").strip()
            if not value:
                raise BadInput(f"{src}:{lineno}: empty {path_col!r}")
            image = Path(value).expanduser()
            image = image if image.is_absolute() else base / image
            if check and not image.is_file():
                raise BadInput(f"{src}:{lineno}: {image}: no such image file")
            extra = {k: (row.get(k) or "").strip() or None for k in CSV_OPTIONAL}
            image_id = extra.pop("id") or value
            if image_id in seen:
                raise BadInput(f"{src}:{lineno}: duplicate id {image_id!r}")
            seen.add(image_id)
            if extra["mask"]:
                mask = Path(extra["mask"]).expanduser()
                mask = mask if mask.is_absolute() else base / mask
                if check and not mask.is_file():
                    raise BadInput(f"{src}:{lineno}: {mask}: no such mask file")
                extra["mask"] = str(mask)
            label = ((row.get(label_col) or "").strip() or None) if label_col else None
            records.append(formats.manifest_record(image_id, str(image), label, extra.pop("split"), **extra))
    if not records:
        raise BadInput(f"{src}: no rows after the header")
    return records


def summary(records: list[dict]) -> str:
    """"120 images, 3 classes (test: 40, train: 80)" for the stderr report."""
    classes = {r["label"] for r in records if "label" in r}
    splits: dict[str, int] = {}
    for r in records:
        if "split" in r:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
    by_split = ", ".join(f"{k}: {v}" for k, v in sorted(splits.items()))
    return f"{len(records)} images, {len(classes)} classes" + (f" ({by_split})" if by_split else "")
