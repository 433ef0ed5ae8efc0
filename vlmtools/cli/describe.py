"""`vlmtools describe` (LLM-written class descriptors) and `vlmtools descriptors import|export|stats`."""

from __future__ import annotations

from typing import Literal, Optional

import typer

from vlmtools.cli.common import choices, deprecated_alias, handle_errors, plain

# vlmtools.describe.llm.APIS, spelled out here: importing it would load vlmtools.describe for every
# `vlmtools --help` (a test keeps the two in step).
Api = choices("Api", ("chat", "completions"))
STYLE_HELP = ("cbd (Menon & Vondrick's exact prompt), domain (worked examples from the target domain; "
              "--exemplars cub: study 000's Sooty Albatross), background (also surroundings/habitat, marked in "
              "\"kinds\"; --exemplars cub: study 000's prompt with the habitat bullet), structured (named fields), "
              "sentences (caption-like sentences), waffle (random words/characters, no LLM)")



# The styles of vlmtools.describe.styles.STYLES, spelled out so that --help needs no import (a test keeps
# the two in step).
Style = Literal["cbd", "domain", "background", "structured", "sentences", "waffle"]


# Typer renders help text as rich markup, which swallows "[default: ...]": defaults go in show_default.
def register(app: typer.Typer) -> None:
    @app.command("describe")
    @handle_errors
    def describe_cmd(
        classes: str = typer.Argument(..., help="Class list (one per line), a manifest (its labels) or '-'."),
        output: str = typer.Option("-", "--output", "-o", help="Descriptor JSONL; appended to and resumed. "
                                   "'-' is stdout (failed classes are then listed on stderr, or go to --errors)."),
        style: Style = typer.Option("cbd", "--style", "-s", help=STYLE_HELP),
        # None means the library's DEFAULT_MODEL, named here only for --help: importing it would load
        # vlmtools.describe for every `vlmtools --help` (a test keeps the two in step).
        model: Optional[str] = typer.Option(None, "--llm", envvar="VLMTOOLS_LLM_MODEL",
                                            show_default="gpt-4o-mini", help="The LLM: a model name on the server."),
        model_alias: Optional[str] = deprecated_alias("--model", "-m", instead="--llm",
                                                      why=" (-m/--model is the CLIP model in every other command)"),
        api: Api = typer.Option("chat", "--api", callback=plain, help="chat (/v1/chat/completions, the prompt as a user message) "
                                "| completions (/v1/completions, the prompt as is, as the CBD paper's GPT-3; "
                                "instruct models, servers that only offer completions)"),
        base_url: Optional[str] = typer.Option(None, "--base-url", envvar="OPENAI_BASE_URL",
                                               show_default="OpenAI", help="OpenAI-compatible server (vLLM, "
                                               "Ollama, llama.cpp), e.g. http://localhost:8000/v1"),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature.",
                                                    show_default="0 as in the paper; 0.7 for sentences"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer length limit.",
                                                 show_default="100 for cbd as in the paper, more for others"),
        n: int = typer.Option(1, "--n", help="Samples per class, merged and de-duplicated."),
        concurrency: int = typer.Option(4, "--workers", "--concurrency", "-j", help="Requests in flight."),
        timeout: float = typer.Option(60.0, "--timeout", help="Seconds per request attempt, in all (a server "
                                      "sending slowly is cut off then)."),
        max_retries: int = typer.Option(4, "--max-retries", help="Retries on 429/5xx/timeouts, with backoff."),
        exemplars: Optional[str] = typer.Option(None, "--exemplars", "--exemplar", help="Worked examples "
                                                "(domain/background): a shipped set (cub: study 000's Sooty "
                                                "Albatross; cbd; background) or a file: text blocks 'name' + "
                                                "'- ' lines (`vlmtools descriptors exemplars cub > my.txt` "
                                                "copies one to edit), or a descriptor JSON/JSONL."),
        domain: Optional[str] = typer.Option(None, "--domain", help="Ask the LLM once for a worked example "
                                             "from this domain, e.g. 'bird species'."),
        fields: Optional[str] = typer.Option(None, "--fields", help="structured: comma-separated fields.",
                                             show_default="size, shape, coloration, pattern, head, beak or mouth, "
                                                          "eyes, wings or limbs, legs and feet, tail"),
        count: Optional[int] = typer.Option(None, "--count", help="sentences: sentences per request.",
                                            show_default="10"),
        prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Own template with {class} "
                                                  "(also {exemplars}, {domain}, {fields}, {count})."),
        keep_raw: bool = typer.Option(False, "--keep-raw", help="Also store the raw answers (\"raw\": [...])."),
        strict_parse: bool = typer.Option(False, "--strict-parse", help="Keep only '- ' lines, as Menon's parser "
                                          "(an answer without any gives an empty list); by default such answers "
                                          "fall back to a loose parser (numbered lists, JSON), counted at the end."),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip classes already in the output; "
                                    "--no-resume starts it over (the old file is replaced at the first new "
                                    "class, so a run that gets none keeps it)."),
        errors: Optional[str] = typer.Option(None, "--errors", help="JSONL of failed classes with reasons. "
                                             "With stdout output and no --errors, each failed class and its "
                                             "reason is listed on stderr instead. Any failure makes the exit "
                                             "status 1.", show_default="OUTPUT.errors.jsonl"),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Answer cache.",
                                                show_default="$VLMTOOLS_CACHE_DIR/llm or ~/.cache/vlmtools/llm"),
        no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the answer cache."),
        print_prompts: bool = typer.Option(False, "--print-prompts", help="Print {\"class\", \"prompt\"} lines "
                                           "and exit without asking for descriptors."),
        waffle_count: int = typer.Option(15, "--waffle-count", help="waffle: random descriptor pairs per class."),
        seed: int = typer.Option(0, "--seed", help="waffle: random seed (the first, with --draws)."),
        waffle_words: Optional[str] = typer.Option(None, "--waffle-words", help="waffle: word list file."),
        waffle_chars: Optional[str] = typer.Option(None, "--waffle-chars", help="waffle: draw characters from "
                                                   "this descriptor file's (as WaffleCLIP does from the GPT "
                                                   "descriptors)", show_default="a-z0-9"),
        draws: int = typer.Option(1, "--draws", help="waffle: this many draws (seeds SEED, SEED+1, ...), one file "
                                  "each, draw-SEED.jsonl in the -o directory; WaffleCLIP reports their mean."),
    ) -> None:
        """Ask an LLM which visual features identify each class; write one JSONL line per class."""
        from vlmtools.errors import BadInput, VlmError
        from vlmtools.formats import dumps_line, read_class_list

        model = model_alias if model_alias is not None else model
        names = read_class_list(classes)
        if style == "waffle":
            from vlmtools.describe.run import run_waffle

            run_waffle(names, output=output, count=waffle_count, seed=seed, words=waffle_words, chars=waffle_chars,
                       draws=draws)
            return
        for flag, value in (("--draws", draws != 1), ("--waffle-chars", waffle_chars)):
            if value:
                raise BadInput(f"{flag} applies to --style waffle")

        from vlmtools.describe.cache import ResponseCache, default_cache_dir
        from vlmtools.describe.llm import LLMClient
        from vlmtools.describe.run import make_plan, run_describe

        if temperature is not None and not 0 <= temperature <= 2:
            raise BadInput(f"--temperature {temperature}: expected 0 to 2")
        if max_tokens is not None and max_tokens < 1:
            raise BadInput(f"--max-tokens {max_tokens}: must be at least 1")
        field_list = [f.strip() for f in fields.split(",") if f.strip()] if fields is not None else None
        if fields is not None and not field_list:
            raise BadInput("--fields: give at least one field name")
        cache = None if no_cache else ResponseCache(cache_dir or default_cache_dir())
        client = LLMClient(model, base_url, timeout=timeout, max_retries=max_retries, cache=cache, api=api)
        plan = make_plan(style, client, prompt_file=prompt_file, exemplars=exemplars, domain=domain,
                         fields=field_list, count=count, temperature=temperature, max_tokens=max_tokens,
                         strict=strict_parse)
        if print_prompts:
            for name in names:
                typer.echo(dumps_line({"class": name, "prompt": plan.prompt(name)}), nl=False)
            return
        report = run_describe(names, plan, client, output=output, errors=errors, resume=resume,
                              concurrency=concurrency, n=n, keep_raw=keep_raw)
        if report.failed:
            raise VlmError(f"{len(report.failed)} of {len(names) - report.skipped} classes failed")

    group = typer.Typer(help="Convert and inspect descriptor files (CBD/WaffleCLIP/CuPL JSON dicts).",
                        no_args_is_help=True)

    @group.command("import")
    @handle_errors
    def import_cmd(
        file: str = typer.Argument(..., help="JSON object {class: [descriptors]} (CBD, WaffleCLIP, CuPL) or "
                                   "`descriptors export --format vlmtools` output, or '-'."),
        output: str = typer.Option("-", "--output", "-o", help="Descriptor JSONL ('-' is stdout)."),
        fmt: Literal["cbd", "cupl"] = typer.Option("cbd", "--format", help="cbd (descriptors) or cupl (full sentences); "
                                "stored as \"style\"."),
    ) -> None:
        """Convert a {class: [descriptors]} JSON dict to descriptor JSONL, keeping the class order."""
        from vlmtools.console import info
        from vlmtools.describe.interchange import import_descriptors
        from vlmtools.formats import write_jsonl

        records = import_descriptors(file, fmt)
        n = write_jsonl(output, records)
        info(f"imported {n} classes, {sum(len(r['descriptors']) for r in records)} descriptors")

    @group.command("export")
    @handle_errors
    def export_cmd(
        file: str = typer.Argument(..., help="Descriptor JSONL (or a JSON dict)."),
        output: str = typer.Option("-", "--output", "-o", help="JSON file ('-' is stdout)."),
        fmt: Literal["cbd", "vlmtools"] = typer.Option("cbd", "--format", help="cbd: {class: [descriptors]}, as "
                                                       "CBD, WaffleCLIP and CuPL read it (no kinds or style); "
                                                       "vlmtools: every field, for `descriptors import`."),
        kind: Literal["all", "object", "background"] = typer.Option("all", "--kind", help="all, object (drop background descriptors) or background."),
    ) -> None:
        """Write descriptor JSONL as one JSON object, in file order: the CBD dict, or (--format vlmtools)
        everything, which `descriptors import` reads back unchanged."""
        from vlmtools.describe.interchange import export_object, read_any_descriptors
        from vlmtools.formats import dumps_line, open_output

        obj = export_object(read_any_descriptors(file), fmt, kind)
        with open_output(output) as fh:  # one line: stdout never gets indented JSON
            fh.write(dumps_line(obj))

    @group.command("exemplars")
    @handle_errors
    def exemplars_cmd(
        name: Optional[str] = typer.Argument(None, help="A shipped set to print (cub, cbd, background)."),
    ) -> None:
        """List the shipped worked-example sets for `describe --exemplars`, or print one (to copy and edit)."""
        from vlmtools.describe.styles import exemplar_path, exemplar_sets
        from vlmtools.errors import BadInput
        from vlmtools.formats import read_text

        sets = exemplar_sets()
        if name is None:
            for set_name, path in sets.items():
                typer.echo(f"{set_name}\t{path}")
            return
        if name not in sets:
            raise BadInput(f"no shipped exemplar set {name!r} (known: {', '.join(sets)})")
        typer.echo(read_text(exemplar_path(name)), nl=False)

    @group.command("stats")
    @handle_errors
    def stats_cmd(
        file: str = typer.Argument(..., help="Descriptor JSONL (or a JSON dict)."),
        json_: bool = typer.Option(False, "--json", help="NDJSON: one line per class, then {\"total\": {...}}."),
    ) -> None:
        """Descriptors per class, duplicates, background share, lengths, descriptors shared across classes:
        TSV rows (a header, then one row per class) on stdout, the totals on stderr."""
        from vlmtools.describe.interchange import descriptor_stats, read_any_descriptors
        from vlmtools.formats import dumps_line

        rows, total = descriptor_stats(read_any_descriptors(file))
        if json_:
            for row in rows:
                typer.echo(dumps_line(row), nl=False)
            typer.echo(dumps_line({"total": total}), nl=False)
            return
        typer.echo("class\tdescriptors\tduplicates\tbackground\tmean_chars\tmean_words")
        for r in rows:
            typer.echo(f"{r['class']}\t{r['descriptors']}\t{r['duplicates']}\t{r['background']}\t"
                       f"{r['mean_chars']}\t{r['mean_words']}")
        from vlmtools.console import info

        info(f"{total['classes']} classes, {total['descriptors']} descriptors ({total['duplicates']} duplicates, "
             f"{total['background']} background, {total['mean_chars']} characters and {total['mean_words']} "
             f"words on average); per class: min {total['min_per_class']}, mean {total['mean_per_class']}, "
             f"max {total['max_per_class']}; empty classes: {total['empty_classes']}; descriptors shared by "
             f"several classes: {total['shared_across_classes']}")

    app.add_typer(group, name="descriptors")
