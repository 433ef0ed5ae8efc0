"""How `--help` looks, in one place: plain text as in the man pages, argument names in capitals, an
option's value as a word (FILE, N, KEY=VALUE, clip|cbd) rather than a Python type.

typer's rich help puts six columns into 80 and leaves the help text twenty characters; its markup eats
anything in brackets (`pip install 'vlmtools[parquet]'`). The plain form wraps the help beside the option
names, as click and the man pages do. typer renders types from annotations (`<list[str]>`, `<int range>
[x>=1]`); these patches name the value instead, from the option's metavar, its long name, or its type.
"""

from __future__ import annotations

from typer.core import TyperArgument, TyperOption

# What an option's value is, by long name, for options whose annotation says only str or Path.
TEXT_METAVARS = {
    "--where": "KEY=VALUE", "--val-where": "KEY=VALUE", "--test-where": "KEY=VALUE",
    "--column": "LABEL=VALUE", "--by": "KEY", "--id": "ID", "--index-key": "auto|KEY",
    "--model": "MODEL", "--pretrained": "TAG", "--llm": "NAME", "--output": "FILE",
    "--classes": "FILE", "--descriptors": "FILE", "--manifest": "FILE", "--cbd": "FILE", "--csv": "FILE",
    "--diff": "FILE", "--summary": "FILE", "--errors": "FILE", "--prompt-file": "FILE",
    "--waffle-words": "FILE", "--waffle-chars": "FILE", "--exemplars": "NAME|FILE",
    "--templates": "NAME|FILE", "--cache-dir": "DIR", "--cache": "DIR", "--segmentations": "DIR",
    "--plots": "DIR", "--head": "HEAD", "--t2i": "HEAD", "--text-store": "STORE", "--images": "STORE",
    "--store": "STORE", "--image": "FILE", "--text": "TEXT", "--base-url": "URL", "--host": "ADDR",
    "--max-memory": "SIZE", "--domain": "NAME", "--split": "NAME", "--class": "NAME", "--source": "PROMPT",
    "--target": "PROMPT", "--layers": "I,J,...", "--sweep": "R1,R2,...", "--fields": "A,B,...",
    "--names": "A,B", "--path-col": "NAME", "--label-col": "NAME",
}
# Numbers: N for counts, and the letter the man pages use for the others.
NUMBER_METAVARS = {
    "--lr": "LR", "--weight-decay": "WD", "--val-fraction": "F", "--test-fraction": "F",
    "--image-ratio": "R", "--alpha": "A", "--lam": "L", "--p": "P", "--blur": "SIGMA",
    "--timeout": "SECONDS", "--temperature": "T", "--contrastive-weight": "W",
}


def _long_name(param) -> str:
    return next((o for o in param.opts if o.startswith("--")), "")


def option_metavar(param) -> str | None:
    """The word shown for an option's value: its own metavar, else by long name, else by type."""
    if param.is_flag or param.count:
        return None
    if param.metavar is not None:
        return param.metavar
    desc = param.type_descriptor
    if desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    annotation = param.type_descriptor.annotation
    if desc.is_list:
        annotation = getattr(annotation, "__args__", (str,))[0]
    name = _long_name(param)
    if annotation is int:
        return "N"
    if annotation is float:
        return NUMBER_METAVARS.get(name, "X")
    return TEXT_METAVARS.get(name, "PATH" if desc.is_path else "TEXT")


def number_range(param) -> str | None:
    """The range a number option takes, in words (typer writes x>=1)."""
    if getattr(param, "count", False):
        return None
    low, high = param.min, param.max
    if low is None and high is None:
        return None
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"{low} to {high}"


def _argument_name(self) -> str:
    return self.metavar if self.metavar is not None else self.name.upper()


def _argument_usage(self) -> str:
    name = self.display_name_raw
    if self.nargs != 1:
        name += "..."
    return name if self.required else f"[{name}]"


def _argument_label(self) -> str:
    return self.display_name_raw + ("..." if self.nargs != 1 else "")


def _default_string(original):
    def default_string(self, *, ctx, show_default_is_str, default_value):
        if show_default_is_str:  # a default said in words: as written, without click's parentheses
            return str(self.show_default)
        return original(self, ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value)
    return default_string


def install() -> None:
    """Patch typer's parameter classes (once, at import of the app)."""
    TyperOption.display_type_rich = lambda self, ctx: option_metavar(self)
    TyperOption._get_number_range_help_str = number_range
    TyperArgument._get_number_range_help_str = number_range
    TyperArgument.display_name_raw = property(_argument_name)
    TyperArgument._usage_display_name = _argument_usage
    TyperArgument._rich_display_name = _argument_label
    TyperArgument.display_type_rich = lambda self, ctx: None  # its name says what it is
    if not getattr(TyperOption._get_default_string, "plain", False):
        TyperOption._get_default_string = _default_string(TyperOption._get_default_string)
        TyperOption._get_default_string.plain = True


def plain_help(typer_app) -> None:
    """Plain-text help for the app and every group under it (see the module's docstring)."""
    typer_app.rich_markup_mode = None
    for info in typer_app.registered_groups:
        plain_help(info.typer_instance)
