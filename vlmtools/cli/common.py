"""Shared CLI plumbing: error mapping, common options."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import typer

from vlmtools.errors import VlmError


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into a one-line message on stderr and an exit code (2 for bad input)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VlmError as exc:
            from vlmtools.console import error

            error(str(exc))
            raise typer.Exit(exc.exit_code)
        except UnicodeDecodeError as exc:
            from vlmtools.console import error

            error(f"input is not UTF-8 text ({exc.reason} at byte {exc.start})")
            raise typer.Exit(2)
        except BrokenPipeError:
            # `vlmtools search ... | head`: the reader went away; that is not an error.
            sys.stderr.close()
            raise typer.Exit(0)
        except OSError as exc:  # permission denied, disk full, ...: say so in one line
            from vlmtools.console import error

            where = f"{exc.filename}: " if exc.filename else ""
            error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            from vlmtools.console import error

            error("interrupted")
            raise typer.Exit(130)
        except Exception as exc:
            if type(exc).__module__.startswith("typer"):  # Exit, Abort, usage errors: typer's own business
                raise
            from vlmtools.console import console, error, is_verbose

            if is_verbose():
                console.print_exception()
            error(f"internal error: {type(exc).__name__}: {exc}" + ("" if is_verbose() else
                  " (run with -v for the traceback; please report it)"))
            raise typer.Exit(3)

    wrapper.handles_errors = True  # the conventions test checks that every command has this wrapper
    return wrapper


# ----------------------------------------------------------------------------- shell completion
# Completers run in the shell's completion call: keep them cheap (no torch/open_clip imports).

def complete_models(incomplete: str) -> list[str]:
    from vlmtools.models import known_model_names

    return [n for n in known_model_names() if n.lower().startswith(incomplete.lower())] + \
        [s for s in ("hf-hub:", "local-dir:") if s.startswith(incomplete)]


def complete_stores(incomplete: str) -> list[str]:
    """Directories holding a store (an info.json) under the path typed so far, then other directories."""
    import glob
    import os

    dirs = [d.rstrip("/") for d in glob.glob(os.path.expanduser(incomplete) + "*/")]
    stores = [d for d in dirs if os.path.exists(os.path.join(d, "info.json"))]
    return sorted(stores) + sorted(d + "/" for d in dirs if d not in stores)


def complete_styles(incomplete: str) -> list[str]:
    from vlmtools.describe.styles import STYLES

    return [s for s in STYLES if s.startswith(incomplete)]


def store_argument(help: str):
    """A STORE directory argument with store-path completion."""
    return typer.Argument(..., metavar="STORE", help=help, autocompletion=complete_stores)


def store_option(*names: str, help: str):
    return typer.Option(None, *names, metavar="STORE", help=help, autocompletion=complete_stores)


ModelOpt = typer.Option(None, "--model", "-m", autocompletion=complete_models, help="open_clip model: ViT-B-32, hf-hub:org/repo, "
                        "local-dir:/path, vlmtools-micro, ... (default: ViT-B-32, or the store's model)")
PretrainedOpt = typer.Option(None, "--pretrained", "-p", help="pretrained tag (openai, laion2b_s34b_b79k, ...), "
                             "a checkpoint path, or 'none' for random weights (default: openai; 'vlmtools' "
                             "for packaged models)")
DeviceOpt = typer.Option("auto", "--device", metavar="auto|cpu|cuda[:N]", help="Where to run the model.",
                         autocompletion=lambda incomplete: [d for d in ("auto", "cpu", "cuda") if
                                                            d.startswith(incomplete)])


def model_spec(model: Optional[str], pretrained: Optional[str]):
    from vlmtools.models import ModelSpec

    return ModelSpec.parse(model, pretrained)


# ----------------------------------------------------------------------------- command groups
# Several CLI modules may add commands to one group (e.g. `explain text` here, `explain visual` later):
# `subgroup` returns the group registered under that name, creating it the first time.

from typer.core import TyperGroup  # noqa: E402  (typer only: keeps `--help` light)


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it is no subcommand name, goes to ``default_command``:
    `vlmtools eval PRED.jsonl` runs `vlmtools eval predictions PRED.jsonl`."""

    default_command = ""

    def parse_args(self, ctx, args):
        if args and self.default_command and args[0] not in self.commands \
                and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def subgroup(app: typer.Typer, name: str, help: str, default_command: str | None = None) -> typer.Typer:
    for info in app.registered_groups:
        if info.name == name:
            return info.typer_instance
    cls = None
    if default_command:
        cls = type(f"{name.title()}Group", (DefaultCommandGroup,), {"default_command": default_command})
    group = typer.Typer(help=help, no_args_is_help=True, cls=cls)
    app.add_typer(group, name=name)
    return group
