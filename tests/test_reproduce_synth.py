"""examples/synth/reproduce_all: every step is a command the CLI accepts, --dry-run lists them, and the
tables pair the seeds' predictions right. (CI smoke-runs the whole of it with --quick: .ci/run.)"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from vlmtools.cli.app import app

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "synth" / "reproduce_all.py"


@pytest.fixture(scope="module")
def ra():
    spec = importlib.util.spec_from_file_location("reproduce_all", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_all"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("reproduce_all", None)


def parse(argv: list[str]) -> None:
    """Parse ``vlmtools ARGV`` down to its command (options, choices, types) without running it."""
    cmd, parent, name, args = typer.main.get_command(app), None, "vlmtools", list(argv)
    while isinstance(cmd, TyperGroup):
        sub = args.pop(0)
        parent = cmd.context_class(cmd, info_name=name, parent=parent)
        cmd, name = cmd.get_command(parent, sub), sub
        assert cmd is not None, f"no command {sub!r}: {argv}"
    cmd.make_context(name, args, parent=parent)


def test_every_step_is_a_command_the_cli_accepts(ra):
    for cfg in (ra.Config(), ra.QUICK):
        steps = ra.seed_steps(3, cfg)
        assert {st.study for st in steps} == {"world", *ra.STUDIES}
        for st in steps:
            if st.python is None:
                parse(st.argv)


def test_the_parse_check_can_fail():
    parse(["classify", "store", "--method", "cbd"])
    with pytest.raises(Exception, match="No such option: --no-such-option"):
        parse(["classify", "store", "--no-such-option"])
    with pytest.raises(Exception, match="no-such-method"):
        parse(["classify", "store", "--method", "no-such-method"])
    with pytest.raises(Exception, match="Missing (argument|parameter)"):
        parse(["train", "ala"])
    with pytest.raises(AssertionError, match="no command"):
        parse(["train", "no-such-head", "x"])


def test_dry_run_lists_the_steps_of_every_seed(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--quick", "--seeds", "3", "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    makes = [x for x in lines if x.startswith("vlmtools synth make")]
    assert [m.split()[3] for m in makes] == ["s0/world", "s1/world", "s2/world"]
    assert all("--preset cub-like" in m and "--domain both" in m for m in makes)
    assert (tmp_path / "out" / "pipeline.sh").read_text().count("vlmtools synth make") == 3
    assert not (tmp_path / "out" / "s0").exists()  # nothing ran
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--studies", "002", "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--studies" in r.stderr


def _predictions(path: Path, right: list[bool]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{i:03d}", "label": "a", "pred": "a" if ok else "b",
                                        "domain": "photo"}) + "\n" for i, ok in enumerate(right)))


def test_study_000_pairs_each_image_with_itself_across_rows_and_seeds(ra, tmp_path):
    # seed 0: names right on images 0-3, descriptors on 2-9; seed 1: names on 0-9, descriptors on 0-4
    right = {0: {"names": [i < 4 for i in range(10)], "cbd": [i >= 2 for i in range(10)]},
             1: {"names": [True] * 10, "cbd": [i < 5 for i in range(10)]}}
    for s, rows in right.items():
        for key in ("names", "cbd", "exemplar", "background"):
            _predictions(tmp_path / f"s{s}" / "pred" / f"000-{key}.jsonl", rows.get(key, rows["cbd"]))
    _predictions(tmp_path / "s2" / "pred" / "000-names.jsonl", [False] * 10)  # seed 2 has not finished 000
    result, over = ra.tables(tmp_path, [0, 1, 2], ra.Config(), studies=("000",))
    assert over == {"000": [0, 1]}
    rows = {r[0]: r for r in result["000"]}
    assert rows["CLIP (class names)"][1] == "70.00 ± 42.43"  # 40% and 100%
    assert rows["CBD (vague descriptors)"][1] == "65.00 ± 21.21"  # 80% and 50%
    # only names right: seed 0 images 0-1, seed 1 images 5-9; only descriptors: seed 0 images 4-9
    assert rows["CBD (vague descriptors)"][3].startswith("7 / 6 / ")
    assert rows["domain exemplar (object descriptors)"][3] == "0 / 0 / 1"


def test_paired_bootstrap_interval_and_p(ra):
    import numpy as np

    mean, lo, hi, p = ra.paired_bootstrap(np.array([0.1, 0.2, 0.3, 0.4] * 5))
    assert mean == pytest.approx(0.25) and 0.1 <= lo < 0.25 < hi <= 0.4 and p == 0.0  # never at or below 0
    mean, lo, hi, p = ra.paired_bootstrap(np.array([1.0, -1.0] * 10))
    assert mean == 0.0 and lo < 0 < hi and p == 1.0
