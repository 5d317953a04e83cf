"""Prompts: the contract, the Sentence interface read from the class, examples, repair and refinement."""

import dataclasses

from attnprog.synth.features import Sentence
from attnprog.synth.llm.prompts import (
    describe_sentence,
    refinement_messages,
    repair_messages,
    synthesis_messages,
    system_message,
)
from attnprog.synth.policy import allowed_imports
from attnprog.synth.program import Program
from attnprog.synth.runtime.validate import validate


def test_every_field_and_public_property_of_sentence_is_described():
    described = describe_sentence()
    names = [f.name for f in dataclasses.fields(Sentence)]
    names += [n for n, m in vars(Sentence).items() if isinstance(m, property) and not n.startswith("_")]
    for name in names:
        assert f"- s.{name}:" in described


def test_helpers_are_described_with_their_signature():
    assert "- s.most_recent(mask, include_self: 'bool' = False)" in describe_sentence()


def test_the_system_message_states_the_contract_and_the_allowed_imports():
    text = system_message()
    assert "def program(s):" in text and "(s.n, s.n)" in text
    for module in allowed_imports() - {"__future__", "typing"}:
        assert module in text


def test_the_synthesis_request_shows_valid_golden_examples_the_summary_and_n():
    system, user = synthesis_messages("SUMMARY LINES", 5, "L2H3")
    assert system["role"] == "system" and user["role"] == "user"
    assert "SUMMARY LINES" in user["content"] and "Write 5 distinct hypotheses" in user["content"]
    examples = user["content"].split("```python\n")[1:4]
    assert len(examples) == 3
    for block in examples:
        assert validate(Program(block.split("```")[0])).ok


def test_a_repair_continues_the_conversation_with_the_reason():
    history = synthesis_messages("S", 1, "L0H0")
    messages = repair_messages(history, "REPLY", "def program(s):\n    import os\n", "import of `os`")
    assert messages[:2] == history and messages[2] == {"role": "assistant", "content": "REPLY"}
    assert "import of `os`" in messages[3]["content"] and "import os" in messages[3]["content"]


def test_a_refinement_shows_the_program_its_score_and_the_evidence():
    _, user = refinement_messages("def program(s):\n    return 1\n", "L4H5", 0.4321, "BEST", "WORST")
    assert "L4H5" in user["content"] and "0.432" in user["content"]
    assert "BEST" in user["content"] and "WORST" in user["content"] and "return 1" in user["content"]
