"""`vlmtools describe`: ask an LLM about every class, a thread pool of requests, one JSONL line per class.

The output file is appended to, a whole line at a time (flushed and fsynced), so a killed run loses at
most the classes in flight; a rerun skips the classes already there and drops a torn last line. With
--no-resume the old file is replaced only when the first new line is ready, so a run that gets nothing
(server down, every class failing, ^C) leaves it as it was. At the end of a run the file is rewritten
(atomically) in class-list order. Classes that fail after the client's retries go to an errors file with
the reason (for stdout output without --errors: listed on stderr); the others are still written.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path


from vlmtools.console import info, progress, warn
from vlmtools.describe.llm import LLMClient, LLMError
from vlmtools.describe.styles import (Plan, build_plan, builtin_template, domain_exemplar_prompt,
                                      exemplar_from_answer, inline_background, read_exemplars, read_template,
                                      template_fields)
from vlmtools.errors import BadInput, VlmError
from vlmtools.formats import (atomic_path, output_lock, descriptor_record, dumps_line, iter_descriptors, iter_jsonl,
                              validate_descriptor_record, write_jsonl)

DOMAIN_EXEMPLAR_MAX_TOKENS = 400
# Bounds on what one class may bring back, checked before anything is written (the output line, and the
# answer in the cache; the client bounds one answer at MAX_ANSWER_CHARS): a server that answers 200,000
# descriptors or a 70 MB line would otherwise write a line that a rerun cannot read back, or an answer
# that a rerun replays from the cache and refuses again without asking the server.
MAX_DESCRIPTORS = 1000       # descriptors per class, all samples merged
MAX_RECORD_BYTES = 8 << 20   # one output line (well under formats.MAX_LINE, which readers enforce)


class NoDescriptors(LLMError):
    """The answer came back but held nothing usable."""

    def __init__(self, reason: str, raw: list[str]):
        super().__init__(reason)
        self.raw = raw


@dataclass
class Report:
    written: int = 0
    cached: int = 0          # classes answered entirely from the cache
    skipped: int = 0         # already in the output
    truncated: int = 0       # answers cut off at max_tokens
    loose: int = 0           # cbd/domain answers without "- " lines, parsed by the loose parser
    strict_empty: int = 0    # under --strict-parse, answers without "- " lines: written with no descriptors
    failed: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- plan

def make_plan(style: str, client: LLMClient, *, prompt_file: str | None = None, exemplars: str | None = None,
              domain: str | None = None, fields: list[str] | None = None, count: int | None = None,
              temperature: float | None = None, max_tokens: int | None = None, strict: bool = False) -> Plan:
    """Everything a run sends except the class name. With --domain (and no --exemplars) this asks the LLM
    once for a worked example from that domain; the answer is cached like any other. The background style
    with inline exemplars (--exemplars cub) asks Menon's question, as study 000 does."""
    examples = read_exemplars(exemplars) if exemplars else None
    if prompt_file:
        template = read_template(prompt_file)
    else:
        template = builtin_template("domain" if style == "background" and inline_background(examples) else style)
    used = template_fields(template)
    for given, slot, flag in ((exemplars or domain, "exemplars", "--exemplars/--domain"),
                              (fields, "fields", "--fields"), (count, "count", "--count")):
        if given and slot not in used and not (slot == "exemplars" and "domain" in used):
            raise BadInput(f"{flag} has no effect: the {style} prompt has no {{{slot}}} slot"
                           + (" (did you mean --style domain?)" if slot == "exemplars" else ""))
    if examples is None and domain and "exemplars" in used:
        prompt = domain_exemplar_prompt(domain, background=(style == "background"))
        try:
            answer = client.complete(prompt, temperature=0.0, max_tokens=DOMAIN_EXEMPLAR_MAX_TOKENS)
        except LLMError as exc:
            raise VlmError(f"--domain {domain!r}: could not get a worked example: {exc}") from None
        example = exemplar_from_answer(answer.text, domain)
        info(f"worked example for {domain!r}: {example.name} ({len(example.descriptors)} descriptors"
             f"{', cached' if answer.cached else ''})")
        examples = [example]
    return build_plan(style, template, exemplars=examples, domain=domain, fields=fields,
                      count=10 if count is None else count, temperature=temperature, max_tokens=max_tokens,
                      strict=strict)


