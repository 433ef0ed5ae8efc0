"""LLM-written class descriptors: prompt styles, the LLM client, answer parsing, the response cache, the
waffle control and the interchange with CBD/WaffleCLIP/CuPL JSON dicts. Imports no torch."""

from vlmtools.describe.cache import ResponseCache, default_cache_dir
from vlmtools.describe.interchange import descriptor_stats, export_dict, import_descriptors, read_any_descriptors
from vlmtools.describe.llm import DEFAULT_MODEL, LLMClient, LLMError
from vlmtools.describe.parse import parse_background, parse_cbd, parse_lines, parse_structured
from vlmtools.describe.run import describe_class, make_plan, run_describe, run_waffle
from vlmtools.describe.styles import LLM_STYLES, STYLES, Exemplar, Plan, build_plan, builtin_template
from vlmtools.describe.waffle import waffle_descriptors

__all__ = [
    "DEFAULT_MODEL", "LLM_STYLES", "STYLES", "Exemplar", "LLMClient", "LLMError", "Plan", "ResponseCache",
    "build_plan", "builtin_template", "default_cache_dir", "describe_class", "descriptor_stats", "export_dict",
    "import_descriptors", "make_plan", "parse_background", "parse_cbd", "parse_lines", "parse_structured",
    "read_any_descriptors", "run_describe", "run_waffle", "waffle_descriptors",
]
