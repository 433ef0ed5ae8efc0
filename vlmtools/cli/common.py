"""Shared CLI plumbing: error mapping, common options."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from enum import Enum

import typer

from vlmtools.errors import VlmError
from vlmtools.models import DEFAULT_PRECISION, PRECISIONS


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

    return wrapper


ModelOpt = typer.Option(None, "--model", "-m", help="open_clip model: ViT-B-32, hf-hub:org/repo, "
                        "local-dir:/path, vlmtools-micro, ... (default: ViT-B-32, or the store's model)")
PretrainedOpt = typer.Option(None, "--pretrained", "-p", help="pretrained tag (openai, laion2b_s34b_b79k, ...), "
                             "a checkpoint path, or 'none' for random weights (default: openai; 'vlmtools' "
                             "for packaged models)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N")



def choices(name: str, values) -> type[Enum]:
    """An Enum of ``values``, as an option's type, so that --help shows a|b|c; give the option
    ``callback=plain`` and the command gets the plain string."""
    return Enum(name, {v: v for v in values}, type=str)


def plain(value):
    return value.value if isinstance(value, Enum) else value


# For every command that encodes; the values are vlmtools.models.PRECISIONS (a light module).
Precision = choices("Precision", PRECISIONS)
PrecisionOpt = typer.Option(DEFAULT_PRECISION, "--precision", callback=plain,
                            help="Encoder precision: fp32; fp16 (half weights, as OpenAI CLIP on CUDA and the "
                                 "CBD paper); bf16 (bfloat16 autocast); amp (autocast on CUDA: bf16, else "
                                 "fp16; fp32 on CPU).")


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
