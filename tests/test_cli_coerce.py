"""vlmtools.cli.coerce: option values converted without pydantic give typer's own result, or typer's own error."""

import enum
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer._coercion import build_runtime_param
from typer._click import Context
from typer._click.exceptions import BadParameter

from vlmtools.cli.app import app
from vlmtools.cli.coerce import converter

SAMPLES = {
    str: ["abc", "", "-", "a b", "ünï", "5"],
    int: ["5", "-3", "0", "1", "2", "65535", "65536", "007", "5.0", "x", "", " 5", "1_000", "99999999999999999999", 7],
    bool: [True, False, "true", "0", "", "x"],
    float: ["0.5", "-2", "1e-3", "1E+2", "3.", ".5", "inf", "nan", "x", "", 2, 0.25],
    Path: ["some/dir", "-", "", "~/x", "/tmp"],
}


def _params():
    """(command path, click parameter) for every parameter of every vlmtools command."""
    def walk(cmd, path):
        for p in getattr(cmd, "params", []):
            if getattr(p, "type_descriptor", None) is not None:
                yield path, cmd, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")
    yield from walk(typer.main.get_command(app), "vlmtools")


def _samples(annotation):
    from typing import get_args, get_origin

    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return [tuple(v for v in _samples(item)[:2]), tuple(_samples(item)[-2:]), ("a",), "not a list"]
    choices = list(annotation) if isinstance(annotation, type) and issubclass(annotation, enum.Enum) \
        else list(get_args(annotation))
    if choices:
        values = [c.value if isinstance(c, enum.Enum) else c for c in choices]
        return values + [v.upper() for v in values if isinstance(v, str)] + ["no-such-choice", ""] \
            + [c for c in choices if isinstance(c, enum.Enum)]
    return SAMPLES.get(annotation, [])


def _outcome(runtime, value, param, ctx):
    try:
        out = runtime._coerce_value(value, param=param, ctx=ctx)
        return "ok", type(out), repr(out)  # repr: nan equals nan
    except BadParameter as exc:
        return "error", exc.format_message()


def test_fast_conversion_equals_typers_for_every_option_of_every_command(tmp_path):
    """Every parameter the fast path takes (all but a few): for valid and invalid values alike, the result
    (value and type) or the error message is typer's adapter's, word for word."""
    (tmp_path / "f").write_text("x")
    checked = kinds = 0
    for path, cmd, param in _params():
        desc = param.type_descriptor
        convert = converter(desc.annotation, desc.parameter_info)
        if convert is None:
            continue
        kinds += 1
        ctx = Context(cmd, info_name=path)
        fast, stock = param.get_runtime_param(), build_runtime_param(desc)
        assert type(fast).__name__ == "FastRuntimeParam", path
        values = _samples(desc.annotation)
        if desc.annotation is Path:
            values = values + [str(tmp_path / "f"), str(tmp_path), str(tmp_path / "missing")]
        for value in values:
            assert _outcome(fast, value, param, ctx) == _outcome(stock, value, param, ctx), (path, param.name, value)
            checked += 1
    assert kinds > 400 and checked > 2000  # every parameter of the CLI, not a handful


def test_the_fast_path_takes_the_common_kinds():
    """str, int, float, bool, Path, choices (Enum, Literal), bounded numbers and lists of them go without
    pydantic; a clamped number goes to typer's adapter."""
    from typing import List, Literal

    from typer.models import OptionInfo

    plain = OptionInfo()
    for annotation in (str, int, float, bool, Path, Literal["a", "b"], List[str], List[Path]):
        assert converter(annotation, plain) is not None, annotation
    assert converter(int, OptionInfo(min=1)) is not None
    assert converter(int, OptionInfo(min=1, clamp=True)) is None


def test_classify_from_stores_needs_no_pydantic(tmp_path):
    """`vlmtools classify` from stores: options parsed, no pydantic (nor torch) imported."""
    import numpy as np

    from tests.conftest import run_cli_modules
    from vlmtools import classify as C
    from vlmtools.store import write_arrays

    model = {"name": "ViT-B-32", "pretrained": "openai"}
    rng = np.random.default_rng(0)
    classes = ["ash tit", "blue tit"]
    write_arrays(tmp_path / "img", rng.normal(size=(6, 8)), [{"id": str(i), "label": classes[i % 2]} for i in range(6)],
                 kind="image", model=model)
    prompts = C.clip_texts(classes, ["a photo of a {}."])
    write_arrays(tmp_path / "txt", rng.normal(size=(2, 8)), [{"id": str(i), "text": t} for i, t in enumerate(prompts)],
                 kind="text", model=model, extra_info={"source": "texts"})
    proc, loaded = run_cli_modules("classify", tmp_path / "img", "--text-store", tmp_path / "txt", "--method", "clip",
                                   "-k", "2", "--precision", "fp32", "-o", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    bad, loaded = run_cli_modules("classify", tmp_path / "img", "--text-store", tmp_path / "txt", "-k", "two")
    assert bad.returncode == 2 and "Input should be a valid integer" in bad.stderr  # typer's message, via its adapter
    assert loaded == ["pydantic"]


def test_quiet_classify_from_stores_loads_no_console(tmp_path):
    """rich (the console) loads on the first message: a quiet classify from stores prints nothing and never
    imports it (nor click); a run with something to say imports it and says it."""
    import numpy as np

    from vlmtools.store import write_arrays

    model = {"name": "ViT-B-32", "pretrained": "openai"}
    rng = np.random.default_rng(0)
    write_arrays(tmp_path / "img", rng.normal(size=(4, 8)), [{"id": str(i), "label": "ab"[i % 2]} for i in range(4)],
                 kind="image", model=model)
    write_arrays(tmp_path / "txt", rng.normal(size=(2, 8)), [{"id": str(i), "text": f"a photo of a {c}."}
                                                             for i, c in enumerate("ab")],
                 kind="text", model=model, extra_info={"source": "texts"})
    report = ("import atexit, sys\n"
              "atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join(sorted({m.split('.')[0] for m in "
              "sys.modules} & {'rich', 'click'})) + '\\n'))\n"
              "sys.argv = ['vlmtools'] + sys.argv[1:]\nfrom vlmtools.cli.app import main\nmain()\n")

    def run(*args):
        proc = subprocess.run([sys.executable, "-c", report, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        return proc, proc.stderr.rsplit("MODULES", 1)[1].split()
    args = ["classify", tmp_path / "img", "--text-store", tmp_path / "txt", "-o", tmp_path / "p.jsonl"]
    quiet, loaded = run("-q", *args)
    assert quiet.returncode == 0 and loaded == [], quiet.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4
    said, loaded = run(*args)
    assert said.returncode == 0 and "classified all 4 rows" in said.stderr and loaded == ["rich"]
    bad, loaded = run("-q", "classify", tmp_path / "missing")
    assert bad.returncode == 2 and "no such store directory" in bad.stderr and loaded == ["rich"]
