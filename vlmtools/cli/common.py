"""Shared CLI plumbing: error mapping, common options."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from enum import Enum

import typer

from vlmtools.errors import VlmError
from vlmtools.models import DEFAULT_PRECISION, PRECISIONS


DEBUG_ENV = "VLMTOOLS_DEBUG"


def _quiet_stdout() -> None:
    """The reader of stdout went away (`vlmtools search ... | head`): point fd 1 at /dev/null so that
    Python's final flush does not complain, and end quietly."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error(message: str) -> None:
    # the console (rich) is imported only when there is something to say
    from vlmtools.console import error as say_error

    say_error(message)


def handle_errors(func: Callable) -> Callable:
    """Turn what escapes a command into a one-line message on stderr and an exit code: 2 for bad input,
    1 for a partial failure, 3 for an internal error (a bug: VLMTOOLS_DEBUG=1 shows the traceback),
    130 when interrupted; a closed pipe on stdout ends quietly with 0."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except VlmError as exc:
            _error(str(exc))
            raise typer.Exit(exc.exit_code)
        except UnicodeDecodeError as exc:
            _error(f"input is not UTF-8 text ({exc.reason} at byte {exc.start})")
            raise typer.Exit(2)
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(0)
        except OSError as exc:  # permission denied, disk full, ...: say so in one line
            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            _error("interrupted")
            raise typer.Exit(130)
        except Exception as exc:  # a bug: one line, not a traceback (unless asked for)
            import os

            if type(exc).__module__.split(".")[0] in ("typer", "click"):  # their Exit/Abort/usage errors
                raise
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            from vlmtools.console import console, is_verbose

            if is_verbose():
                console.print_exception()
            what = " ".join(str(exc).split())[:200]
            _error(f"internal error: {type(exc).__name__}{': ' + what if what else ''} -- please report it"
                  + ("" if is_verbose() else f"; rerun with -v (or {DEBUG_ENV}=1) for the traceback"))
            raise typer.Exit(3)

    wrapper.handles_errors = True  # the conventions test checks that every command has this wrapper
    return wrapper


class ClosedStream:
    """Stands in for a standard stream that was closed at startup (`>&-`, `0<&-`): reading or writing
    it is bad input (exit 2) instead of an AttributeError on None."""

    def __init__(self, name: str, hint: str):
        self.name, self.hint = name, hint
        self.closed = False
        self.encoding = "utf-8"
        self.errors = "strict"

    def _refuse(self, *args, **kwargs):
        from vlmtools.errors import BadInput

        raise BadInput(f"{self.name} is closed; {self.hint}")

    write = writelines = read = readline = readlines = fileno = _refuse

    def __iter__(self):
        self._refuse()

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return self.name == "stdin"

    def writable(self) -> bool:
        return self.name == "stdout"


def require_stdout(output: str | None = "-") -> None:
    """Refuse before any work when results would go to a closed stdout (they would be lost)."""
    if output in (None, "-") and isinstance(sys.stdout, ClosedStream):
        sys.stdout.write("")


def guard_std_streams() -> None:
    """Replace closed standard streams, and make SIGTERM end a run like Ctrl-C (exit 130, workers
    stopped, stores resumable)."""
    import signal

    if sys.stdout is None:
        sys.stdout = ClosedStream("stdout", "pass -o FILE, or leave stdout open")
    if sys.stdin is None:
        sys.stdin = ClosedStream("stdin", "pass a file instead of '-'")

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread (tests running the app in a thread)
        pass


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



def deprecated_alias(*names: str, instead: str, why: str = "", until: str = "0.2"):
    """An old spelling kept for one release: hidden from --help, a deprecation line on stderr when used.
    The command takes its value when the new option was not given."""
    def warn_used(value):
        if value is not None:
            from vlmtools.console import warn

            warn(f"{'/'.join(names)} is deprecated here, use {instead}{why}; the old spelling goes in "
                 f"vlmtools {until}")
        return value

    return typer.Option(None, *names, hidden=True, callback=warn_used, help=f"Deprecated: use {instead}.")


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
