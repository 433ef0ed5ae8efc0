"""`vlmtools explain text`: which images, what the bars show, the PNG figures, and bad input."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtools.cli.app import app
from vlmtools.explain import textual as T
from vlmtools.formats import prediction_record

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def explained(i, label, pred, path, rng):
    """A cbd-like prediction: the predicted and the true class's descriptors with random scores."""
    def expl(cls):
        kinds = ["object", "object", "background"]
        scores = sorted(rng.uniform(0.15, 0.35, size=3), reverse=True)
        return [{"descriptor": f"{cls} trait {j}", "kind": kinds[j], "score": round(float(s), 6)}
                for j, s in enumerate(scores)]
    others = [c for c in ("Cardinal", "Mallard", "Snowy Owl") if c != pred]
    topk = [(pred, 0.3)] + [(c, 0.2 - 0.01 * n) for n, c in enumerate(others)]
    return prediction_record({"id": f"im{i}", "path": str(path), "label": label}, pred, topk,
                             explanation=expl(pred), explanation_true=expl(label))


@pytest.fixture
def preds(tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "bird.png"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    pairs = [("Cardinal", "Cardinal"), ("Mallard", "Cardinal"), ("Snowy Owl", "Snowy Owl"), ("Mallard", "Snowy Owl")]
    recs = [explained(i, label, pred, img if i != 3 else tmp_path / "gone.png", rng)
            for i, (label, pred) in enumerate(pairs)]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def test_terminal_view_lists_both_classes(preds):
    path, recs = preds
    res = invoke("explain", "text", path, "--id", "im1")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "im1" in out and "predicted: Cardinal" in out and "true: Mallard" in out
    for e in recs[1]["explanation"] + recs[1]["explanation_true"]:
        assert e["descriptor"] in out and f"{e['score']:.4f}" in out
    assert "im0" not in out


def test_bars_grow_with_scores(preds):
    _, recs = preds
    bars = [T._bar(v, 0.1, 0.4, 20) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert [len(b.rstrip(" ")) for b in bars] == sorted(len(b.rstrip(" ")) for b in bars)
    assert bars[0] == "" and bars[3] == "█" * 20 and bars[4] == bars[3]


def test_selection_wrong_limit_and_order(preds):
    path, recs = preds
    res = invoke("explain", "text", path, "--wrong")
    assert res.exit_code == 0, res.output
    shown = re.findall(r"^(im\d+) ", res.stdout, flags=re.M)
    assert shown == [r["id"] for r in recs if r["pred"] != r["label"]]
    res = invoke("explain", "text", path, "--limit", "1")
    assert re.findall(r"^(im\d+) ", res.stdout, flags=re.M) == ["im0"]
    res = invoke("explain", "text", path, "--id", "im2", "--id", "im0")
    assert re.findall(r"^(im\d+) ", res.stdout, flags=re.M) == ["im2", "im0"]


def test_top_limits_descriptors(preds):
    path, recs = preds
    res = invoke("explain", "text", path, "--id", "im0", "--top", "1")
    assert res.exit_code == 0
    assert recs[0]["explanation"][0]["descriptor"] in res.stdout
    assert recs[0]["explanation"][1]["descriptor"] not in res.stdout


def test_png_figures(preds, tmp_path):
    path, recs = preds
    out = tmp_path / "figs"
    res = invoke("explain", "text", path, "--plots", out)
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*.png"))
    assert [f.stem for f in files] == sorted(r["id"] for r in recs)  # im3's image is missing: still drawn
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    wrong, right = Image.open(out / "im1.png"), Image.open(out / "im0.png")
    assert wrong.size[0] > right.size[0]  # a wrong prediction gets a second panel (the true class)
    assert not list(out.glob("*.tmp"))


def test_figure_names_are_safe_and_distinct(tmp_path):
    rng = np.random.default_rng(1)
    recs = [explained(0, "Cardinal", "Cardinal", tmp_path / "x.png", rng) for _ in range(2)]
    recs[0]["id"], recs[1]["id"] = "a/b c", "a b/c"
    paths = T.save_figures(recs, tmp_path / "f")
    assert len({p.name for p in paths}) == 2 and all(p.parent == tmp_path / "f" for p in paths)


def test_bad_input(preds, tmp_path):
    path, recs = preds
    res = invoke("explain", "text", path, "--id", "nope")
    assert res.exit_code == 2 and "'nope'" in res.stderr
    plain = tmp_path / "clip.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("explanation")}) + "\n"
                             for r in recs))
    res = invoke("explain", "text", plain, "--plots", tmp_path / "none")
    assert res.exit_code == 2 and "--method cbd" in res.stderr and not (tmp_path / "none").exists()
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in recs))
    res = invoke("explain", "text", nolabel, "--wrong")
    assert res.exit_code == 2 and "label" in res.stderr
    res = invoke("explain", "text", path, "--top", "0")
    assert res.exit_code == 2


