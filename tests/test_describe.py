"""`vlmtools describe` against a real HTTP server speaking the chat-completions protocol, through the real
openai client: prompts, parsing, concurrency, resume after a kill, cache, retries, failures, key hygiene."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from typer.testing import CliRunner
from werkzeug import Response

from tests.conftest import LOADED_DEADLINE, wait_until
from vlmtools.cli.app import app
from vlmtools.describe.parse import parse_background, parse_cbd, parse_lines, parse_structured
from vlmtools.describe.styles import build_plan, builtin_template

runner = CliRunner()

SECRET = "sk-test-SECRET-0123456789abcdef"

# Menon & Vondrick, classify_by_description_release/generate_descriptors.py, generate_prompt(), written
# here independently of the package template, as one escaped string.
CBD_PROMPT = (
    "Q: What are useful visual features for distinguishing a lemur in a photo?\nA: There are several useful "
    "visual features to tell there is a lemur in a photo:\n- four-limbed primate\n- black, grey, white, brown, "
    "or red-brown\n- wet and hairless nose with curved nostrils\n- long tail\n- large eyes\n- furry bodies\n"
    "- clawed hands and feet\n\nQ: What are useful visual features for distinguishing a television in a "
    "photo?\nA: There are several useful visual features to tell there is a television in a photo:\n"
    "- electronic device\n- black or grey\n- a large, rectangular screen\n- a stand or mount to support the "
    "screen\n- one or more speakers\n- a power cord\n- input ports for connecting to other devices\n"
    "- a remote control\n\nQ: What are useful features for distinguishing a {category_name} in a photo?\n"
    "A: There are several useful visual features to tell there is a {category_name} in a photo:\n-\n"
)


# ----------------------------------------------------------------------------- a scripted LLM server

def completion(text: str, finish_reason: str = "stop") -> Response:
    body = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}]}
    return Response(json.dumps(body), content_type="application/json")


def error(status: int, message: str = "scripted failure") -> Response:
    # retry-after-ms keeps the openai client's backoff tiny in tests (it honours the header).
    return Response(json.dumps({"error": {"message": message, "type": "test"}}), status=status,
                    content_type="application/json", headers={"retry-after-ms": "1"})


class FakeLLM:
    """Answers POST /v1/chat/completions with ``self.answer(cls, body)`` (a str or a Response), where cls is
    whichever known class name the prompt mentions last. Records every request."""

    def __init__(self, server: HTTPServer):
        self.server = server
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.classes: list[str] = []
        self.answer = lambda cls, body: f"- feature of {cls}\n- another feature"
        server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/v1")

    def asked(self, prompt: str) -> str | None:
        hits = [(prompt.rfind(c.replace("_", " ")), c) for c in self.classes if c.replace("_", " ") in prompt]
        return max(hits)[1] if hits else None

    def _handle(self, request):
        body = json.loads(request.data)
        prompt = body["messages"][0]["content"]
        cls = self.asked(prompt)
        with self.lock:
            self.requests.append({"body": body, "class": cls, "auth": request.headers.get("Authorization")})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            out = self.answer(cls, body)
        finally:
            with self.lock:
                self.in_flight -= 1
        return out if isinstance(out, Response) else completion(out)

    def asked_classes(self) -> list[str]:
        return [r["class"] for r in self.requests]


@pytest.fixture(scope="module")
def _server():
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)  # threaded: concurrent requests
    server.start()
    yield server
    server.stop()


@pytest.fixture
def llm(_server):
    _server.clear()
    yield FakeLLM(_server)
    _server.clear()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("VLMTOOLS_LLM_MODEL", raising=False)


def class_file(tmp_path: Path, names: list[str], llm: FakeLLM | None = None) -> Path:
    if llm is not None:
        llm.classes = list(names)
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def describe(llm: FakeLLM, *args) -> object:
    return runner.invoke(app, ["describe", *map(str, args), "--base-url", llm.url, "--max-retries", "1"])


def err(result) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def classes_so_far(path: Path) -> list[str]:
    """The classes of the whole lines in a file another process is writing."""
    if not path.exists():
        return []
    whole = path.read_text(encoding="utf-8", errors="replace").rpartition("\n")[0]
    try:
        return [json.loads(line)["class"] for line in whole.splitlines() if line.strip()]
    except (ValueError, KeyError):
        return []


# ----------------------------------------------------------------------------- prompts, exactly

def test_cbd_prompt_is_the_papers_exactly(tmp_path, llm):
    classes = class_file(tmp_path, ["Black_footed_Albatross", "Horned Puffin"], llm)
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out, "--llm", "test-model")
    assert result.exit_code == 0, result.output
    sent = {r["class"]: r["body"] for r in llm.requests}
    # the paper replaces '_' by ' ' before filling the prompt
    assert sent["Black_footed_Albatross"]["messages"] == [
        {"role": "user", "content": CBD_PROMPT.replace("{category_name}", "Black footed Albatross")}]
    assert sent["Horned Puffin"]["messages"][0]["content"] == CBD_PROMPT.replace("{category_name}", "Horned Puffin")
    # the paper's settings: temperature 0, 100 tokens
    assert sent["Horned Puffin"]["temperature"] == 0 and sent["Horned Puffin"]["max_tokens"] == 100
    assert sent["Horned Puffin"]["model"] == "test-model"
    recs = read_jsonl(out)
    assert [r["class"] for r in recs] == ["Black_footed_Albatross", "Horned Puffin"]
    assert recs[1]["descriptors"] == ["feature of Horned Puffin", "another feature"]
    assert recs[1]["style"] == "cbd" and recs[1]["model"] == "test-model"
    assert re.fullmatch(r"[0-9a-f]{16}", recs[1]["prompt_sha"]) and recs[0]["prompt_sha"] == recs[1]["prompt_sha"]
    assert "raw" not in recs[1] and "kinds" not in recs[1]


EXEMPLARS = """\
# worked example from the target domain
Sooty Albatross
- dark grey or sooty plumage overall
- white rings around the eyes
background:
- solitary or in small groups, usually found over open ocean
"""


def test_domain_prompt_text_exactly(tmp_path, llm):
    classes = class_file(tmp_path, ["Laysan_Albatross"], llm)
    ex = tmp_path / "ex.txt"
    ex.write_text(EXEMPLARS, encoding="utf-8")
    result = describe(llm, classes, "--style", "domain", "--exemplars", ex, "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 0, result.output
    assert llm.requests[0]["body"]["messages"][0]["content"] == (
        "Q: What are useful visual features for distinguishing a Sooty Albatross in a photo?\n"
        "A: There are several useful visual features to tell there is a Sooty Albatross in a photo:\n"
        "- dark grey or sooty plumage overall\n"
        "- white rings around the eyes\n"
        "\n"
        "Q: What are useful features for distinguishing a Laysan Albatross in a photo?\n"
        "A: There are several useful visual features to tell there is a Laysan Albatross in a photo:\n"
        "-\n")


def test_domain_with_the_papers_examples_is_the_cbd_prompt(tmp_path):
    ex = tmp_path / "ex.txt"
    ex.write_text("lemur\n" + "".join(f"- {d}\n" for d in [
        "four-limbed primate", "black, grey, white, brown, or red-brown", "wet and hairless nose with curved nostrils",
        "long tail", "large eyes", "furry bodies", "clawed hands and feet"]) + "\ntelevision\n" + "".join(
        f"- {d}\n" for d in ["electronic device", "black or grey", "a large, rectangular screen",
                             "a stand or mount to support the screen", "one or more speakers", "a power cord",
                             "input ports for connecting to other devices", "a remote control"]), encoding="utf-8")
    from vlmtools.describe.styles import read_exemplars

    plan = build_plan("domain", builtin_template("domain"), exemplars=read_exemplars(ex))
    assert plan.prompt("Red_winged_Blackbird") == CBD_PROMPT.replace("{category_name}", "Red winged Blackbird")


def test_background_prompt_text_exactly_and_kinds(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    ex = tmp_path / "ex.txt"
    ex.write_text(EXEMPLARS, encoding="utf-8")
    llm.answer = lambda cls, body: ("- bright orange legs and feet\n- two black horns on the head\n"
                                    "Typical surroundings, habitat and behaviour:\n"
                                    "- often seen in large colonies\n- rocky coasts and islands")
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--style", "background", "--exemplars", ex, "-o", out)
    assert result.exit_code == 0, result.output
    assert llm.requests[0]["body"]["messages"][0]["content"] == (
        "Q: What are useful visual features for distinguishing a Sooty Albatross in a photo, and where and how "
        "is it typically seen?\n"
        "A: There are several useful visual features to tell there is a Sooty Albatross in a photo:\n"
        "- dark grey or sooty plumage overall\n"
        "- white rings around the eyes\n"
        "Typical surroundings, habitat and behaviour:\n"
        "- solitary or in small groups, usually found over open ocean\n"
        "\n"
        "Q: What are useful features for distinguishing a Horned Puffin in a photo, and where and how is it "
        "typically seen?\n"
        "A: There are several useful visual features to tell there is a Horned Puffin in a photo:\n"
        "-\n")
    rec = read_jsonl(out)[0]
    assert rec["descriptors"] == ["bright orange legs and feet", "two black horns on the head",
                                  "often seen in large colonies", "rocky coasts and islands"]
    assert rec["kinds"] == ["object", "object", "background", "background"]
    # `descriptors export --kind object` drops the background ones
    result = runner.invoke(app, ["descriptors", "export", str(out), "--kind", "object"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"Horned Puffin": ["bright orange legs and feet",
                                                          "two black horns on the head"]}


def test_background_default_examples_have_a_background_section(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    result = describe(llm, classes, "--style", "background", "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 0, result.output
    prompt = llm.requests[0]["body"]["messages"][0]["content"]
    assert prompt.count("Typical surroundings, habitat and behaviour:\n- ") == 2
    assert prompt.startswith("Q: What are useful visual features for distinguishing a lemur in a photo, and where")


def test_structured_prompt_text_exactly(tmp_path, llm):
    classes = class_file(tmp_path, ["Black_footed_Albatross"], llm)
    llm.answer = lambda cls, body: ("Here is the description:\n**Size:** It has a wingspan of about 2 m.\n"
                                    "Coloration: predominantly dark brown to black\n- Beak: large, black, hooked\n"
                                    "Wings: long and narrow")
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--style", "structured", "--fields", "size, coloration,beak,feet", "-o", out)
    assert result.exit_code == 0, result.output
    assert llm.requests[0]["body"]["messages"][0]["content"] == (
        "Describe how a Black footed Albatross looks in a photo, one visual aspect at a time.\n"
        "Answer with exactly one line per field, in this format, and nothing else:\n"
        "Size: <size>\nColoration: <coloration>\nBeak: <beak>\nFeet: <feet>\n")
    # requested fields only, in the requested order; a missing field (feet) is just missing
    assert read_jsonl(out)[0]["descriptors"] == ["size: It has a wingspan of about 2 m.",
                                                 "coloration: predominantly dark brown to black",
                                                 "beak: large, black, hooked"]


def test_structured_default_fields_are_animal_parts(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    result = describe(llm, classes, "--style", "structured", "--print-prompts")
    assert result.exit_code == 0, result.output
    prompt = json.loads(result.stdout)["prompt"]
    for line in ("Size: <size>", "Coloration: <coloration>", "Beak or mouth: <beak or mouth>", "Eyes: <eyes>",
                 "Legs and feet: <legs and feet>"):
        assert line in prompt.splitlines()
    assert llm.requests == []  # --print-prompts asks nothing


def test_sentences_prompt_text_exactly(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    llm.answer = lambda cls, body: ("Sure! Here are the sentences:\n\n1. this bird has a white face.\n"
                                    "2. the bird is black and white with orange feet.\n\n"
                                    "3) this bird has a large bill.")
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--style", "sentences", "--count", "3", "-o", out)
    assert result.exit_code == 0, result.output
    body = llm.requests[0]["body"]
    assert body["messages"][0]["content"] == (
        "Write 3 different sentences that describe what a Horned Puffin looks like in a photo, in the style of "
        "short captions written by people looking at the image (for example: \"this small bird has a red crown, "
        "a short pointed beak and white bars on its wings.\").\n"
        "Each sentence should mention a few visible parts with their colors, shapes or sizes; vary the wording "
        "and the details from sentence to sentence.\n"
        "Refer to it generically (for example \"this bird\") instead of by its name.\n"
        "Write one sentence per line, with no numbering and nothing else.\n")
    assert body["temperature"] == 0.7
    assert read_jsonl(out)[0]["descriptors"] == ["this bird has a white face.",
                                                 "the bird is black and white with orange feet.",
                                                 "this bird has a large bill."]


def test_domain_exemplar_is_asked_once_then_cached(tmp_path, llm):
    classes = class_file(tmp_path, ["Laysan Albatross", "Horned Puffin", "Sooty Albatross"], llm)

    def answer(cls, body):
        prompt = body["messages"][0]["content"]
        if prompt.startswith("Here is an example"):
            return "Name: **Sooty Albatross**\n- dark grey plumage\n- white eye rings"
        return f"- feature of {cls}"

    llm.answer = answer
    result = describe(llm, classes, "--style", "domain", "--domain", "bird species", "-o", tmp_path / "a.jsonl")
    assert result.exit_code == 0, result.output
    exemplar_asks = [r for r in llm.requests if r["body"]["messages"][0]["content"].startswith("Here is an example")]
    assert len(exemplar_asks) == 1
    assert "Now do the same for one well-known bird species." in exemplar_asks[0]["body"]["messages"][0]["content"]
    class_prompts = [r["body"]["messages"][0]["content"] for r in llm.requests if r not in exemplar_asks]
    assert len(class_prompts) == 3
    assert all(p.startswith("Q: What are useful visual features for distinguishing a Sooty Albatross in a photo?\n"
                            "A: There are several useful visual features to tell there is a Sooty Albatross in a "
                            "photo:\n- dark grey plumage\n- white eye rings\n\n") for p in class_prompts)
    # a second run into another file is free: exemplar and answers come from the cache
    before = len(llm.requests)
    result = describe(llm, classes, "--style", "domain", "--domain", "bird species", "-o", tmp_path / "b.jsonl")
    assert result.exit_code == 0, result.output
    assert len(llm.requests) == before
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


def test_prompt_file_with_the_papers_field_name(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned_Puffin"], llm)
    tpl = tmp_path / "p.txt"
    tpl.write_text('List features of a {category_name} as JSON like {"x": 1}:\n', encoding="utf-8")
    llm.answer = lambda cls, body: '```json\n["orange feet", "black horns", "orange feet"]\n```'
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--prompt-file", tpl, "-o", out)
    assert result.exit_code == 0, result.output
    prompt = llm.requests[0]["body"]["messages"][0]["content"]
    assert prompt == 'List features of a Horned Puffin as JSON like {"x": 1}:\n'
    assert read_jsonl(out)[0]["descriptors"] == ["orange feet", "black horns"]


# ----------------------------------------------------------------------------- parsing

def test_parse_cbd_is_the_papers_rule():
    text = "- long tail\n-  two spaces kept\n-no space dropped\n* star dropped\n1. number dropped\n\n- last "
    assert parse_cbd(text) == ["long tail", " two spaces kept", "last "]
    assert parse_cbd("- a\n- a") == ["a", "a"]  # no de-duplication, as theirs
    assert parse_cbd("") == []


@pytest.mark.parametrize("answer, expected", [
    ("1. long tail\n2. large eyes\n3) furry body", ["long tail", "large eyes", "furry body"]),
    ("* long tail\n* large eyes", ["long tail", "large eyes"]),
    ("• long tail\n\n\n• large eyes\n", ["long tail", "large eyes"]),
    ('["long tail", "large eyes"]', ["long tail", "large eyes"]),
    ('```json\n{"features": ["long tail", "large eyes"]}\n```', ["long tail", "large eyes"]),
    ("Here are useful features:\n- **long tail**\n- large eyes\n- Long  tail", ["long tail", "large eyes"]),
    ("long tail\nlarge eyes", ["long tail", "large eyes"]),
    ("Features:\n", []),
    ("", []),
])
def test_parse_lines_odd_shapes(answer, expected):
    assert parse_lines(answer) == expected


def test_parse_background_and_structured():
    descs, kinds = parse_background("- orange feet\n**Habitat and behaviour:**\n- rocky coasts\n- orange feet")
    assert descs == ["orange feet", "rocky coasts"] and kinds == ["object", "background"]
    assert parse_structured("1. SIZE: small\n**Beak/Mouth**: short\nTail:\nnoise", ["size", "beak/mouth", "tail"]) \
        == ["size: small", "beak/mouth: short"]
    # the adapter study's answer shape, read with the default animal fields
    answer = ("Size: wingspan of about 2 m\nColoration: dark brown to black\nBeak: large, black, hooked\n"
              "Feet: black\nEyes: dark")
    assert parse_structured(answer, ["size", "coloration", "beak or mouth", "eyes", "legs and feet"]) == [
        "size: wingspan of about 2 m", "coloration: dark brown to black", "beak or mouth: large, black, hooked",
        "eyes: dark", "legs and feet: black"]


def test_cbd_falls_back_to_loose_parsing_for_numbered_answers(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    llm.answer = lambda cls, body: "Sure:\n1. orange feet\n2. black horns"
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out, "--keep-raw")
    assert result.exit_code == 0, result.output
    rec = read_jsonl(out)[0]
    assert rec["descriptors"] == ["orange feet", "black horns"]
    assert rec["raw"] == ["Sure:\n1. orange feet\n2. black horns"]
    assert "parsed loosely" in err(result)


def test_empty_and_unparseable_answers_are_errors_not_empty_lists(tmp_path, llm):
    classes = class_file(tmp_path, ["Empty Bird", "Colon Bird", "Good Bird"], llm)
    llm.answer = lambda cls, body: {"Empty Bird": "", "Colon Bird": "Features:"}.get(cls, "- fine")
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 1
    assert [r["class"] for r in read_jsonl(out)] == ["Good Bird"]
    errors = {e["class"]: e for e in read_jsonl(Path(f"{out}.errors.jsonl"))}
    assert errors["Empty Bird"]["reason"] == "empty answer"
    assert errors["Colon Bird"]["reason"] == "no descriptors found in the answer"
    assert errors["Colon Bird"]["raw"] == ["Features:"]


# ----------------------------------------------------------------------------- samples, concurrency, order

def test_n_samples_are_merged_and_deduplicated(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    answers = iter(["- orange feet\n- black horns", "- black horns\n- white face", "- orange feet"])
    llm.answer = lambda cls, body: next(answers)
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out, "--n", "3", "--temperature", "1", "-j", "1")
    assert result.exit_code == 0, result.output
    assert read_jsonl(out)[0]["descriptors"] == ["orange feet", "black horns", "white face"]
    assert len(llm.requests) == 3 and all(r["body"]["temperature"] == 1 for r in llm.requests)


def test_concurrency_and_stdout_keeps_class_order(tmp_path, llm):
    names = [f"Bird {i}" for i in range(8)]
    classes = class_file(tmp_path, names, llm)
    four_at_once = threading.Event()

    def slow(cls, body):
        # Hold every answer until 4 requests are in flight together (never, if they were sent one by
        # one: then the gate opens after its timeout and max_in_flight tells), then later classes finish first.
        if llm.in_flight >= 4:
            four_at_once.set()
        four_at_once.wait(LOADED_DEADLINE)  # opens as soon as 4 are in flight: long only when the test fails
        time.sleep(0.02 * (8 - int(cls.split()[1])))
        return f"- feature of {cls}"

    llm.answer = slow
    result = describe(llm, classes, "-j", "4")
    assert result.exit_code == 0, result.output
    assert llm.max_in_flight == 4  # -j 4: four at once, never more
    assert [json.loads(line)["class"] for line in result.stdout.splitlines()] == names


def test_file_output_is_in_class_order_after_concurrent_run(tmp_path, llm):
    names = [f"Bird {i}" for i in range(6)]
    classes = class_file(tmp_path, names, llm)
    llm.answer = lambda cls, body: (time.sleep(0.3 - 0.05 * int(cls.split()[1])), f"- f {cls}")[1]
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-j", "6", "-o", out)
    assert result.exit_code == 0, result.output
    assert [r["class"] for r in read_jsonl(out)] == names


# ----------------------------------------------------------------------------- resume

def test_resume_after_a_killed_run(tmp_path, llm, spawn):
    names = [f"Bird {i}" for i in range(6)]
    classes = class_file(tmp_path, names, llm)
    release = threading.Event()

    def hang_after_three(cls, body):
        if int(cls.split()[1]) >= 3:
            release.wait(2 * LOADED_DEADLINE)  # the first run is killed while these are in flight
        return f"- feature of {cls}"

    llm.answer = hang_after_three
    out = tmp_path / "d.jsonl"
    args = [sys.executable, "-m", "vlmtools", "describe", str(classes), "-o", str(out), "--base-url", llm.url,
            "-j", "1", "--no-cache", "--timeout", str(4 * LOADED_DEADLINE)]
    proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        wait_until(lambda: len(classes_so_far(out)) == 3 and len(llm.requests) >= 4,
                   "the first run reaching the hanging class")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=LOADED_DEADLINE)
    finally:
        release.set()
    assert proc.returncode == -signal.SIGKILL
    assert [r["class"] for r in read_jsonl(out)] == names[:3]
    # a torn line, as a kill in the middle of a write would leave
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"class": "Bird 3", "descri')

    llm.answer = lambda cls, body: f"- feature of {cls}"
    seen_before = len(llm.requests)
    rerun = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert "dropped an incomplete last line" in err(rerun)
    assert "3 of 6 classes already in" in err(rerun)
    assert sorted(llm.asked_classes()[seen_before:]) == names[3:]  # done classes were not asked again
    recs = read_jsonl(out)
    assert [r["class"] for r in recs] == names
    assert all(r["descriptors"] == [f"feature of {r['class']}"] for r in recs)


def test_resume_refuses_to_mix_styles_and_no_resume_starts_over(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    out = tmp_path / "d.jsonl"
    assert describe(llm, classes, "-o", out).exit_code == 0
    before = out.read_text()
    result = describe(llm, classes, "-o", out, "--style", "sentences")
    assert result.exit_code == 2
    assert f"{out}:1" in err(result) and "style 'cbd'" in err(result)
    assert out.read_text() == before
    result = describe(llm, classes, "-o", out, "--style", "sentences", "--no-resume")
    assert result.exit_code == 0, result.output
    assert [r["style"] for r in read_jsonl(out)] == ["sentences"]


def test_resume_into_a_file_that_is_not_descriptors_changes_nothing(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    for content in ("Horned Puffin\nSooty Albatross", '{"class": "a", "descriptors": ["x"]}\nnot json at all'):
        out = tmp_path / "notes.txt"
        out.write_text(content, encoding="utf-8")
        result = describe(llm, classes, "-o", out)
        assert result.exit_code == 2, result.output
        assert str(out) in err(result)
        assert out.read_text(encoding="utf-8") == content
    assert llm.requests == []


OLD_LINE = json.dumps({"class": "Old Bird", "descriptors": ["from an earlier run"], "style": "cbd"}) + "\n"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_resume_keeps_the_old_file_until_a_new_class_succeeds(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin", "Sooty Albatross"], llm)
    out = tmp_path / "d.jsonl"
    out.write_text(OLD_LINE, encoding="utf-8")
    # every class fails
    llm.answer = lambda cls, body: error(503)
    result = describe(llm, classes, "-o", out, "--no-resume")
    assert result.exit_code == 1
    assert out.read_text(encoding="utf-8") == OLD_LINE
    assert sorted(e["class"] for e in read_jsonl(Path(f"{out}.errors.jsonl"))) == ["Horned Puffin", "Sooty Albatross"]
    # the server is down
    result = runner.invoke(app, ["describe", str(classes), "-o", str(out), "--no-resume", "--max-retries", "0",
                                 "--base-url", f"http://127.0.0.1:{free_port()}/v1"])
    assert result.exit_code == 1 and "cannot reach" in err(result)
    assert out.read_text(encoding="utf-8") == OLD_LINE
    assert list(tmp_path.glob(".d.jsonl.*")) == []  # no temp files left beside it
    # one class succeeds: now the file is the new run's
    llm.answer = lambda cls, body: error(503) if cls == "Sooty Albatross" else f"- feature of {cls}"
    result = describe(llm, classes, "-o", out, "--no-resume")
    assert result.exit_code == 1
    assert [r["class"] for r in read_jsonl(out)] == ["Horned Puffin"]


def test_interrupt_before_any_result_keeps_the_old_file(tmp_path, llm, monkeypatch):
    from vlmtools.describe.llm import LLMClient

    classes = class_file(tmp_path, ["Horned Puffin", "Sooty Albatross"], llm)
    out = tmp_path / "d.jsonl"
    out.write_text(OLD_LINE, encoding="utf-8")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLMClient, "complete", interrupted)
    result = describe(llm, classes, "-o", out, "--no-resume", "-j", "1")
    assert result.exit_code == 130 and "interrupted" in err(result)
    assert out.read_text(encoding="utf-8") == OLD_LINE


def test_ctrl_c_exits_at_once_keeping_whole_lines(tmp_path, llm, spawn):
    names = [f"Bird {i}" for i in range(6)]
    classes = class_file(tmp_path, names, llm)
    out = tmp_path / "d.jsonl"
    out.write_text(OLD_LINE, encoding="utf-8")
    release = threading.Event()
    hang = 4 * LOADED_DEADLINE  # the requests in flight would take this long: far past the exit's deadline

    def hang_after_two(cls, body):
        if int(cls.split()[1]) >= 2:
            release.wait(hang)
        return f"- feature of {cls}"

    llm.answer = hang_after_two
    args = [sys.executable, "-m", "vlmtools", "describe", str(classes), "-o", str(out), "--base-url", llm.url,
            "-j", "2", "--no-cache", "--no-resume", "--timeout", str(2 * hang)]
    proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:  # Bird 0 and 1 written, Bird 2 and 3 in flight
        wait_until(lambda: sorted(classes_so_far(out)) == names[:2] and len(llm.requests) >= 4,
                   "the run reaching the hanging classes")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=LOADED_DEADLINE)  # at once: not after the requests in flight
    finally:
        release.set()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    # --no-resume replaced the old file at the first new class; the whole lines written stay
    assert out.read_text(encoding="utf-8").endswith("\n")
    assert sorted(r["class"] for r in read_jsonl(out)) == names[:2]


def test_existing_records_checks_whole_lines_before_dropping_a_torn_one(tmp_path):
    from vlmtools.describe.run import existing_records
    from vlmtools.errors import BadInput

    out = tmp_path / "d.jsonl"
    content = OLD_LINE + '{"class": "Bird 1"}\n{"class": "Bird 2", "descri'  # line 2 is no descriptor line
    out.write_text(content, encoding="utf-8")
    with pytest.raises(BadInput, match=rf"^{re.escape(str(out))}:2: .*needs \"class\" and \"descriptors\""):
        existing_records(out)
    assert out.read_text(encoding="utf-8") == content and list(tmp_path.iterdir()) == [out]
    out.write_text(OLD_LINE + '{"class": "Bird 2", "descri', encoding="utf-8")
    assert list(existing_records(out)) == ["Old Bird"]
    assert out.read_text(encoding="utf-8") == OLD_LINE


def test_a_last_line_without_newline_is_kept(tmp_path, llm):
    classes = class_file(tmp_path, ["Old Bird", "Horned Puffin"], llm)
    out = tmp_path / "d.jsonl"
    out.write_text(OLD_LINE.rstrip("\n"), encoding="utf-8")  # as an editor may save it
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 0, result.output
    assert "incomplete last line" not in err(result)
    assert [r["class"] for r in read_jsonl(out)] == ["Old Bird", "Horned Puffin"]
    assert llm.asked_classes() == ["Horned Puffin"]


# ----------------------------------------------------------------------------- cache

def test_cache_hits_make_reruns_free_and_hold_no_key(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin", "Sooty Albatross"], llm)
    cache = tmp_path / "cache"
    assert describe(llm, classes, "-o", tmp_path / "a.jsonl", "--cache-dir", cache).exit_code == 0
    assert len(llm.requests) == 2
    result = describe(llm, classes, "-o", tmp_path / "b.jsonl", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert len(llm.requests) == 2  # all from the cache
    assert "2 from cache" in err(result)
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")
    files = list(cache.rglob("*.json"))
    assert len(files) == 2
    entry = json.loads(files[0].read_text())
    assert entry["request"]["model"] == "gpt-4o-mini" and entry["request"]["base_url"].startswith("http://127.0.0.1")
    assert all(SECRET not in f.read_text() for f in files)
    # a different parameter is a different request
    assert describe(llm, classes, "-o", tmp_path / "c.jsonl", "--cache-dir", cache, "--max-tokens", "50").exit_code == 0
    assert len(llm.requests) == 4
    # --no-cache asks again
    assert describe(llm, classes, "-o", tmp_path / "d.jsonl", "--no-cache").exit_code == 0
    assert len(llm.requests) == 6


def test_an_answer_cut_off_at_max_tokens_is_still_reported_when_it_comes_from_the_cache(tmp_path, llm):
    # the rerun costs nothing, but must not hide that the answer's last descriptor may be partial
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    llm.answer = lambda cls, body: completion("- orange bill\n- black ba", finish_reason="length")
    for out in ("a.jsonl", "b.jsonl"):
        result = describe(llm, classes, "-o", tmp_path / out, "--cache-dir", tmp_path / "cache")
        assert result.exit_code == 0, result.output
        assert "1 answers were cut off at --max-tokens" in err(result)
    assert len(llm.requests) == 1 and "1 from cache" in err(result)


@pytest.mark.parametrize("entry", ['["- a list, not an answer"]', '{"request": {}}', '{"text": null}'])
def test_a_cache_entry_that_holds_no_answer_is_asked_again(tmp_path, llm, entry):
    # a hand-edited or foreign file where an answer should be: ask the server again, never crash on it
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    cache = tmp_path / "cache"
    assert describe(llm, classes, "-o", tmp_path / "a.jsonl", "--cache-dir", cache).exit_code == 0
    [file] = cache.rglob("*.json")
    file.write_text(entry)
    result = describe(llm, classes, "-o", tmp_path / "b.jsonl", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert len(llm.requests) == 2
    assert read_jsonl(tmp_path / "b.jsonl") == read_jsonl(tmp_path / "a.jsonl")
    assert json.loads(file.read_text())["text"] == "- feature of Horned Puffin\n- another feature"  # rewritten


def test_the_cache_file_of_a_request_is_stable_and_ignores_field_order(tmp_path):
    # vlmtools-describe(1), CACHE: an answer lives in DIR/KEY[:2]/KEY.json, KEY the sha256 of the request as
    # compact JSON (sorted keys, "," and ":" without spaces, non-ASCII kept, UTF-8). Written out here by
    # hand, so that a cache filled by an earlier release (paid-for answers) is still found after an upgrade.
    import hashlib

    from vlmtools.describe.cache import ResponseCache

    request = {"model": "gpt-4o-mini", "base_url": "http://h/v1", "sample": 0, "max_tokens": 300,
               "temperature": 0.7, "messages": [{"role": "user", "content": "Pájaro «café»?"}]}
    canonical = ('{"base_url":"http://h/v1","max_tokens":300,"messages":[{"content":"Pájaro «café»?",'
                 '"role":"user"}],"model":"gpt-4o-mini","sample":0,"temperature":0.7}')
    key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    cache = ResponseCache(tmp_path)
    cache.put(request, "- wings", "stop")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")] == [f"{key[:2]}/{key}.json"]
    reordered = dict(reversed(list(request.items())))
    assert cache.get(reordered)["text"] == "- wings"  # the same request, built in another order
    cache.discard(reordered)
    assert cache.get(request) is None and not list(tmp_path.rglob("*.json"))


def test_default_cache_dir_follows_vlmtools_cache_dir(tmp_path, llm, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_CACHE_DIR", str(tmp_path / "root"))
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    assert describe(llm, classes, "-o", tmp_path / "a.jsonl").exit_code == 0
    assert len(list((tmp_path / "root" / "llm").rglob("*.json"))) == 1


# ----------------------------------------------------------------------------- failures and retries

def test_429_then_success(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    llm.server.expect_oneshot_request("/v1/chat/completions", method="POST").respond_with_response(
        error(429, "slow down"))
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 0, result.output
    assert len(llm.server.log) == 2 and llm.server.log[0][1].status_code == 429
    assert read_jsonl(out)[0]["descriptors"] == ["feature of Horned Puffin", "another feature"]
    assert not Path(f"{out}.errors.jsonl").exists()


def test_500_forever_goes_to_the_errors_file_and_exit_code(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin", "Broken Bird", "Sooty Albatross"], llm)
    llm.answer = lambda cls, body: error(500, "kaputt") if cls == "Broken Bird" else f"- feature of {cls}"
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 1
    assert "1 of 3 classes failed" in err(result)
    assert [r["class"] for r in read_jsonl(out)] == ["Horned Puffin", "Sooty Albatross"]
    errors = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert [e["class"] for e in errors] == ["Broken Bird"]
    assert "HTTP 500" in errors[0]["reason"] and "kaputt" in errors[0]["reason"]
    assert llm.asked_classes().count("Broken Bird") == 2  # one try + --max-retries 1
    # the server recovers: a rerun asks only for the failed class and clears the errors file
    llm.answer = lambda cls, body: f"- feature of {cls}"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 0, result.output
    assert llm.asked_classes()[-1] == "Broken Bird" and llm.asked_classes().count("Horned Puffin") == 1
    assert [r["class"] for r in read_jsonl(out)] == ["Horned Puffin", "Broken Bird", "Sooty Albatross"]
    assert not Path(f"{out}.errors.jsonl").exists()


def test_timeouts(tmp_path, llm):
    classes = class_file(tmp_path, ["Slow Bird", "Fast Bird"], llm)
    release = threading.Event()
    # Slow Bird's answer never comes before --timeout 4; Fast Bird's is immediate, with room to spare on a
    # loaded machine.
    llm.answer = lambda cls, body: (release.wait(LOADED_DEADLINE) if cls == "Slow Bird" else None,
                                    f"- feature of {cls}")[1]
    out = tmp_path / "d.jsonl"
    try:
        result = runner.invoke(app, ["describe", str(classes), "-o", str(out), "--base-url", llm.url,
                                     "--timeout", "4", "--max-retries", "0", "--errors", str(tmp_path / "err.jsonl")])
    finally:
        release.set()  # let the server's handler finish now, not during a later test
    assert result.exit_code == 1
    assert [r["class"] for r in read_jsonl(out)] == ["Fast Bird"]
    errors = read_jsonl(tmp_path / "err.jsonl")
    assert [e["class"] for e in errors] == ["Slow Bird"] and "timed out after 4s" in errors[0]["reason"]
    deadline = time.monotonic() + 5
    while len(llm.server.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


def test_malformed_json_responses(tmp_path, llm):
    classes = class_file(tmp_path, ["Garbled Bird", "Shapeless Bird", "Good Bird"], llm)

    def answer(cls, body):
        if cls == "Garbled Bird":
            return Response("this is { not json", content_type="application/json")
        if cls == "Shapeless Bird":
            return Response(json.dumps({"unexpected": True}), content_type="application/json")
        return f"- feature of {cls}"

    llm.answer = answer
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 1
    reasons = {e["class"]: e["reason"] for e in read_jsonl(Path(f"{out}.errors.jsonl"))}
    assert set(reasons) == {"Garbled Bird", "Shapeless Bird"}
    assert all("malformed response" in r for r in reasons.values())
    assert [r["class"] for r in read_jsonl(out)] == ["Good Bird"]


def test_failures_with_stdout_output_are_each_listed_on_stderr(tmp_path, llm):
    broken = [f"Broken Bird {i}" for i in range(7)]
    classes = class_file(tmp_path, ["Good Bird", *broken], llm)
    llm.answer = lambda cls, body: error(500, f"kaputt {cls}") if cls.startswith("Broken") else f"- feature of {cls}"
    result = describe(llm, classes, "-j", "8")
    assert result.exit_code == 1
    assert [json.loads(line)["class"] for line in result.stdout.splitlines()] == ["Good Bird"]
    for cls in broken:  # all of them, not the first five: there is no errors file to look in
        assert f"{cls}: HTTP 500 after 1 retries: kaputt {cls}" in err(result)
    assert "7 of 8 classes failed" in err(result)
    assert list(tmp_path.glob("*.errors.jsonl")) == []
    # --errors still works with stdout output
    result = describe(llm, classes, "-j", "8", "--errors", tmp_path / "e.jsonl")
    assert result.exit_code == 1
    assert sorted(e["class"] for e in read_jsonl(tmp_path / "e.jsonl")) == broken


def test_rich_markup_in_server_text_and_paths_is_shown_as_written(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin", "Odd Bird"], llm)
    llm.answer = lambda cls, body: (error(500, "unexpected [/INST] token [bold]") if cls == "Odd Bird"
                                    else f"- feature of {cls}")
    out = tmp_path / "[/b]" / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 1, result.output
    assert "unexpected [/INST] token [bold]" in err(result)
    assert f"wrote 1 classes to {out}" in err(result)
    llm.answer = lambda cls, body: f"- feature of {cls}"
    result = describe(llm, classes, "-o", out)  # the resume message names the path too
    assert result.exit_code == 0, result.output
    assert f"1 of 2 classes already in {out}" in err(result)


def test_every_class_failing_writes_no_output(tmp_path, llm):
    classes = class_file(tmp_path, ["Broken Bird"], llm)
    llm.answer = lambda cls, body: error(503)
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out)
    assert result.exit_code == 1
    assert not out.exists() and Path(f"{out}.errors.jsonl").exists()


def test_the_api_key_never_appears_anywhere(tmp_path, llm):
    classes = class_file(tmp_path, ["Echo Bird", "Good Bird"], llm)

    def answer(cls, body):
        if cls == "Echo Bird":  # a careless server that echoes the key in its error message
            return error(400, f"invalid request with key {SECRET}")
        return f"- feature of {cls}"

    llm.answer = answer
    out = tmp_path / "d.jsonl"
    cache = tmp_path / "cache"
    result = describe(llm, classes, "-o", out, "--cache-dir", cache, "--keep-raw")
    assert result.exit_code == 1
    assert all(r["auth"] == f"Bearer {SECRET}" for r in llm.requests)  # the key was used...
    # rich wraps long stderr lines; join them so a wrapped key would still be found
    texts = [result.stdout, result.stderr.replace("\n", ""), out.read_text(),
             Path(f"{out}.errors.jsonl").read_text()]
    texts += [f.read_text() for f in cache.rglob("*") if f.is_file()]
    assert all(SECRET not in t for t in texts)  # ...and shown nowhere
    assert "[redacted]" in Path(f"{out}.errors.jsonl").read_text()


def test_rejected_key_stops_the_run(tmp_path, llm):
    classes = class_file(tmp_path, [f"Bird {i}" for i in range(5)], llm)
    llm.answer = lambda cls, body: error(401, f"Incorrect API key provided: {SECRET}")
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out, "-j", "1")
    assert result.exit_code == 2
    assert "refused the API key (HTTP 401)" in err(result) and SECRET not in result.stderr.replace("\n", "")
    assert len(llm.requests) < 5 and not out.exists()


def test_unknown_model_is_model_unavailable(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    llm.answer = lambda cls, body: error(404, "The model `nope` does not exist")
    result = describe(llm, classes, "-m", "nope", "-o", tmp_path / "d.jsonl")  # the old spelling, one release
    assert result.exit_code == 2
    assert "model 'nope'" in err(result) and "404" in err(result)
    assert "-m is deprecated here, use --llm" in err(result)


def test_api_key_only_from_the_environment(tmp_path, llm, monkeypatch):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    monkeypatch.delenv("OPENAI_API_KEY")
    result = runner.invoke(app, ["describe", str(classes), "--base-url", "https://llm.example.invalid/v1"])
    assert result.exit_code == 2 and "OPENAI_API_KEY is not set" in err(result)
    # a server on this machine gets a placeholder key
    result = describe(llm, classes, "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 0, result.output
    assert llm.requests[0]["auth"].startswith("Bearer ") and len(llm.requests[0]["auth"]) > len("Bearer ")
    # OPENAI_BASE_URL and VLMTOOLS_LLM_MODEL are read from the environment
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)
    monkeypatch.setenv("VLMTOOLS_LLM_MODEL", "env-model")
    result = runner.invoke(app, ["describe", str(classes), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert llm.requests[-1]["body"]["model"] == "env-model"
    assert json.loads(result.stdout)["model"] == "env-model"


def test_default_model_is_one_constant(tmp_path, llm):
    from vlmtools.describe.llm import DEFAULT_MODEL, LLMClient

    assert LLMClient().model == DEFAULT_MODEL
    result = runner.invoke(app, ["describe", "--help"])
    assert result.exit_code == 0 and f"default: {DEFAULT_MODEL}]" in result.stdout
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    assert describe(llm, classes, "-o", tmp_path / "d.jsonl").exit_code == 0
    assert llm.requests[0]["body"]["model"] == DEFAULT_MODEL


def test_print_prompts_needs_no_key_and_no_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    classes = class_file(tmp_path, ["Horned_Puffin", "Sooty Albatross"])
    result = runner.invoke(app, ["describe", str(classes), "--print-prompts"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{"class": "Horned_Puffin", "prompt": CBD_PROMPT.replace("{category_name}", "Horned Puffin")},
                    {"class": "Sooty Albatross", "prompt": CBD_PROMPT.replace("{category_name}", "Sooty Albatross")}]


# ----------------------------------------------------------------------------- waffle

def test_waffle_needs_no_llm_and_is_seeded(tmp_path, llm, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    classes = class_file(tmp_path, ["Black_footed_Albatross", "Horned Puffin", "Sooty Albatross"])
    a = runner.invoke(app, ["describe", str(classes), "--style", "waffle", "--seed", "1"])
    b = runner.invoke(app, ["describe", str(classes), "--style", "waffle", "--seed", "1"])
    c = runner.invoke(app, ["describe", str(classes), "--style", "waffle", "--seed", "2", "--waffle-count", "4"])
    assert a.exit_code == b.exit_code == c.exit_code == 0, a.output
    recs = [json.loads(line) for line in a.stdout.splitlines()]
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert [r["class"] for r in recs] == ["Black_footed_Albatross", "Horned Puffin", "Sooty Albatross"]
    assert all(r["descriptors"] == recs[0]["descriptors"] and r["style"] == "waffle" for r in recs)  # shared set
    descs = recs[0]["descriptors"]
    assert len(descs) == 30  # 15 pairs
    words, chars = descs[0::2], descs[1::2]
    assert all(len(w.split()) == 2 for w in words)  # class names have ~2.3 words -> 2
    assert all(re.fullmatch(r"[a-z0-9]+(, [a-z0-9]+)+", ch) for ch in chars)
    assert len(json.loads(c.stdout.splitlines()[0])["descriptors"]) == 8
    assert llm.requests == []


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra, message", [
    (["--style", "poetic"], "'poetic' is not one of"),
    (["--style", "domain"], "--exemplars FILE or --domain"),
    (["--fields", "size"], "--fields has no effect"),
    (["--exemplars", "EX"], "did you mean --style domain"),
    (["--prompt-file", "BADTPL"], "unknown template field {category}"),
    (["--style", "domain", "--exemplars", "BADEX"], "expected a class name before"),
    (["--temperature", "5"], "--temperature 5"),
    (["--n", "0"], "--n 0"),
])
def test_bad_input_exit_2_and_nothing_written(tmp_path, llm, extra, message):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    (tmp_path / "ex.txt").write_text(EXEMPLARS, encoding="utf-8")
    (tmp_path / "bad_tpl.txt").write_text("a line\nfeatures of {category}?\n", encoding="utf-8")
    (tmp_path / "bad_ex.txt").write_text("- orphan descriptor\n", encoding="utf-8")
    paths = {"EX": tmp_path / "ex.txt", "BADTPL": tmp_path / "bad_tpl.txt", "BADEX": tmp_path / "bad_ex.txt"}
    extra = [str(paths.get(x, x)) for x in extra]
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "-o", out, *extra)
    assert result.exit_code == 2, result.output
    assert message in err(result)
    assert "Traceback" not in result.output
    assert not out.exists() and llm.requests == []


@pytest.mark.parametrize("which", ["classes", "prompt-file", "exemplars", "waffle-words", "output"])
def test_files_that_are_not_utf8_are_bad_input(tmp_path, llm, which):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    bad = tmp_path / "latin1.txt"
    content = {"classes": "Horned Puffin\ncaf\xe9 Bird\n", "prompt-file": "Describe a {class}\ncaf\xe9\n",
               "exemplars": "Sooty Albatross\n- caf\xe9-brown back\n", "waffle-words": "tail\ncaf\xe9\n",
               "output": '{"class": "Horned Puffin", "descriptors": ["caf\xe9"]}\n'}[which]
    bad.write_bytes(content.encode("latin-1"))
    args = {"classes": [bad], "prompt-file": [classes, "--prompt-file", bad],
            "exemplars": [classes, "--style", "domain", "--exemplars", bad],
            "waffle-words": [classes, "--style", "waffle", "--waffle-words", bad],
            "output": [classes, "-o", bad]}[which]
    result = describe(llm, *args)
    assert result.exit_code == 2, result.output
    assert re.search(rf"{re.escape(str(bad))}:\d+: not UTF-8 text", err(result)), err(result)
    assert "Traceback" not in result.output and result.stdout == ""
    assert bad.read_bytes() == content.encode("latin-1") and llm.requests == []


def test_bad_template_message_names_file_and_line(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    tpl = tmp_path / "t.txt"
    tpl.write_text("one\ntwo {clas}\n", encoding="utf-8")
    result = describe(llm, classes, "--prompt-file", tpl)
    assert result.exit_code == 2 and f"{tpl}:2" in err(result)


def test_missing_class_file_and_duplicate_classes(tmp_path, llm):
    result = describe(llm, tmp_path / "nope.txt")
    assert result.exit_code == 2 and "no such file" in err(result)
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n", encoding="utf-8")
    result = describe(llm, dup)
    assert result.exit_code == 2 and f"{dup}:3" in err(result)


def test_classes_from_a_manifest_on_stdin(tmp_path, llm):
    llm.classes = ["Horned Puffin", "Sooty Albatross"]
    manifest = "".join(json.dumps({"path": f"{i}.jpg", "label": lab}) + "\n"
                       for i, lab in enumerate(["Horned Puffin", "Sooty Albatross", "Horned Puffin"]))
    result = runner.invoke(app, ["describe", "-", "--base-url", llm.url], input=manifest)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["class"] for line in result.stdout.splitlines()] == ["Horned Puffin", "Sooty Albatross"]


# ----------------------------------------------------------------------------- no torch

def test_describe_imports_no_torch(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin"], llm)
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from vlmtools.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['describe', {str(classes)!r}, '--base-url', {llm.url!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'open_clip', 'faiss', 'numpy', 'torchvision', 'matplotlib'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert len(llm.requests) == 1  # it really asked


# ----------------------------------------------------------------------------- issue 14: secrets and locks

def test_a_key_echoed_by_the_server_is_redacted_from_output_and_cache(tmp_path, llm):
    from vlmtools.paths import cache_dir

    llm.answer = lambda cls, body: f"- wings\n- your key is {SECRET}\n"
    out = tmp_path / "d.jsonl"
    result = describe(llm, class_file(tmp_path, ["Puffin"], llm), "-o", out, "--keep-raw")
    assert result.exit_code == 0, result.output
    written = out.read_text() + "".join(p.read_text() for p in cache_dir("llm").rglob("*.json"))
    assert SECRET not in written and SECRET not in result.stderr and "[redacted]" in written


def test_credentials_in_the_base_url_are_never_printed_or_cached(tmp_path, llm):
    from vlmtools.paths import cache_dir

    url = llm.url.replace("http://", "http://alice:pa55word-xyz@")
    llm.answer = lambda cls, body: "- wings\n"
    out = tmp_path / "d.jsonl"
    result = runner.invoke(app, ["describe", str(class_file(tmp_path, ["Puffin"], llm)), "-o", str(out),
                                 "--base-url", url, "--max-retries", "0"])
    cached = "".join(p.read_text() for p in cache_dir("llm").rglob("*.json"))
    everything = result.stderr + result.stdout + cached + (out.read_text() if out.exists() else "")
    assert "pa55word-xyz" not in everything and "alice:" not in everything
    assert result.exit_code == 0, result.stderr


def test_a_stale_lock_is_taken_over_and_removed(tmp_path, llm):
    out = tmp_path / "d.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "d.jsonl.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    result = describe(llm, class_file(tmp_path, ["Puffin"], llm), "-o", out)
    assert result.exit_code == 0 and "stale lock" in result.stderr
    assert not (tmp_path / "d.jsonl.lock").exists() and out.exists()
