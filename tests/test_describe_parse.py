"""How an LLM's answer becomes descriptors (vlmtools/describe/parse.py) on the shapes chat models produce:
quotes and bold around items, JSON arrays with stray values, preambles, Q/A lines that mention a habitat,
fields spelled differently from the request, repeated fields, exemplar names. (Written where mutation testing
showed the suite would not notice a one-line change; see tests/MUTANTS.md.)"""

from vlmtools.describe.parse import parse_background, parse_exemplar_answer, parse_lines, parse_structured


def test_quotes_and_bold_around_a_whole_item_are_removed_and_nothing_else():
    answer = "\n".join(['- "long tail"', "- 'red beak'", '- "a"', '- ""', "- **x**", "- long tail**",
                        "- \"mismatched'", "- **bold** and plain"])
    assert parse_lines(answer) == ["long tail", "red beak", "a", "x", "long tail**", "\"mismatched'",
                                   "**bold** and plain"]


def test_a_json_answer_keeps_its_strings_only():
    assert parse_lines('["long tail", 3, null, "  ", "\\"red beak\\""]') == ["long tail", "red beak"]
    assert parse_background('["long tail", "red beak"]') == (["long tail", "red beak"], ["object", "object"])
    assert parse_background('{"features": ["long tail", "Long  tail"]}') == (["long tail"], ["object"])


def test_a_preamble_ending_in_a_colon_is_dropped_even_with_trailing_spaces():
    assert parse_lines("Here are some features:  \nlong tail\nred beak") == ["long tail", "red beak"]


def test_only_a_header_switches_to_background_not_a_q_or_a_line_that_mentions_it():
    answer = "\n".join(["- long tail", "  Q: what is its habitat?", "A: its habitat is the coast", "- red beak",
                        "Surroundings:", "- sandy beach"])
    assert parse_background(answer) == (["long tail", "red beak", "sandy beach"], ["object", "object", "background"])


def test_fields_are_matched_however_the_answer_spells_them_and_the_first_line_wins():
    fields = ["beak or mouth", "wing shape"]
    answer = "\n".join(["Beak/Mouth: short and hooked", "**Wing / Shape:** pointed", "Wing shape: rounded",
                        "Beak: long"])
    assert parse_structured(answer, fields) == ["beak or mouth: short and hooked", "wing shape: pointed"]
    assert parse_structured("Wing shape:\nWing shape: rounded", ["wing shape"]) == ["wing shape: rounded"]


def test_an_exemplar_answer_gives_its_name_or_none():
    assert parse_exemplar_answer("**Name:** Xantus's Hummingbird\n- green back") == \
        ("Xantus's Hummingbird", ["green back"], ["object"])
    assert parse_exemplar_answer("Name: Xantus's Hummingbird")[0] == "Xantus's Hummingbird"  # only '*' stripped
    assert parse_exemplar_answer("- green back") == (None, ["green back"], ["object"])