# ----------------------------------------------------------------------------- one class

def describe_class(cls: str, plan: Plan, client: LLMClient, n: int = 1,
                   keep_raw: bool = False) -> tuple[dict, Report]:
    """Ask ``n`` samples for one class and merge them: the first sample's list as parsed, then the
    descriptors of later samples not seen yet. Returns the record and this class's counts."""
    counts = Report()
    prompt = plan.prompt(cls)
    raws, descs, kinds, all_cached = [], [], [], True
    for sample in range(n):
        answer = client.complete(prompt, temperature=plan.temperature, max_tokens=plan.max_tokens, sample=sample)
        raws.append(answer.text)
        all_cached &= answer.cached
        counts.truncated += answer.finish_reason == "length"
        got, got_kinds, loose = plan.parse(answer.text)
        counts.loose += loose and not plan.strict
        counts.strict_empty += loose and plan.strict and bool(answer.text.strip())
        got_kinds = got_kinds or ["object"] * len(got)
        if sample == 0:
            descs, kinds = list(got), list(got_kinds)
            continue
        seen = set(descs)
        for d, k in zip(got, got_kinds):
            if d not in seen:
                seen.add(d)
                descs.append(d)
                kinds.append(k)
    if not descs and not (plan.strict and counts.strict_empty):
        # (under --strict-parse a non-empty answer without "- " lines is an empty list, as Menon's parser
        # makes it; classify --allow-empty scores such a class as "{class}, which has ")
        reason = "empty answer" if not any(r.strip() for r in raws) else "no descriptors found in the answer"
        raise NoDescriptors(reason, raws)
    if len(descs) > MAX_DESCRIPTORS:
        _forget(client, prompt, plan, n)
        raise LLMError(f"malformed response: {len(descs):,} descriptors for one class (at most {MAX_DESCRIPTORS:,})")
    counts.cached = int(all_cached)
    record = descriptor_record(cls, descs, kinds if plan.style == "background" else None, style=plan.style,
                               model=client.model, prompt_sha=plan.prompt_sha, raw=raws if keep_raw else None)
    size = len(dumps_line(record).encode("utf-8"))
    if size > MAX_RECORD_BYTES:
        _forget(client, prompt, plan, n)
        raise LLMError(f"malformed response: the class's line would be {size >> 20} MiB (at most "
                       f"{MAX_RECORD_BYTES >> 20} MiB)")
    return record, counts


def _forget(client: LLMClient, prompt: str, plan: Plan, n: int) -> None:
    """Drop a refused class's answers from the cache, so that a rerun asks the server again."""
    for sample in range(n):
        client.forget(prompt, temperature=plan.temperature, max_tokens=plan.max_tokens, sample=sample)


# ----------------------------------------------------------------------------- output file

RESUME_HINT = "fix it, write to another file or pass --no-resume"


def existing_records(path: Path) -> dict[str, dict]:
    """The records already in ``path``, for resuming. A torn last line left by a killed run is dropped,
    but only once every whole line has been checked: -o pointed at someone else's file is bad input
    and changes nothing."""
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, expected a file")
    if not path.exists():
        return {}
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if not tail.strip() or _is_json(tail):
        return _read_records(path)  # no torn line (a last line without "\n" that parses is kept)
    if not tail.lstrip().startswith(b"{"):
        raise BadInput(f"{path}: the last line is not a descriptor line; {RESUME_HINT}")
    tmp = None
    try:
        with atomic_path(path) as tmp:  # the file minus its torn line, swapped in only if it checks out
            tmp.write_bytes(data[:cut])
            records = _read_records(tmp)
    except BadInput as exc:
        raise BadInput(str(exc).replace(str(tmp), str(path))) from None
    warn(f"{path}: dropped an incomplete last line left by an interrupted run")
    return records


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError (a character cut in half) alike
        return False
    return True


