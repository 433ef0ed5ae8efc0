"""The `vlmtools` command: one typer app; each command group registers itself from its own module."""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from vlmtools.cli import coerce
from vlmtools.cli import help as help_style

# -q/--quiet and -v/--verbose are accepted anywhere on the line (`vlmtools embed images M -o S -q`).
GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose"}


def _takes_value(command, token: str) -> bool:
    """Whether ``token`` is an option of ``command`` that consumes the next argument."""
    for param in getattr(command, "params", ()):
        if token in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
            return not getattr(param, "is_flag", False) and not getattr(param, "count", False) \
                and getattr(param, "param_type_name", "") == "option"
    return False


def split_global_flags(root, args: list[str]) -> tuple[list[str], set[str]]:
    """Take -q/-v out of ``args`` wherever they stand, except as another option's value or after `--`."""
    kept, found, command, i = [], set(), root, 0
    while i < len(args):
        token = args[i]
        if token == "--":
            kept.extend(args[i:])
            break
        if token in GLOBAL_FLAGS:
            found.add(GLOBAL_FLAGS[token])
        else:
            kept.append(token)
            commands = getattr(command, "commands", None)
            if commands is not None and not token.startswith("-"):
                default = getattr(command, "default_command", "")
                command = commands.get(token) or commands.get(default) or command
            elif "=" not in token and _takes_value(command, token) and i + 1 < len(args):
                kept.append(args[i + 1])
                i += 1
        i += 1
    return kept, found


# Plain help, argument names in capitals, values named (FILE, N, clip|cbd); flags show no value.
help_style.install()
coerce.install()  # option values without pydantic where typer's result is certain


class RootGroup(TyperGroup):
    def parse_args(self, ctx, args):
        args, found = split_global_flags(self, list(args))
        from vlmtools.console import set_quiet, set_verbose

        if "quiet" in found:
            set_quiet(True)
        if "verbose" in found:
            set_verbose(True)
        return super().parse_args(ctx, args)


HELP = ("Composable commands for explainable fine-grained image classification with CLIP-style "
        "models and LLM-written class descriptions. Data goes to stdout, messages to stderr. "
        "-q/--quiet and -v/--verbose work anywhere on the line; conventions: man vlmtools.")

# Each module defines register(app). Modules that are not written yet are skipped, so the app grows
# as command groups land.
COMMAND_MODULES = ["models", "data", "embed", "index", "search", "describe", "classify", "eval_table", "train",
                   "explain", "explain_box", "synth", "demo", "store", "report", "batch"]

# Which modules register each top-level command (several fill one group: `eval`, `explain`, `train`), so
# that `vlmtools CMD ...` imports and builds only those: typer builds every registered command's options
# at start-up, ~60 ms for all of them against ~10 ms for one. tests/test_cli_basics.py checks this table
# against what the modules register.
COMMAND_OWNERS = {
    "models": ("models",), "data": ("data",), "embed": ("embed",), "index": ("index",),
    "search": ("search",), "serve": ("search",), "describe": ("describe",), "descriptors": ("describe",),
    "classify": ("classify",), "eval": ("classify", "eval_table", "explain"),
    "explain": ("classify", "explain", "explain_box"), "train": ("train", "explain"), "synth": ("synth",),
    "demo": ("demo",), "store": ("store",), "report": ("report",), "batch": ("batch",),
}


def _print_version(value: bool) -> None:
    if value:
        import vlmtools

        typer.echo(vlmtools.__version__)
        raise typer.Exit()


def _root(
    # RootGroup.parse_args takes these out of the line wherever they are; they are declared here for --help.
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summaries on stderr (anywhere "
                               "on the line; also VLMTOOLS_QUIET=1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr, and a traceback "
                                 "with internal errors (anywhere on the line)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_print_version, is_eager=True),
) -> None:
    pass


def make_app(modules=COMMAND_MODULES) -> typer.Typer:
    """The `vlmtools` typer app with the commands of ``modules`` (names in COMMAND_MODULES, in its order)."""
    new = typer.Typer(name="vlmtools", help=HELP, no_args_is_help=True, add_completion=True,
                      pretty_exceptions_enable=False, cls=RootGroup,
                      context_settings={"help_option_names": ["-h", "--help"]})
    new.callback()(_root)
    for name in COMMAND_MODULES:
        if name not in modules:
            continue
        try:
            module = importlib.import_module(f"vlmtools.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vlmtools.cli.{name}":
                continue
            raise
        module.register(new)
    help_style.plain_help(new)
    return new


def __getattr__(name: str):
    # `app` (every command) is built on first use: main() builds only the command it runs
    if name == "app":
        globals()["app"] = built = make_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def app_for(argv: list[str]) -> typer.Typer:
    """The app main() runs for ``argv``: only the modules of its command where the command is known (not
    for help on the whole tool, an unknown command, or shell completion, which need every command)."""
    import os

    if any(key.startswith("_VLMTOOLS_COMPLETE") for key in os.environ):
        return make_app()
    command = next((a for a in argv if a not in GLOBAL_FLAGS), None)
    owners = COMMAND_OWNERS.get(command)
    return make_app(owners) if owners else make_app()


def main() -> None:
    import os
    import sys

    # OpenMP threads that spin between parallel regions starve the image-decoding worker processes and
    # anything else on the cores (4x slower `embed images` on 2 cores); sleeping threads cost the model
    # almost nothing. Read by libgomp when torch loads, so it must be set before any torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vlmtools.cli.common import guard_std_streams, handle_errors

    guard_std_streams()
    # What escapes the commands' own handlers (option parsing, group callbacks) gets the same treatment.
    handle_errors(lambda: app_for(sys.argv[1:])(prog_name="vlmtools"))()
