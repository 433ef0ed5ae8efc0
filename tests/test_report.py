"""`vlmtools report RUN_DIR`: the HTML page's numbers against eval's, its gallery and plots; and the page
as a headless Chromium renders it (skipped where Debian's chromium is not installed)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.test_eval import fake_predictions
from tests.test_explain import explained
from vlmtools.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "predictions").mkdir()
    (run / "eval").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(run / "bird.png")
    pairs = [("Cardinal", "Cardinal"), ("Mallard", "Cardinal"), ("Snowy Owl", "Snowy Owl"), ("Mallard", "Snowy Owl")]
    cbd = [explained(i, label, pred, "bird.png", rng) for i, (label, pred) in enumerate(pairs)]
    (run / "predictions" / "cbd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cbd))
    clip = fake_predictions(n=60)
    (run / "predictions" / "clip.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clip))
    clip_b = fake_predictions(n=60, seed=0, skill=0.9)
    (run / "predictions" / "clip-b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clip_b))
    res = invoke("eval", run / "predictions" / "clip.jsonl", "--by", "domain", "-o", run / "eval" / "clip.jsonl",
                 "--plots", run / "eval" / "plots")
    assert res.exit_code == 0, res.output
    res = invoke("eval", "compare", run / "predictions" / "clip.jsonl", run / "predictions" / "clip-b.jsonl",
                 "-o", run / "eval" / "compare.jsonl")
    assert res.exit_code == 0, res.output
    res = invoke("report", run, "-o", run / "report.html", "--gallery", "5")
    assert res.exit_code == 0, res.output
    return run


def cell(value):
    return f"{100 * value:.2f}"


def test_page_holds_the_numbers_gallery_and_plots(run_dir):
    page = (run_dir / "report.html").read_text()
    head = json.loads((run_dir / "eval" / "clip.jsonl").read_text().splitlines()[0])
    assert f"<td class=num>{cell(head['acc1'])}</td>" in page
    assert f"<td class=num>{cell(head['mean_per_class_recall'])}</td>" in page
    assert "by domain" in page and "painting" in page
    cbd_acc = 2 / 4  # evaluated on the spot: no eval file names predictions/cbd.jsonl
    assert f"<td>predictions/cbd.jsonl</td>" in page and f"<td class=num>{cell(cbd_acc)}</td>" in page
    compare = json.loads((run_dir / "eval" / "compare.jsonl").read_text())
    assert f"{compare['mcnemar']['p_exact']:.3g}" in page
    assert page.count("Explained wrong answers") == 1
    assert len(re.findall(r"<figcaption>predictions/cbd.jsonl: im\d", page)) == 2  # the two wrong answers
    assert "<figcaption>eval/plots/clip.confusion.png<br>confusion matrix (rows normalized)" in page
    assert "src=\"file:" not in page and page.count("data:image/png;base64,") == 2 + 3  # gallery + plots + bird


def test_bad_run_dirs(tmp_path):
    res = invoke("report", tmp_path / "missing")
    assert res.exit_code == 2 and "no such directory" in res.output
    res = invoke("report", tmp_path, "-o", tmp_path / "r.html")
    assert res.exit_code == 2 and "no eval results" in res.output and not (tmp_path / "r.html").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium (Debian package) is not installed")
def test_page_in_headless_chromium(run_dir, tmp_path):
    page = run_dir / "report.html"
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 5  # something drawn, not a blank page
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    head = json.loads((run_dir / "eval" / "clip.jsonl").read_text().splitlines()[0])
    assert cell(head["acc1"]) in dom and "Explained wrong answers" in dom
    rendered = dom.count("<img")
    assert rendered == 5


def test_sections_by_kind_with_a_sample_of_maps(run_dir, tmp_path):
    """Plots of eval and training come before the explanations, and a maps directory of 60 overlays shows
    a sample, not 60 figures crowding out the rest (the PNGs' own Description chunk says their kind)."""
    import shutil as sh

    run = tmp_path / "run"
    sh.copytree(run_dir, run)
    maps = run / "maps" / "ala"
    maps.mkdir(parents=True)
    (maps / "info.json").write_text(json.dumps({"format": "vlmtools.maps/1", "method": "ala"}))
    for i in range(60):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(maps / f"a{i:02d}.png")
    (run / "train").mkdir()
    from matplotlib.figure import Figure

    from vlmtools.evaluate import _save

    fig = Figure()
    fig.subplots().set_title("probe head zz: training curve")
    _save(fig, run / "train" / "zz.curve.png", kind="train")
    res = invoke("report", run, "-o", run / "r.html", "--gallery", 0)
    assert res.exit_code == 0, res.output
    page = (run / "r.html").read_text()
    order = [page.index(h) for h in ("<h2>Results</h2>", "<h2>Evaluation plots</h2>", "<h2>Training plots</h2>",
                                     "<h2>Saliency maps (a sample)</h2>")]
    assert order == sorted(order)
    assert page.count("<figcaption>maps/ala/a") == 6 and "maps/ala: 6 of 60 overlays shown" in page
    assert "<figcaption>train/zz.curve.png<br>probe head zz: training curve</figcaption>" in page


def test_links_are_relative_and_symlinks_out_of_the_run_dir_are_not_read(run_dir, tmp_path, monkeypatch):
    import shutil as sh

    import vlmtools.report as R

    run = tmp_path / "run"
    sh.copytree(run_dir, run)
    (run / "javascript:alert(1).png").write_bytes((run / "bird.png").read_bytes())
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (4, 4)).save(secret / "private.png")
    (secret / "preds.jsonl").write_text((run / "predictions" / "cbd.jsonl").read_text())
    (run / "leak.png").symlink_to(secret / "private.png")
    (run / "leak.jsonl").symlink_to(secret / "preds.jsonl")
    (run / "leakdir").symlink_to(secret, target_is_directory=True)
    monkeypatch.setattr(R, "MAX_PNG_BYTES", 10)  # every PNG is linked, not embedded
    out = tmp_path / "pages"
    out.mkdir()
    res = invoke("report", run, "-o", out / "r.html", "--gallery", 0)
    assert res.exit_code == 0, res.output
    page = (out / "r.html").read_text()
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith(("./", "../")) and ":" not in h for h in hrefs), hrefs
    assert "../run/javascript%3Aalert%281%29.png" in hrefs  # relative to where the page is
    assert "private.png" not in page and "leak" not in page and "preds.jsonl" not in page
    assert "3 path(s) reached through symbolic links that leave run were left out" in page


def test_deeply_nested_json_in_the_run_dir_is_bad_input(run_dir, tmp_path):
    import shutil as sh

    run = tmp_path / "run"
    sh.copytree(run_dir, run)
    (run / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    res = invoke("report", run, "-o", tmp_path / "r.html")
    assert res.exit_code == 2 and "deep.json" in res.output and not (tmp_path / "r.html").exists()


def test_virtual_environments_and_hidden_folders_are_not_read(run_dir, tmp_path):
    """`vlmtools report .` in a checkout: the venv's own PNGs (matplotlib's icons) are no results."""
    import shutil as sh

    run = tmp_path / "run"
    sh.copytree(run_dir, run)
    for d in (run / ".venv" / "lib", run / "env" / "lib", run / ".git"):
        d.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(d / "icon.png")
    (run / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    res = invoke("report", run, "-o", run / "r.html", "--gallery", 0)
    assert res.exit_code == 0, res.output
    page = (run / "r.html").read_text()
    assert "icon.png" not in page and "eval/plots/clip.confusion.png" in page