def _read_records(path: Path) -> dict[str, dict]:
    try:
        return {str(rec["class"]): {**rec, "_line": lineno}
                for lineno, rec in iter_descriptors(path, allow_empty=True)}
    except BadInput as exc:
        raise BadInput(f"{exc}; {RESUME_HINT}") from None


def check_compatible(existing: dict[str, dict], path: Path, expect: dict) -> None:
    """Refuse to mix runs of another style, model or prompt into one file."""
    for cls, rec in existing.items():
        for key, value in expect.items():
            if key in rec and rec[key] != value:
                raise BadInput(f"{path}:{rec['_line']}: class {cls!r} was written with {key} {rec[key]!r}, "
                               f"this run uses {value!r}; write to another file or pass --no-resume")


class LineWriter:
    """Appends whole JSON lines to a file, flushed and fsynced one by one. The file is opened at the first
    line, so a run where every class fails changes nothing; with ``replace`` (--no-resume) the old file is
    swapped for a new one holding that first line, and not before. For stdout, lines are held back until
    every earlier class is done, so stdout keeps the class-list order."""

    def __init__(self, path: Path | None, order: list[str], replace: bool = False):
        self.path = path
        self.replace = replace
        self.written = 0
        self._fh = None
        self._order = order
        self._next = 0
        self._done: dict[str, str | None] = {}

    def done(self, cls: str, record: dict | None) -> None:
        line = None
        if record is not None:
            line = dumps_line(validate_descriptor_record(record, f"class {cls!r}"))
            self.written += 1
        if self.path is None:
            self._to_stdout(cls, line)
        elif line is not None:
            if self._fh is None:
                self._open(line)
            else:
                self._append(line)

    def _open(self, first: str) -> None:
        if self.replace:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(first)
                    fh.flush()
                    os.fsync(fh.fileno())
            self._fh = open(self.path, "a", encoding="utf-8")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        if self._fh.tell() and not _ends_with_newline(self.path):
            first = "\n" + first  # a hand-written file whose last line has no "\n"
        self._append(first)

    def _append(self, line: str) -> None:
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _to_stdout(self, cls: str, line: str | None) -> None:
        self._done[cls] = line
        while self._next < len(self._order) and self._order[self._next] in self._done:
            pending = self._done.pop(self._order[self._next])
            if pending is not None:
                sys.stdout.write(pending)
                sys.stdout.flush()
            self._next += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def reorder_output(path: Path, classes: list[str]) -> None:
    """Rewrite ``path`` atomically in class-list order (extra classes keep their place after)."""
    records = [rec for _, rec in iter_jsonl(path)]
    rank = {c: i for i, c in enumerate(classes)}
    ordered = sorted(records, key=lambda r: rank.get(str(r["class"]), len(rank)))  # stable: extras keep order
    if ordered != records:
        write_jsonl(path, ordered)


# ----------------------------------------------------------------------------- the run

def default_errors_path(output: str | None) -> Path | None:
    """OUTPUT.errors.jsonl; none for stdout, where each failure is listed on stderr instead."""
    return None if output in (None, "-") else Path(f"{output}.errors.jsonl")


def run_describe(classes: list[str], plan: Plan, client: LLMClient, *, output: str | None = "-",
                 errors: str | None = None, resume: bool = True, concurrency: int = 4, n: int = 1,
                 keep_raw: bool = False) -> Report:
    if concurrency < 1:
        raise BadInput(f"--concurrency {concurrency}: must be at least 1")
    if n < 1:
        raise BadInput(f"--n {n}: must be at least 1")
    if n > 1 and plan.temperature == 0:
        warn(f"--n {n} at temperature 0: the samples will mostly repeat each other; raise --temperature")
    client.check_key()
    if output in (None, "-"):
        return _run_describe(classes, plan, client, output=output, errors=errors, resume=resume,
                             concurrency=concurrency, n=n, keep_raw=keep_raw)
    with output_lock(output):  # two runs appending to one file would duplicate and lose lines
        return _run_describe(classes, plan, client, output=output, errors=errors, resume=resume,
                             concurrency=concurrency, n=n, keep_raw=keep_raw)


