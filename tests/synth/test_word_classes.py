"""The word-class features ``Sentence`` gives programs (determiners, names, last copies, ...)."""

from attnprog.synth.features import Sentence


def flags(s, name):
    return [t.strip() for t, on in zip(s.tokens, getattr(s, name), strict=True) if on]


def test_closed_word_classes():
    s = Sentence.from_text("The dog and her cat ran to a park with them.")
    assert flags(s, "is_determiner") == ["The", "her", "a"]
    assert flags(s, "is_pronoun") == ["her", "them"]
    assert flags(s, "is_preposition") == ["to", "with"]
    assert flags(s, "is_conjunction") == ["and"]


def test_names_are_capitalised_words_that_do_not_start_a_sentence():
    s = Sentence.from_text("When Mary met John, they talked. Then Mary left.", bos="<s>")
    assert flags(s, "is_name") == ["Mary", "John", "Mary"]


def test_numbers_and_line_breaks():
    s = Sentence.from_text("He had 3 cats and two dogs.\nThe end")
    assert flags(s, "is_number") == ["3", "two"]
    assert flags(s, "is_newline") == ["The"]


def test_previous_occurrence_points_at_the_last_earlier_copy():
    s = Sentence.from_text(" a b a c a b")
    assert s.previous_occurrence.tolist() == [-1, -1, 0, -1, 2, 1]
