import json
import subprocess
import sys

from typer.testing import CliRunner

from vlmtools.cli.app import app
from tests.conftest import run_cli

runner = CliRunner()

HEAVY = ("torch", "open_clip", "faiss", "numpy", "openai", "matplotlib")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys,json;print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_no_heavy_modules():
    code = ("import sys\nfrom vlmtools.cli.app import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner()\n"
            "for args in (['--help'], ['embed', '--help'], ['embed', 'images', '--help'], ['index', '--help'],"
            " ['search', '--help'], ['data', '--help'], ['describe', '--help'], ['classify', '--help'],"
            " ['eval', '--help'], ['report', '--help'], ['serve', '--help'], ['synth', '--help'], ['demo', '--help'], ['models', '--help']):\n"
            "    r.invoke(app, args)\n")
    loaded = _modules_after(code)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    import vlmtools

    assert result.stdout.strip() == vlmtools.__version__
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("embed", "models"):
        assert cmd in result.stdout


def test_python_dash_m_entry_point():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip()


def test_models_lists_packaged_models():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = {r["model"] for r in rows}
    assert {"vlmtools-tiny", "vlmtools-tiny-coca"} <= names
    assert all(r["cached"] for r in rows)
