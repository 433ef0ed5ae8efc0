"""`vlmtools data folder|cub|csv` and vlmtools.datasets: manifests from dataset layouts."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools import formats
from vlmtools.cli.app import app
from vlmtools.datasets import csv_records, cub_class_name, cub_records, folder_records
from vlmtools.errors import BadInput

runner = CliRunner()


def png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), color).save(path)
    return path


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- class names

@pytest.mark.parametrize("raw, clean", [
    # keys of descriptors_cub.json in the CBD release, which the cleaned names must match
    ("001.Black_footed_Albatross", "Black-footed Albatross"),
    ("009.Brewer_Blackbird", "Brewer Blackbird"),
    ("017.Cardinal", "Cardinal"),
    ("022.Chuck_will_Widow", "Chuck-will Widow"),
    ("037.Gray_crowned_Rosy_Finch", "Gray-crowned-Rosy Finch"),
    ("Black_footed_Albatross", "Black-footed Albatross"),
])
def test_cub_class_name_matches_cbd(raw, clean):
    assert cub_class_name(raw) == clean


# ----------------------------------------------------------------------------- folder

@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "flowers"
    png(root / "daisy" / "a.png")
    png(root / "daisy" / "nested" / "b.JPG")
    png(root / "rose" / "c.png")
    png(root / ".cache" / "skip.png")           # hidden folder: not a class
    (root / "rose" / "notes.txt").write_text("not an image")
    return root


def test_folder_cli_to_stdout(folder):
    result = runner.invoke(app, ["data", "folder", str(folder), "--split", "train"])
    assert result.exit_code == 0, result.output
    recs = lines(result.stdout)
    assert [r["id"] for r in recs] == ["daisy/a.png", "daisy/nested/b.JPG", "rose/c.png"]
    assert [r["label"] for r in recs] == ["daisy", "daisy", "rose"]
    assert {r["split"] for r in recs} == {"train"}
    for r in recs:
        assert Path(r["path"]).is_absolute() and Path(r["path"]) == folder / r["id"]


def test_folder_manifest_file_reads_back(folder, tmp_path):
    out = tmp_path / "m" / "flowers.jsonl"
    result = runner.invoke(app, ["data", "folder", str(folder), "-o", str(out), "--domain", "photo"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    recs = formats.read_manifest(out)
    assert len(recs) == 3 and all(Path(r["path"]).is_file() for r in recs)
    assert {r["domain"] for r in recs} == {"photo"} and all("split" not in r for r in recs)


def test_folder_cub_style_names(tmp_path):
    png(tmp_path / "paintings" / "001.Black_footed_Albatross" / "x.png")
    recs = folder_records(tmp_path / "paintings", names="cub")
    assert recs[0]["label"] == cub_class_name("001.Black_footed_Albatross")
    assert recs[0]["id"] == "001.Black_footed_Albatross/x.png"


def test_folder_bad_roots(tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "folder", str(tmp_path / "missing"), "-o", str(out)])
    assert result.exit_code == 2 and "missing: no such directory" in result.output
    (tmp_path / "flat").mkdir()
    png(tmp_path / "flat" / "loose.png")  # images but no class folders
    result = runner.invoke(app, ["data", "folder", str(tmp_path / "flat"), "-o", str(out)])
    assert result.exit_code == 2 and "no class folders" in result.output
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    result = runner.invoke(app, ["data", "folder", str(tmp_path / "empty"), "-o", str(out)])
    assert result.exit_code == 2 and "no images found" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))
    with pytest.raises(BadInput, match="--names"):
        folder_records(tmp_path / "empty", names="fancy")


# ----------------------------------------------------------------------------- CUB

CUB_CLASSES = ["001.Black_footed_Albatross", "009.Brewer_Blackbird", "037.Gray_crowned_Rosy_Finch"]


def make_cub(root: Path, segmentations: Path | None = None) -> list[tuple[str, str, int, int]]:
    """A CUB-200-2011 tree with two images per class; returns (id, relative path, class id, is_train)."""
    rows = []
    for c, name in enumerate(CUB_CLASSES, 1):
        for j in range(2):
            image_id = str(len(rows) + 1)
            rel = f"{name}/{name.split('.')[1]}_{j:04d}.jpg"
            rows.append((image_id, rel, c, 1 - j))  # first image of each class is train, second test
            png(root / "images" / rel)
            if segmentations is not None:
                png((segmentations / rel).with_suffix(".png"), color=(255, 255, 255))
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(CUB_CLASSES, 1)))
    return rows


def test_cub_cli_with_segmentations(tmp_path):
    root, seg = tmp_path / "CUB_200_2011", tmp_path / "segmentations"
    rows = make_cub(root, seg)
    result = runner.invoke(app, ["data", "cub", str(root), "--segmentations", str(seg)])
    assert result.exit_code == 0, result.output
    recs = lines(result.stdout)
    assert [r["id"] for r in recs] == [i for i, _, _, _ in rows]
    for rec, (_, rel, c, is_train) in zip(recs, rows):
        assert rec["path"] == str(root / "images" / rel)
        assert rec["label"] == cub_class_name(CUB_CLASSES[c - 1])
        assert rec["split"] == ("train" if is_train else "test")
        assert rec["mask"] == str((seg / rel).with_suffix(".png")) and Path(rec["mask"]).is_file()


def test_cub_parent_folder_and_only_split(tmp_path):
    rows = make_cub(tmp_path / "CUB_200_2011")
    recs = cub_records(tmp_path, only="test")  # the folder the tarball unpacks into works too
    assert [r["id"] for r in recs] == [i for i, _, _, t in rows if not t]
    assert all("mask" not in r for r in recs)


def test_cub_missing_pieces_exit_2(tmp_path):
    root = tmp_path / "cub"
    rows = make_cub(root)
    out = tmp_path / "out.jsonl"

    (root / "classes.txt").rename(root / "classes.bak")
    result = runner.invoke(app, ["data", "cub", str(root), "-o", str(out)])
    assert result.exit_code == 2 and "missing classes.txt" in result.output
    (root / "classes.bak").rename(root / "classes.txt")

    missing = root / "images" / rows[3][1]
    missing.unlink()
    result = runner.invoke(app, ["data", "cub", str(root), "-o", str(out)])
    assert result.exit_code == 2 and str(missing) in result.output and "image 4" in result.output
    assert runner.invoke(app, ["data", "cub", str(root), "--no-check", "-o", str(out)]).exit_code == 0
    out.unlink()

    result = runner.invoke(app, ["data", "cub", str(root), "--segmentations", str(tmp_path / "nope"),
                                 "--no-check"])
    assert result.exit_code == 2 and "--segmentations" in result.output
    (tmp_path / "seg").mkdir()
    png(root / "images" / rows[3][1])
    result = runner.invoke(app, ["data", "cub", str(root), "--segmentations", str(tmp_path / "seg")])
    assert result.exit_code == 2 and "segmentation mask of image 1 is missing" in result.output

    (root / "train_test_split.txt").write_text("1 1\n2 x\n")
    result = runner.invoke(app, ["data", "cub", str(root), "-o", str(out)])
    assert result.exit_code == 2 and "train_test_split.txt:2" in result.output
    assert not out.exists()


def test_cub_inconsistent_tables(tmp_path):
    root = tmp_path / "cub"
    make_cub(root)
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 9\n")
    with pytest.raises(BadInput, match="class id 9"):
        cub_records(root)
    (root / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(BadInput, match="image_class_labels.txt: no line for image id 2"):
        cub_records(root)
    with pytest.raises(BadInput, match="not a CUB-200-2011 root"):
        cub_records(tmp_path)


# ----------------------------------------------------------------------------- CSV

def test_csv_comma_with_optional_columns(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png")
    png(tmp_path / "masks" / "a.png")
    table = tmp_path / "data.csv"
    table.write_text("path,label,split,mask,extra\n"
                     "imgs/a.png,cat,train,masks/a.png,x\n"
                     f"{tmp_path / 'imgs' / 'b.png'},dog,test,,y\n")
    result = runner.invoke(app, ["data", "csv", str(table)])
    assert result.exit_code == 0, result.output
    a, b = lines(result.stdout)
    assert a == {"id": "imgs/a.png", "path": str(tmp_path / "imgs" / "a.png"), "label": "cat", "split": "train",
                 "mask": str(tmp_path / "masks" / "a.png")}
    assert b["label"] == "dog" and b["split"] == "test" and "mask" not in b and "extra" not in b


def test_csv_tab_and_custom_columns(tmp_path):
    png(tmp_path / "x.png")
    png(tmp_path / "y.png")
    table = tmp_path / "data.tsv"
    table.write_text("file\tspecies\tid\tdomain\nx.png\tWren\tw1\tpainting\ny.png\tJay\tj1\tphoto\n")
    recs = csv_records(table, path_col="file", label_col="species")
    assert [(r["id"], r["label"], r["domain"]) for r in recs] == [("w1", "Wren", "painting"), ("j1", "Jay", "photo")]
    result = runner.invoke(app, ["data", "csv", str(table), "--path-col", "file", "--label-col", "species"])
    assert result.exit_code == 0 and lines(result.stdout) == recs


def test_csv_bad_inputs(tmp_path):
    png(tmp_path / "a.png")
    out = tmp_path / "out.jsonl"
    table = tmp_path / "t.csv"

    table.write_text("image,label\na.png,cat\n")
    result = runner.invoke(app, ["data", "csv", str(table), "-o", str(out)])
    assert result.exit_code == 2 and "no 'path' column" in result.output and "image, label" in result.output
    result = runner.invoke(app, ["data", "csv", str(table), "--path-col", "image", "--label-col", "kind"])
    assert result.exit_code == 2 and "no 'kind' column" in result.output

    table.write_text("path,label\na.png,cat\ngone.png,dog\n")
    result = runner.invoke(app, ["data", "csv", str(table), "-o", str(out)])
    assert result.exit_code == 2 and "t.csv:3" in result.output and "gone.png" in result.output

    table.write_text("path,label,id\na.png,cat,1\na.png,cat,1\n")
    result = runner.invoke(app, ["data", "csv", str(table), "-o", str(out)])
    assert result.exit_code == 2 and "t.csv:3: duplicate id '1'" in result.output

    result = runner.invoke(app, ["data", "csv", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "no such file" in result.output
    assert not out.exists()


def test_csv_without_labels_warns(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("path\na.png\n")
    result = runner.invoke(app, ["data", "csv", str(tmp_path / "t.csv")])
    assert result.exit_code == 0
    assert "no 'label' column" in " ".join(result.stderr.split())  # rich may wrap stderr lines
    assert lines(result.stdout) == [{"id": "a.png", "path": str(tmp_path / "a.png")}]


def test_folder_with_split_folders(tmp_path):
    """ROOT/train/<class> and ROOT/test/<class>: the split is the folder, not a class."""
    root = tmp_path / "ds"
    for split, files in (("train", ("a", "b")), ("test", ("c",))):
        for cls in ("daisy", "rose"):
            for f in files:
                png(root / split / cls / f"{f}.png")
    result = runner.invoke(app, ["data", "folder", str(root)])
    assert result.exit_code == 0, result.output
    recs = lines(result.stdout)
    assert {r["label"] for r in recs} == {"daisy", "rose"}
    assert sorted((r["split"], r["label"]) for r in recs).count(("train", "daisy")) == 2
    assert {r["id"] for r in recs} >= {"train/daisy/a.png", "test/rose/c.png"} and len(recs) == 6
    err = " ".join(result.stderr.split())
    assert "split folders test, train" in err and "6 images, 2 classes (test: 2, train: 4)" in err
    result = runner.invoke(app, ["data", "folder", str(root), "--split", "train"])
    assert result.exit_code == 2 and "drop --split" in result.output
    png(root / "cat" / "x.png")  # a class folder beside them: no longer a split layout, and it says so
    result = runner.invoke(app, ["data", "folder", str(root)])
    assert result.exit_code == 0 and {r["label"] for r in lines(result.stdout)} == {"cat", "test", "train"}
    assert "look like split folders" in " ".join(result.stderr.split())
