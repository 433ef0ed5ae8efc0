"""Study 000 exactly: its two prompts (shipped exemplars), the completions API, --strict-parse, Menon's rule
for classes without descriptors, the birds template, WaffleCLIP's controls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from werkzeug import Response

from tests.test_describe import _env, _server, class_file, describe, err, llm, read_jsonl  # noqa: F401
from vlmtools.cli.app import app

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = {"domain": "study000_prompt_domain.txt", "background": "study000_prompt_background.txt"}


def study_prompt(style: str, cls: str) -> str:
    """The study's prompt as typed from its slides (tests/fixtures/README.md), for one class."""
    return (FIXTURES / VARIANTS[style]).read_text(encoding="utf-8").replace("{category_name}", cls)


# ----------------------------------------------------------------------------- the study's two prompts

@pytest.mark.parametrize("style", ["domain", "background"])
def test_shipped_cub_exemplars_render_the_studys_prompts_byte_for_byte(tmp_path, llm, style):
    classes = class_file(tmp_path, ["Laysan_Albatross", "Horned Puffin"], llm)
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--style", style, "--exemplar", "cub", "-o", out)
    assert result.exit_code == 0, result.output
    sent = {r["class"]: r["body"]["messages"][0]["content"] for r in llm.requests}
    assert sent["Laysan_Albatross"] == study_prompt(style, "Laysan Albatross")
    assert sent["Horned Puffin"] == study_prompt(style, "Horned Puffin")
    recs = read_jsonl(out)
    assert recs[1]["descriptors"] == ["feature of Horned Puffin", "another feature"]  # Menon's parser
    assert recs[1]["style"] == style


def test_the_two_variants_differ_in_the_habitat_line_only():
    a, b = (study_prompt(s, "X").splitlines() for s in ("domain", "background"))
    assert len(b) == len(a) + 1
    extra = [line for line in b if line not in a]
    assert extra == ["- solitary or in small groups, usually found over open ocean"]
    assert [line for line in b if line != extra[0]] == a


