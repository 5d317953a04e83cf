"""Running one program on one text: a failure's reason says what to do."""

from attnprog.synth.features import Sentence
from attnprog.synth.runtime.execute import call_program, compile_program

NOUNS = ("import numpy as np\ndef program(s):\n"
         "    return np.tile([p == 'NOUN' for p in s.pos], (s.n, 1))\n")


def test_reading_pos_tags_of_a_text_without_syntax_says_spacy_is_missing():
    s = Sentence.from_text("The cat sat on the mat.")  # no attach_syntax: as without spaCy
    cells, reason = call_program(compile_program(NOUNS, "program"), s, "program")
    assert cells is None and reason.startswith("raised TypeError")
    assert "no spaCy English pipeline" in reason and "s.has_syntax" in reason