def _run_describe(classes, plan, client, *, output, errors, resume, concurrency, n, keep_raw) -> Report:
    out_path = None if output in (None, "-") else Path(output)
    err_path = Path(errors) if errors else default_errors_path(output)
    report = Report()
    existing: dict[str, dict] = {}
    if out_path is not None:
        if out_path.is_dir():
            raise BadInput(f"{out_path}: is a directory, expected a file")
        if resume:
            existing = existing_records(out_path)
            check_compatible(existing, out_path, {"style": plan.style, "model": client.model,
                                                  "prompt_sha": plan.prompt_sha})
    todo = [c for c in classes if c not in existing]
    report.skipped = len(classes) - len(todo)
    if report.skipped:
        info(f"{report.skipped} of {len(classes)} classes already in {out_path}; asking for {len(todo)}")

    writer = LineWriter(out_path, todo, replace=not resume)
    try:
        _run_pool(todo, plan, client, writer, report, concurrency, n, keep_raw)
    finally:
        writer.close()

    if out_path is not None and out_path.exists() and (resume or writer.written):
        reorder_output(out_path, classes)
    if err_path is not None:
        if report.failed:
            write_jsonl(err_path, report.failed)
        elif err_path.exists():
            err_path.unlink()  # an earlier run's failures are all resolved now
    _summarize(report, out_path, err_path)
    return report


