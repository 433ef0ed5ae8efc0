"""The `vlmtools` command: one typer app; each command group registers itself from its own module."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="vlmtools",
    help="Composable commands for explainable fine-grained image classification with CLIP-style "
         "models and LLM-written class descriptions. Data goes to stdout, messages to stderr.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module defines register(app). Modules that are not written yet are skipped, so the app grows
# as command groups land.
COMMAND_MODULES = ["models", "data", "embed", "index", "search", "describe", "classify", "train", "explain", "synth",
                   "demo", "store"]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"vlmtools.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vlmtools.cli.{name}":
                continue
            raise
        module.register(app)


def _print_version(value: bool) -> None:
    if value:
        import vlmtools

        typer.echo(vlmtools.__version__)
        raise typer.Exit()


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries on stderr."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_print_version, is_eager=True),
) -> None:
    if quiet:
        from vlmtools.console import set_quiet

        set_quiet(True)


_register_all()


def main() -> None:
    from vlmtools.cli.common import guard_std_streams, handle_errors

    guard_std_streams()
    # What escapes the commands' own handlers (option parsing, group callbacks) gets the same treatment.
    handle_errors(app)()
