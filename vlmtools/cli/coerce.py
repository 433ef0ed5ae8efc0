"""Option values converted without pydantic where typer's own result is certain (start-up time).

typer (>= 0.29) converts every parameter through a pydantic TypeAdapter: importing pydantic and building
the adapters of one command's parameters costs about 90 ms, a third of `vlmtools classify` from stores
(benchmarks/bench_classify.py --peer numpy). Most values need none of it: a str is already the str, "5"
is the int 5, a choice is typer's own ``coerce_cli_choice``, a path typer's own ``coerce_cli_path``. This
converts those directly and hands every other value, and every value it is unsure of, to typer's adapter:
bad input gets typer's own error message, word for word. ``install()`` does nothing on a typer other than
0.29.x, whose internals it was tested against (the adapter path then does everything, as stock typer does).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?")


class Unsure(Exception):
    """The fast conversion cannot promise typer's result: typer's adapter converts the value."""


def _plain(info) -> bool:
    return getattr(info, "parser", None) is None and getattr(info, "click_type", None) is None


def converter(annotation, info):
    """``convert(value, param, ctx)`` for one annotation, or None where typer's adapter must do it all."""
    from typing import get_args, get_origin

    from typer._param_types import coerce_cli_choice, coerce_cli_path

    if not _plain(info):
        return None
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (None,)
        one = converter(item, info) if item is not None else None
        if one is None:
            return None

        def convert_list(value, param, ctx):
            if not isinstance(value, (list, tuple)):
                raise Unsure
            return [one(v, param, ctx) for v in value]
        return convert_list
    if isinstance(annotation, type) and issubclass(annotation, Enum) or get_origin(annotation) is _literal():
        choices = list(annotation) if isinstance(annotation, type) else list(get_args(annotation))

        def convert_choice(value, param, ctx):
            try:
                return coerce_cli_choice(value, choices=choices, case_sensitive=info.case_sensitive, ctx=ctx)
            except ValueError:
                raise Unsure from None
        return convert_choice
    if annotation in (str, bool):  # a str is the str; a flag's value is already a bool
        def convert_exact(value, param, ctx):
            if type(value) is not annotation:
                raise Unsure
            return value
        return convert_exact
    if annotation in (int, float):
        if getattr(info, "clamp", False):
            return None
        pattern = _INT if annotation is int else _FLOAT
        low, high = getattr(info, "min", None), getattr(info, "max", None)

        def convert_number(value, param, ctx):
            if type(value) is annotation:
                number = value
            elif annotation is float and type(value) is int:  # an int default of a float option
                number = float(value)
            elif type(value) is str and pattern.fullmatch(value):
                number = annotation(value)
            else:
                raise Unsure
            if (low is not None and not number >= low) or (high is not None and not number <= high):
                raise Unsure  # out of bounds: typer's message
            return number
        return convert_number
    if annotation is Path and getattr(info, "path_type", None) is None:
        def convert_path(value, param, ctx):
            if type(value) is str and value and "\0" not in value:
                value = Path(value)
            if not isinstance(value, Path):
                raise Unsure
            try:  # typer's own checks (exists, dir_okay, ...) on a value already a Path
                return coerce_cli_path(value, info, path_type=Path, param=param, ctx=ctx)
            except Exception:
                raise Unsure from None
        return convert_path
    return None


def _literal():
    from typing import Literal

    return Literal


def install() -> None:
    """Give typer's parameters the fast conversion (see the module doc)."""
    import typer

    if not typer.__version__.startswith("0.29."):  # the internals this relies on, tested with 0.29: else stock
        return
    from dataclasses import dataclass

    from typer._coercion import RuntimeParam, build_runtime_param
    from typer.core import _TyperParameter
    if getattr(_TyperParameter, "_vlmtools_fast", False):
        return

    @dataclass(frozen=True)
    class FastRuntimeParam(RuntimeParam):
        descriptor: object = None
        convert: object = None

        def _coerce_value(self, value, param, ctx):
            try:
                return self.convert(value, param, ctx)
            except Unsure:
                stock = self.__dict__.get("stock")
                if stock is None:  # typer's own, built once (frozen dataclass: set through __dict__)
                    stock = self.__dict__["stock"] = build_runtime_param(self.descriptor)
                return stock._coerce_value(value, param=param, ctx=ctx)

    def get_runtime_param(self):
        if self._runtime_param is None:
            desc = self.type_descriptor
            convert = None if desc.file_annotation is not None else converter(desc.annotation, desc.parameter_info)
            self._runtime_param = build_runtime_param(desc) if convert is None else FastRuntimeParam(
                parameter_info=desc.parameter_info, annotation=desc.annotation, descriptor=desc, convert=convert)
        return self._runtime_param

    _TyperParameter.get_runtime_param = get_runtime_param
    _TyperParameter._vlmtools_fast = True
