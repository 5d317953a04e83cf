"""Every program's name for people: short, saying what it does, never its hash."""

import re

import pytest

from attnprog.synth.fitted import program_from_fit, term_label
from attnprog.synth.generator.golden import golden_programs
from attnprog.synth.generator.specs import generate, program_from_spec, term
from attnprog.synth.program import Program
from attnprog.synth.runtime.paper_form import library_programs
from attnprog.synth.titles import TITLE_MAX, fit_title, join_parts, program_title

FIT = {"share": 0.86, "weights": {"previous_1": 2.0, 'key_token:" the"': 1.2, "punct": -0.5,
                                  "first": 0.7}}
LLM_SOURCE = '''import numpy as np

def attend_to_names(s):
    """Each token attends to the most recent capitalised name. Falls back to the first token."""
    m = np.zeros((s.n, s.n))
    m[:, 0] = 1.0
    return m
'''


def every_kind_of_program() -> list[Program]:
    fitted = program_from_fit(FIT, head="L3.H1", model_id="m", score=0.7)
    llm = Program(source=LLM_SOURCE, name="attend_to_names", family="llm",
                  provenance={"generator": "llm", "model": "x"})
    bare = Program(source="import numpy as np\n\ndef program(s):\n    return np.eye(s.n)\n")
    return golden_programs() + generate(40) + [fitted, llm, bare]


@pytest.mark.parametrize("program", every_kind_of_program(), ids=lambda p: p.family)
def test_every_program_has_a_short_name_that_is_not_its_hash(program):
    title = program_title(program)
    assert 0 < len(title) <= TITLE_MAX
    assert program.hash not in title and not re.fullmatch(r"[0-9a-f]{8,}", title)


def test_a_fitted_program_is_named_by_its_share_then_its_terms_in_the_order_given():
    assert fit_title(FIT, ['key_token:" the"', "previous_1"]) == "first token 86 % · ' the' · previous token"
    assert fit_title(FIT).startswith("first token 86 % · previous token · ' the' · not punctuation")


def test_more_weight_on_the_first_token_is_not_named_twice_beside_the_share():
    assert "first token" not in fit_title(FIT, ["first", "previous_1"]).removeprefix("first token 86 %")
    assert fit_title({"share": 0.0, "weights": {"first": 1.0}}) == "first token"


def test_negative_weights_and_distances_read_as_words():
    assert term_label("punct", -1.0) == "not punctuation"
    assert term_label("distance", -0.3) == "recency" and term_label("distance", 0.3) == "distant tokens"
    assert term_label("distance_from_pronoun", -0.3) == "recency from pronouns"


def test_a_generator_program_is_named_by_its_primitives_settings_and_shares():
    spec = {"terms": [term("previous", {"k": 2}, None, 0.4), term("recency", {"rate": 0.8}, None, 0.3),
                      term("induction", {}, "self", 0.3)]}
    assert program_title(program_from_spec(spec)) == (  # 70 characters, cut to 60
        "40 % previous k=2 · 30 % recency rate=0.8 · 30 % induction…")
    pair = {"terms": [term("pos_tag", {"tag": "NOUN"}, None, 0.6), term("induction", {}, "self", 0.4)]}
    assert program_title(program_from_spec(pair)) == "60 % pos tag NOUN · 40 % induction (else self)"


def test_a_paper_form_program_is_named_by_the_label_it_returns():
    source = ('def attend_back(sentence, tokenizer):\n    n = len(tokenizer([sentence]).input_ids[0])\n'
              '    return "Look Back Pattern", [[1.0] * n] * n\n')
    [program] = library_programs(source, "lib.py")
    assert program_title(program) == "Look Back Pattern"


def test_llm_and_golden_programs_are_named_by_their_docstring():
    llm = Program(source=LLM_SOURCE, name="attend_to_names", family="llm")
    assert program_title(llm) == "Each token attends to the most recent capitalised name"
    assert program_title(golden_programs()[0]) == "First-token head"


def test_a_title_set_by_hand_wins_and_a_bare_program_reads_its_family():
    hand = Program(source="x = 1\n", family="custom", provenance={"title": "my head"})
    assert program_title(hand) == "my head"
    assert program_title(Program(source="x = 1\n", family="custom")) == "custom program"


def test_parts_that_do_not_fit_are_cut_and_marked():
    title = join_parts(["first token 50 %"] + [f"term number {k}" for k in range(10)])
    assert len(title) <= TITLE_MAX and title.endswith("…")
    assert join_parts(["a" * 80]).endswith("…") and len(join_parts(["a" * 80])) <= TITLE_MAX
