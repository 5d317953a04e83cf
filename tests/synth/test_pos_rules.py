"""POS tags from the attribute ruler's rules applied here equal the ruler's own."""

import pytest

from attnprog.engine.corpus import builtin_corpus
from attnprog.synth import features
from attnprog.synth.pos_rules import compile_rules

pytestmark = pytest.mark.skipif(not features.syntax_available(),
                                reason="spaCy with an English pipeline is not installed")


def ruler_pipeline():
    """The same pipeline with spaCy's attribute ruler running."""
    import spacy

    nlp = features._load_pipeline()
    return spacy.load(nlp.meta["lang"] + "_" + nlp.meta["name"], exclude=["ner", "lemmatizer"])


def test_the_pipeline_leaves_pos_to_the_compiled_rules():
    nlp = features._load_pipeline()
    assert "attribute_ruler" in nlp.disabled and features._pos_rules is not None


def test_compiled_rules_tag_every_token_as_the_attribute_ruler_does():
    texts = builtin_corpus().texts[:20]
    texts = [*texts, *(t[:k] for t in texts for k in range(4, len(t), 9))]  # prefixes, too
    features._parse_all(texts, features._load_pipeline(), causal=False)
    for text, doc in zip(texts, ruler_pipeline().pipe(texts), strict=True):
        assert [tag for _, _, tag, _ in features._whole_parses[text]] == [t.pos_ for t in doc], text


def test_a_rule_form_not_understood_leaves_the_ruler_running():
    patterns = [{"patterns": [[{"TAG": "NN", "LENGTH": {">": 3}}]], "attrs": {"POS": "NOUN"}}]
    assert compile_rules(patterns) is None


def test_the_last_matching_rule_wins_and_a_two_token_rule_tags_its_indexed_token():
    rules = compile_rules([
        {"patterns": [[{"TAG": "VBZ"}]], "attrs": {"POS": "VERB"}},
        {"patterns": [[{"TAG": "VBZ", "LOWER": {"IN": ["is", "'s"]}}]], "attrs": {"POS": "AUX"}},
        {"patterns": [[{"DEP": "expl"}, {"LOWER": "is"}]], "attrs": {"POS": "VERB"}, "index": 1},
    ])
    parsed = [("EX", "there", "expl", False), ("VBZ", "is", "ROOT", False),
              ("VBZ", "is", "ROOT", False), ("VBZ", "runs", "ROOT", False)]
    assert rules.coarse_tags(parsed) == ["", "VERB", "AUX", "VERB"]