class DaemonPool:
    """A minimal thread pool (submit, shutdown) whose workers are daemon threads. ThreadPoolExecutor joins
    its workers when the interpreter exits, so after ^C the process would still wait for every request in
    flight (up to --timeout per retry); these are simply abandoned."""

    def __init__(self, workers: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever reads the future
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()


def _run_pool(todo, plan, client, writer, report, concurrency, n, keep_raw) -> None:
    def label(r: Report) -> str:
        return f"describe ({r.written} ok, {r.cached} cached, {len(r.failed)} failed)"

    if not todo:
        return
    with progress(label(report), total=len(todo), unit="classes") as bar:
        pool = DaemonPool(min(concurrency, len(todo)), "describe")
        try:
            futures = {pool.submit(describe_class, cls, plan, client, n, keep_raw): cls for cls in todo}
            order = {fut: i for i, fut in enumerate(futures)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=order.get):  # a set: keep list order among those done
                    cls = futures[fut]
                    _collect(cls, fut, plan, client, writer, report)
                    bar.advance(1)
                    bar.update(description=label(report))
        except BaseException as exc:
            # A fatal error (bad key, unknown model) or ^C: start nothing new; the whole lines written so
            # far stay. After a fatal error the requests in flight fail as fast, so wait for them (nothing
            # stray is left running in a library caller); after ^C do not wait for anything.
            pool.shutdown(wait=isinstance(exc, Exception), cancel_futures=True)
            raise
        pool.shutdown()


def _collect(cls, fut, plan, client, writer, report) -> None:
    try:
        record, counts = fut.result()
    except NoDescriptors as exc:
        report.failed.append(_failure(cls, str(exc), plan, client, raw=[client.redact(r) for r in exc.raw]))
        writer.done(cls, None)
        return
    except LLMError as exc:
        report.failed.append(_failure(cls, client.redact(str(exc)), plan, client))
        writer.done(cls, None)
        return
    except VlmError:
        raise  # bad key, unknown model: every class would fail the same way
    except Exception as exc:  # a surprise in one class should not sink the others
        report.failed.append(_failure(cls, client.redact(f"unexpected {type(exc).__name__}: {exc}"), plan, client))
        writer.done(cls, None)
        return
    writer.done(cls, record)
    report.written += 1
    report.cached += counts.cached
    report.truncated += counts.truncated
    report.loose += counts.loose
    report.strict_empty += counts.strict_empty


def _failure(cls: str, reason: str, plan: Plan, client: LLMClient, raw: list[str] | None = None) -> dict:
    rec = {"class": cls, "reason": reason, "style": plan.style, "model": client.model}
    if raw is not None:
        rec["raw"] = raw
    return rec


def _summarize(report: Report, out_path: Path | None, err_path: Path | None) -> None:
    where = out_path or "stdout"
    if report.written or report.skipped:
        info(f"wrote {report.written} classes to {where} ({report.cached} from cache, "
             f"{report.skipped} already there)")
    if report.loose:
        warn(f"{report.loose} answers had no '- ' lines and were parsed loosely (numbered lists, JSON, ...); "
             f"--strict-parse keeps only '- ' lines, as Menon's parser")
    if report.strict_empty:
        warn(f"{report.strict_empty} answers had no '- ' lines: with --strict-parse they gave no descriptors "
             f"(written as empty lists, as Menon's parser; classify --allow-empty scores them as "
             f"\"{{class}}, which has \")")
    if report.truncated:
        warn(f"{report.truncated} answers were cut off at --max-tokens; their last descriptor may be partial")
    # Without an errors file (stdout output, no --errors) stderr is the only record: list every failure.
    shown = report.failed if err_path is None else report.failed[:5]
    for fail in shown:
        warn(f"{fail['class']}: {fail['reason']}")
    if len(report.failed) > len(shown):
        warn(f"... and {len(report.failed) - len(shown)} more")
    if report.failed and err_path is not None:
        warn(f"failed classes and reasons: {err_path}")


# ----------------------------------------------------------------------------- waffle

def run_waffle(classes: list[str], *, output: str | None = "-", count: int = 15, seed: int = 0,
               words: str | None = None, chars: str | None = None, draws: int = 1) -> list[str]:
    """The no-LLM control: one shared set of random descriptors for every class, written atomically.
    ``chars``: a descriptor file whose characters are drawn from (WaffleCLIP's way), else a-z0-9. With
    ``draws`` > 1, ``output`` is a directory that gets draw-<seed>.jsonl for seeds seed .. seed+draws-1
    (WaffleCLIP averages its accuracy over such draws). Returns the files written."""
    from vlmtools.describe.interchange import read_any_descriptors
    from vlmtools.describe.waffle import CHARACTERS, characters_of, read_words, waffle_descriptors

    if draws < 1:
        raise BadInput(f"--draws {draws}: must be at least 1")
    if draws > 1 and output in (None, "-"):
        raise BadInput(f"--draws {draws} writes one file per draw: pass a directory as -o")
    if draws > 1 and Path(output).is_file():
        raise BadInput(f"{output}: is a file; --draws {draws} needs a directory (one file per draw)")
    word_list = read_words(words)
    characters = characters_of(read_any_descriptors(chars)) if chars else CHARACTERS
    written = []
    for s in range(seed, seed + draws):
        descs = waffle_descriptors(classes, count=count, seed=s, words=word_list, characters=characters)
        records = [descriptor_record(c, descs, style="waffle", seed=s) for c in classes]
        path = output if draws == 1 else str(Path(output) / f"draw-{s}.jsonl")
        if draws > 1:
            Path(output).mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
        written.append(path)
    from rich.markup import escape

    where = f"{draws} draws (seeds {seed}..{seed + draws - 1}) in {output}" if draws > 1 else f"seed {seed}"
    info(f"wrote {len(classes)} classes with {len(descs)} waffle descriptors each, {where}; "
         f"characters from {chars or 'a-z0-9'}")  # info prints text as is (no markup)
    return written
