"""The texts that zero-shot and CBD scores are computed from (vlmtools/prompts.py), exactly as embedded, and
the errors a user sees for a wrong --wrap, --empty or --templates. (Written where mutation testing showed the
suite would not notice a one-line change; see tests/MUTANTS.md.)"""

import pytest

from vlmtools.errors import BadInput
from vlmtools.prompts import descriptor_sentence, empty_sentence, load_templates


def test_builtin_template_sets_are_the_published_prompts():
    assert [t.format("Red bird") for t in load_templates("bare")] == ["Red bird"]
    assert [t.format("Red bird") for t in load_templates("photo")] == ["a photo of a Red bird."]
    assert [t.format("Red bird") for t in load_templates("birds")] == ["a photo of a Red bird, a type of bird."]
    openai = [t.format("dog") for t in load_templates("openai80")]  # CLIP's 80 ImageNet prompts, in order
    assert len(openai) == 80 and openai[0] == "a bad photo of a dog." and openai[-1] == "a tattoo of the dog."


def test_a_class_without_descriptors_is_scored_by_the_rule_asked_for():
    assert empty_sentence("Red_bird") == "Red bird, which has "          # default: cbd wrap, Menon's fill-in
    assert empty_sentence("Red_bird", "waffle") == "A photo of a Red bird, which has ."
    assert empty_sentence("Red_bird", "cbd", "name") == "Red bird"
    assert empty_sentence("Red_bird", "none") == "Red bird"              # --wrap none: its name, never ""


@pytest.mark.parametrize("call, message", [
    (lambda: descriptor_sentence("c", "d", "plain"), "--wrap 'plain': expected one of cbd|waffle|none"),
    (lambda: empty_sentence("c", "cbd", "blank"), "--empty 'blank': expected one of menon|name"),
    (lambda: load_templates("imagenet"),
     "--templates 'imagenet': expected bare, photo, birds, openai80 or a file of templates"),
])
def test_bad_choices_name_the_valid_ones(call, message):
    with pytest.raises(BadInput) as err:
        call()
    assert str(err.value) == message


def test_a_template_file_takes_c_or_braces_and_its_errors_name_the_line(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("a photo of a {c}.\n\n  itap of a {}.  \n", encoding="utf-8")
    assert [t.format("fox") for t in load_templates(str(good))] == ["a photo of a fox.", "itap of a fox."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na {} and a {}.\n", encoding="utf-8")
    with pytest.raises(BadInput) as err:
        load_templates(str(bad))
    assert str(err.value) == f"{bad}:2: a template needs exactly one {{}} (or {{c}}) for the class name"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(BadInput) as err:
        load_templates(str(empty))
    assert str(err.value) == f"{empty}: no templates"