def test_markup_in_ids_and_classes_is_shown_as_written(tmp_path):
    """Ids and class names are data: "[/bold]" must not raise, "[draft]" must not vanish, "$" is no
    mathtext in the figures."""
    rng = np.random.default_rng(2)
    rec = explained(0, "Snowy [bold]Owl", "Mallard [/bold]", tmp_path / "none.png", rng)
    rec["id"] = "img[draft] [/bold] $\\frac{x$"
    rec["explanation"][0]["descriptor"] = "a [red]tail[/red] worth $5"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    res = invoke("explain", "text", path, "--plots", tmp_path / "figs")
    assert res.exit_code == 0, res.output
    for text in (rec["id"], "predicted: Mallard [/bold]", "true: Snowy [bold]Owl", "a [red]tail[/red] worth $5"):
        assert text in res.stdout, text
    assert "true Snowy [bold]Owl wrong" in " ".join(res.stdout.split())  # the header, however it wraps
    [png] = (tmp_path / "figs").glob("*.png")
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_figure_of_an_unreadable_image_says_so(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rec = explained(0, "Cardinal", "Cardinal", bad, np.random.default_rng(3))
    assert T._load_image(bad) is None and T._load_image(tmp_path / "missing.png") is None
    texts = [t.get_text() for ax in T.figure(rec).axes for t in ax.texts]
    assert "image not available" in texts


def test_wrong_with_nothing_wrong_is_not_an_error(tmp_path):
    from typer.testing import CliRunner

    from vlmtools.cli.app import app

    pred = tmp_path / "p.jsonl"
    pred.write_text('{"id": "a", "label": "x", "pred": "x", "topk": [{"class": "x", "score": 0.3}], '
                    '"explanation": [{"descriptor": "red", "kind": "object", "score": 0.3}]}\n')
    result = CliRunner().invoke(app, ["explain", "text", str(pred), "--wrong"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "no misclassified image" in result.stderr


def test_bars_start_at_zero_and_names_drop_image_suffixes(tmp_path):
    """A descriptor at 0.45 is drawn as 0.45 from the origin 0, not as nothing above the lowest score;
    an unlabelled image's id "x.png" gives x.png, not x.png.png; the terminal legend names the kinds the
    figure's legend names."""
    rng = np.random.default_rng(3)
    rec = explained(0, "Cardinal", "Cardinal", tmp_path / "none.png", rng)
    rec.pop("label")
    rec["id"] = "photo01.JPG"
    rec["explanation"] = [{"descriptor": "low", "kind": "object", "score": 0.45},
                          {"descriptor": "high", "kind": "background", "score": 0.5}]
    view = T.terminal_view(rec, width=20)
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(view)
    text = console.export_text()
    low_bar = next(line for line in text.splitlines() if line.startswith("low"))
    assert low_bar.count("█") >= 17  # 0.45 of 0.5 on a 20-character bar starting at 0
    assert "bars from 0 to" in text and "object descriptor" in text and "background descriptor" in text
    fig = T.figure(rec)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["class score", "object descriptor", "background descriptor"]
    bars_ax = fig.axes[1]
    assert bars_ax.get_xlim()[0] == 0.0 and all(p.get_x() == 0.0 for p in bars_ax.patches)
    assert {"0.450", "0.500"} <= {t.get_text() for t in bars_ax.texts}  # the value on each bar
    [path] = T.save_figures([rec], tmp_path / "f")
    assert path.name == "photo01.png"


def test_confusion_plot_of_many_classes_has_a_key(tmp_path):
    from vlmtools import evaluate as E

    classes = [f"class {i}" for i in range(E.KEY_ABOVE + 5)]
    recs = [{"label": c, "pred": c} for c in classes]
    names, matrix = E.confusion_matrix(recs)
    key = "\n".join(t.get_text() for t in E.confusion_figure(names, matrix).texts)
    assert all(f"{i:>4}  {name}" in key for i, name in enumerate(names))
    E.plot_confusion(tmp_path / "c.png", names, matrix)
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG"
