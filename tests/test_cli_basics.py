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


def _shape(cmd):
    """A command's tree: (name, params' names, its subcommands' shapes), to compare two builds of it."""
    return (cmd.name, tuple(p.name for p in cmd.params),
            tuple(sorted((n, _shape(c)) for n, c in getattr(cmd, "commands", {}).items())))


def test_a_command_run_alone_is_the_whole_apps_command():
    """main() builds only the modules that register the command it runs (COMMAND_OWNERS): for every
    top-level command that build has it exactly as the whole app has it, and every module registers
    only commands the table gives it."""
    import typer.main

    from vlmtools.cli.app import COMMAND_MODULES, COMMAND_OWNERS, app_for, make_app

    whole = typer.main.get_command(app).commands
    assert set(whole) == set(COMMAND_OWNERS)
    for name, owners in COMMAND_OWNERS.items():
        alone = typer.main.get_command(app_for(["-q", name, "--help"])).commands
        assert _shape(alone[name]) == _shape(whole[name]), name
    for module in COMMAND_MODULES:
        registered = set(typer.main.get_command(make_app([module])).commands)
        assert registered == {n for n, owners in COMMAND_OWNERS.items() if module in owners}, module
    assert set(typer.main.get_command(app_for(["--version"])).commands) == set(whole)
    assert set(typer.main.get_command(app_for(["no-such-command"])).commands) == set(whole)


def test_main_runs_a_command_and_the_whole_tool_help():
    """Through main() in a fresh process: a command built alone runs (with -q before it), and the tool's
    help still lists every command."""
    out = run_cli("-q", "models", "--json")
    assert out.returncode == 0 and {"model": "vlmtools-micro", "pretrained": "vlmtools", "cached": True,
                                    "source": "vlmtools"} in [json.loads(line) for line in out.stdout.splitlines()]
    top = run_cli("--help")
    assert top.returncode == 0
    assert all(f" {name} " in top.stdout or f" {name}\n" in top.stdout for name in ("classify", "train", "serve"))
