"""The run's stage keys: what makes a resumed run compute a stage again."""

from types import SimpleNamespace

import pytest

from attnprog.engine.run import stages
from attnprog.engine.run.config import RunConfig
from attnprog.synth import features


def _state(tmp_path):
    state = stages.RunState(config=RunConfig(), out=tmp_path, echo=print, record=None)
    state.keys = {"extract": "store", "pool": "pool", "fit": "store|fit=v5,terms=12|tags=t"}
    state.store = SimpleNamespace(meta={"model_id": "m", "corpus_hash": "c"})
    state.fitted = ["a fitted program"]
    return state


def test_a_new_tagger_changes_the_fit_and_rank_keys(tmp_path, monkeypatch):
    state = _state(tmp_path)
    monkeypatch.setattr(features, "tagger_id", lambda: "spacy-3.8.18/en_core_web_sm-3.8.0")
    before = stages.fit_key(state), stages.rank_key(state)
    monkeypatch.setattr(features, "tagger_id", lambda: "spacy-3.9.0/en_core_web_sm-3.9.0")
    after = stages.fit_key(state), stages.rank_key(state)
    assert before[0] != after[0] and before[1] != after[1]


def test_the_tagger_id_names_spacy_and_its_pipeline():
    spacy = pytest.importorskip("spacy")
    if not features.syntax_available():
        pytest.skip("no English spaCy pipeline installed")
    tagger = features.tagger_id()
    assert tagger.startswith(f"spacy-{spacy.__version__}/en_core_web_sm")
    assert tagger.endswith(f"-v{features.TAGS_VERSION}")


def test_without_spacy_the_tagger_id_says_none(monkeypatch):
    monkeypatch.setattr(features, "_nlp", False)  # as _load_pipeline leaves it when nothing loads
    assert features.tagger_id() == "none"