def test_a_copied_exemplar_file_renders_the_same_and_edits_take_effect(tmp_path):
    res = runner.invoke(app, ["descriptors", "exemplars", "cub"])
    assert res.exit_code == 0, res.output
    copy = tmp_path / "my_cub.txt"
    copy.write_text(res.stdout, encoding="utf-8")
    (tmp_path / "c.txt").write_text("Laysan_Albatross\n")
    for style in VARIANTS:
        res = runner.invoke(app, ["describe", str(tmp_path / "c.txt"), "--style", style, "--exemplars", str(copy),
                                  "--print-prompts"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["prompt"] == study_prompt(style, "Laysan Albatross")
    # fixing the study's typo in the copy changes that line and nothing else
    copy.write_text(copy.read_text(encoding="utf-8").replace("sark grey", "dark grey"), encoding="utf-8")
    res = runner.invoke(app, ["describe", str(tmp_path / "c.txt"), "--style", "domain", "--exemplars", str(copy),
                              "--print-prompts"])
    assert json.loads(res.stdout)["prompt"] == study_prompt("domain", "Laysan Albatross").replace("sark", "dark")


@pytest.mark.parametrize("text, message", [
    ("@background: sideways\nbird\n- x\n", "@background: section|inline"),
    ("bird\n- x\n@background: inline\n", "before the first example"),
])
def test_bad_exemplar_option_lines(tmp_path, text, message):
    ex = tmp_path / "ex.txt"
    ex.write_text(text)
    res = runner.invoke(app, ["describe", "-", "--style", "domain", "--exemplars", str(ex), "--print-prompts"],
                        input="a\n")
    assert res.exit_code == 2 and message in " ".join(res.stderr.split())


def test_unknown_exemplar_set_names_the_shipped_ones():
    res = runner.invoke(app, ["describe", "-", "--style", "domain", "--exemplars", "nosuch", "--print-prompts"],
                        input="a\n")
    assert res.exit_code == 2 and "cub" in res.stderr


# ----------------------------------------------------------------------------- completions API

def _text_completion(text: str) -> Response:
    body = {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": "test-instruct",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}
    return Response(json.dumps(body), content_type="application/json")


def test_api_completions_sends_the_prompt_as_is(tmp_path, llm):
    classes = class_file(tmp_path, ["Laysan_Albatross"], llm)
    got = []

    def handler(request):
        got.append(json.loads(request.data))
        return _text_completion("- long narrow wings\n- dark back\nQ: What are")

    llm.server.expect_request("/v1/completions", method="POST").respond_with_handler(handler)
    out = tmp_path / "d.jsonl"
    result = describe(llm, classes, "--api", "completions", "--style", "domain", "--exemplars", "cub",
                      "-m", "test-instruct", "-o", out)
    assert result.exit_code == 0, result.output
    assert llm.requests == []  # nothing went to chat
    [body] = got
    assert body["prompt"] == study_prompt("domain", "Laysan Albatross")
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("test-instruct", 0, 150)
    assert "messages" not in body
    # Menon's parser on the continuation (a completions model runs on into a next question)
    assert read_jsonl(out)[0]["descriptors"] == ["long narrow wings", "dark back"]
    # chat stays the default, and answers of the two APIs are cached apart
    result = describe(llm, classes, "--style", "domain", "--exemplars", "cub", "-m", "test-instruct",
                      "-o", tmp_path / "chat.jsonl")
    assert result.exit_code == 0, result.output
    assert len(llm.requests) == 1 and len(got) == 1


def test_api_completions_malformed_answer_is_a_failed_class(tmp_path, llm):
    classes = class_file(tmp_path, ["Laysan_Albatross"], llm)
    llm.server.expect_request("/v1/completions", method="POST").respond_with_data(
        '{"choices": [{"index": 0}]}', content_type="application/json")
    result = describe(llm, classes, "--api", "completions", "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 1 and "no text" in err(result)


def test_bad_api_is_bad_input(tmp_path, llm):
    from vlmtools.cli.describe import Api
    from vlmtools.describe.llm import APIS, LLMClient
    from vlmtools.errors import BadInput

    assert tuple(a.value for a in Api) == APIS  # the CLI spells them out to keep --help light
    classes = class_file(tmp_path, ["Laysan_Albatross"], llm)
    result = describe(llm, classes, "--api", "responses", "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 2 and "--api" in err(result)
    assert not (tmp_path / "d.jsonl").exists()
    with pytest.raises(BadInput, match="--api"):
        LLMClient(api="responses")


# ----------------------------------------------------------------------------- strict parsing

def test_strict_parse_keeps_only_dash_lines_and_counts(tmp_path, llm):
    classes = class_file(tmp_path, ["Horned Puffin", "Snowy Owl"], llm)
    llm.answer = lambda cls, body: "1. orange feet\n2. black horns" if cls == "Horned Puffin" else "- white"
    loose, strict = tmp_path / "loose.jsonl", tmp_path / "strict.jsonl"
    result = describe(llm, classes, "-o", loose)
    assert result.exit_code == 0, result.output
    assert read_jsonl(loose)[0]["descriptors"] == ["orange feet", "black horns"]
    assert "1 answers had no '- ' lines and were parsed loosely" in err(result)
    result = describe(llm, classes, "--strict-parse", "-o", strict)
    assert result.exit_code == 0, result.output
    recs = {r["class"]: r["descriptors"] for r in read_jsonl(strict)}
    assert recs == {"Horned Puffin": [], "Snowy Owl": ["white"]}
    assert "1 answers had no '- ' lines: with --strict-parse they gave no descriptors" in err(result)
    result = describe(llm, classes, "--strict-parse", "--style", "structured", "-o", tmp_path / "s.jsonl")
    assert result.exit_code == 2 and "--strict-parse applies" in err(result)


# ----------------------------------------------------------------------------- classify: empty rule, birds, waffle form

def test_empty_class_is_scored_as_menon_does_unless_name(tmp_path, tiny_encoder):
    from vlmtools.classify import build_descriptor_set
    from vlmtools.prompts import descriptor_sentence, empty_sentence, load_templates
    from vlmtools.store import write_arrays

    records = {"Cardinal": {"class": "Cardinal", "descriptors": ["a red songbird"]},
               "Snowy_Owl": {"class": "Snowy_Owl", "descriptors": []}}
    dset = build_descriptor_set(["Cardinal", "Snowy_Owl"], records)
    assert dset.texts == ["Cardinal, which is a red songbird", "Snowy Owl, which has "]
    assert build_descriptor_set(["Cardinal", "Snowy_Owl"], records, empty="name").texts[1] == "Snowy Owl"
    assert empty_sentence("Snowy_Owl", "waffle") == "A photo of a Snowy Owl, which has ."
    assert descriptor_sentence("Snowy_Owl", "white plumage", "waffle") == "A photo of a Snowy Owl, which has white plumage."
    assert load_templates("birds") == ["a photo of a {}, a type of bird."]

    # through the CLI: the empty class's score is the cosine with "Snowy Owl, which has "
    desc = tmp_path / "d.jsonl"
    desc.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    img = np.random.default_rng(0).normal(size=(2, tiny_encoder.embed_dim))
    write_arrays(tmp_path / "images", img, [{"id": "a", "label": "Cardinal"}, {"id": "b", "label": "Snowy_Owl"}],
                 kind="image", model={"name": "vlmtools-tiny", "pretrained": "none"})
    unit = img / np.linalg.norm(img, axis=1, keepdims=True)
    for rule, text in (("menon", "Snowy Owl, which has "), ("name", "Snowy Owl")):
        res = runner.invoke(app, ["classify", str(tmp_path / "images"), "-d", str(desc), "--allow-empty", "-k", "2",
                                  "--empty", rule, "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert "scored by their name" in " ".join(res.stderr.split())
        expect = unit.astype(np.float32) @ tiny_encoder.encode_texts([text])[0]
        for rec, e in zip((json.loads(x) for x in res.stdout.splitlines()), expect):
            owl = next(t["score"] for t in rec["topk"] if t["class"] == "Snowy_Owl")
            assert owl == pytest.approx(float(e), abs=2e-6)
    res = runner.invoke(app, ["classify", str(tmp_path / "images"), "-d", str(desc), "--allow-empty", "--empty", "x"])
    assert res.exit_code == 2 and "--empty" in res.stderr


# ----------------------------------------------------------------------------- WaffleCLIP controls

def test_waffle_characters_from_the_descriptors_and_draws(tmp_path):
    classes = tmp_path / "c.txt"
    classes.write_text("Black_footed_Albatross\nHorned Puffin\nSnowy Owl\n")
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"class": "x", "descriptors": ["abab, cd.", "dcba"]}) + "\n")
    out = tmp_path / "draws"
    res = runner.invoke(app, ["describe", str(classes), "--style", "waffle", "--waffle-chars", str(src),
                              "--draws", "3", "--seed", "5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["draw-5.jsonl", "draw-6.jsonl", "draw-7.jsonl"]
    sets = [read_jsonl(out / f) for f in files]
    assert [s[0]["seed"] for s in sets] == [5, 6, 7]
    chars = [d for s in sets for d in s[0]["descriptors"][1::2]]  # the random-character descriptors
    assert set("".join(chars).replace(", ", "")) <= set("abcd")
    assert len({tuple(s[0]["descriptors"]) for s in sets}) == 3  # the draws differ
    # one draw is the --seed run
    single = tmp_path / "one.jsonl"
    res = runner.invoke(app, ["describe", str(classes), "--style", "waffle", "--waffle-chars", str(src), "--seed", "6",
                              "-o", str(single)])
    assert res.exit_code == 0 and read_jsonl(single) == sets[1]


@pytest.mark.parametrize("args, message", [
    (["--draws", "2", "-o", "-"], "pass a directory"),
    (["--draws", "0", "-o", "x"], "--draws 0"),
    (["--style", "cbd", "--draws", "2"], "applies to --style waffle"),
])
def test_waffle_bad_input(tmp_path, args, message):
    classes = tmp_path / "c.txt"
    classes.write_text("a\n")
    full = ["describe", str(classes), "--style", "waffle", *args]
    res = runner.invoke(app, [a if a != "x" else str(tmp_path / "x") for a in full])
    assert res.exit_code == 2 and message in " ".join(res.stderr.split())
    assert not (tmp_path / "x").exists()


def test_embed_text_keeps_going_past_an_empty_descriptor_list(tmp_path, capsys):
    from vlmtools.embed import text_records

    desc = tmp_path / "released.jsonl"
    desc.write_text(json.dumps({"class": "Sooty Albatross", "descriptors": []}) + "\n"
                    + json.dumps({"class": "Laysan Albatross", "descriptors": ["a seabird"]}) + "\n")
    rows, _ = text_records(str(desc))
    assert [r["text"] for r in rows] == ["Laysan Albatross, which is a seabird"]
    assert "1 classes have an empty descriptor list" in " ".join(capsys.readouterr().err.split())
