"""evaluate_programs: the engine's entry point (cache, generator path, sandbox)."""

import numpy as np
import pytest

import attnprog.synth.runtime.sandbox as sandbox_module
from attnprog.errors import CorpusError
from attnprog.layout import causal_offsets
from attnprog.synth.features import probe_sentences
from attnprog.synth.program import Program
from attnprog.synth.runtime import evaluate as evaluate_module
from attnprog.synth.runtime.evaluate import close_shared_sandbox, evaluate_programs
from attnprog.synth.runtime.execute import run_trusted

FIRST = "import numpy as np\ndef program(s):\n    out = np.zeros((s.n, s.n))\n" \
        "    out[:, 0] = 1\n    return out\n"
DIAGONAL = "import numpy as np\ndef program(s):\n    return np.eye(s.n)\n"
BROKEN = "def program(s):\n    return None\n"


@pytest.fixture(autouse=True)
def stop_workers():
    yield
    close_shared_sandbox()


@pytest.fixture
def sandbox_calls(monkeypatch):
    """How many program-text calls went to the sandbox."""
    calls = []
    original = sandbox_module.Sandbox.run

    def counting_run(self, programs, sentences, progress=None, on_result=None):
        calls.append(len(programs) * len(sentences))
        return original(self, programs, sentences, progress=progress, on_result=on_result)

    monkeypatch.setattr(sandbox_module.Sandbox, "run", counting_run)
    return calls


def test_outputs_match_serial_execution_and_mark_failures(tmp_path):
    programs = [Program(FIRST), Program(BROKEN), Program(DIAGONAL)]
    texts = probe_sentences()
    out = evaluate_programs(programs, texts, cache_dir=tmp_path, workers=1, progress=False)
    expected = run_trusted(programs, texts)
    assert out.values.shape == (3, int(causal_offsets([s.n for s in texts])[-1]))
    np.testing.assert_array_equal(out.values, np.stack([r.values for r in expected]))
    assert out.failed.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    assert out.reasons[1].startswith("returned NoneType") and out.reasons[0] == ""
    assert not out.values[1].any()
    np.testing.assert_array_equal(out.offsets, causal_offsets([s.n for s in texts]))


def test_a_cache_hit_computes_nothing(tmp_path, sandbox_calls):
    programs, texts = [Program(FIRST), Program(BROKEN)], probe_sentences()
    first = evaluate_programs(programs, texts, cache_dir=tmp_path, workers=1, progress=False)
    assert sandbox_calls == [6]
    again = evaluate_programs(programs, texts, cache_dir=tmp_path, workers=1, progress=False)
    assert sandbox_calls == [6]
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_array_equal(again.failed, first.failed)
    assert again.reasons == first.reasons


def test_only_programs_missing_from_the_cache_are_computed(tmp_path, sandbox_calls):
    texts = probe_sentences()
    evaluate_programs([Program(FIRST)], texts, cache_dir=tmp_path, workers=1, progress=False)
    evaluate_programs([Program(FIRST), Program(DIAGONAL)], texts, cache_dir=tmp_path,
                      workers=1, progress=False)
    assert sandbox_calls == [3, 3]


def test_another_tokenizer_id_is_another_cache_entry(tmp_path, sandbox_calls):
    texts = probe_sentences()
    for tokenizer_id in ("model-a", "model-b"):
        evaluate_programs([Program(FIRST)], texts, tokenizer_id=tokenizer_id, cache_dir=tmp_path,
                          workers=1, progress=False)
    assert sandbox_calls == [3, 3]


MEANING = """import numpy as np

def program(s):
    i, j = np.tril_indices(s.n)
    m = np.zeros((s.n, s.n))
    m[i, j] = np.exp(3 * s.embedding_similarity(i, j))
    return m
"""


def test_token_meaning_from_other_embeddings_is_another_cache_entry(tmp_path):
    texts = probe_sentences()  # one-hot stand-in similarity
    stand_in = evaluate_programs([Program(MEANING)], texts, cache_dir=tmp_path, workers=1,
                                 progress=False).values
    rng = np.random.default_rng(0)
    for s in texts:  # another table: a random cosine-like matrix
        m = rng.uniform(-1, 1, (s.n, s.n)).astype(np.float32)
        m = (m + m.T) / 2
        np.fill_diagonal(m, 1.0)
        m.setflags(write=False)
        s.token_similarity = m
    other = evaluate_programs([Program(MEANING)], texts, cache_dir=tmp_path, workers=1,
                              progress=False).values
    fresh = evaluate_programs([Program(MEANING)], texts, use_cache=False, workers=1,
                              progress=False).values
    assert not np.allclose(stand_in, other)
    np.testing.assert_array_equal(other, fresh)


def test_identical_programs_are_evaluated_once(tmp_path, sandbox_calls):
    out = evaluate_programs([Program(FIRST), Program(FIRST)], probe_sentences(),
                            use_cache=False, workers=1, progress=False)
    assert sandbox_calls == [3]
    np.testing.assert_array_equal(out.values[0], out.values[1])


def test_generator_programs_take_the_vectorised_path(tmp_path, sandbox_calls, monkeypatch):
    texts = probe_sentences()
    generated = Program(DIAGONAL, family="generated")
    packed = np.stack([r.values for r in run_trusted([generated], texts)])

    class FakeGenerator:
        is_generated = staticmethod(lambda p: p.family == "generated")
        evaluate_generated = staticmethod(lambda programs, sentences, cache=None: packed)

    monkeypatch.setattr(evaluate_module, "_generator_module", lambda: FakeGenerator)
    out = evaluate_programs([Program(FIRST), generated], texts, use_cache=False, workers=1,
                            progress=False)
    assert sandbox_calls == [3]  # only the hand-written program ran in the sandbox
    np.testing.assert_array_equal(out.values[1], packed[0])


def test_an_empty_corpus_says_what_to_do():
    with pytest.raises(CorpusError, match="no texts"):
        evaluate_programs([Program(FIRST)], [])


def test_streamed_outputs_equal_dense_outputs_row_for_row():
    from attnprog.synth.features import probe_sentences
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate
    from attnprog.synth.runtime.evaluate import evaluate_programs

    programs = golden_programs()[:3] + generate(n_min=40)
    sentences = probe_sentences()
    dense = evaluate_programs(programs, sentences, use_cache=False, progress=False)
    streamed = evaluate_programs(programs, sentences, use_cache=False, progress=False, stream=True)
    assert np.array_equal(streamed.rows(0, streamed.n_programs), dense.values)
    assert np.array_equal(streamed.rows(2, 9), dense.values[2:9])
    assert np.array_equal(streamed.failed, dense.failed)
    picked = streamed.select([5, 0])
    assert np.array_equal(picked.values, dense.values[[5, 0]])
    assert [p.hash for p in picked.programs] == [programs[5].hash, programs[0].hash]


def test_streamed_rows_of_some_texts_are_the_full_rows_at_those_texts_cells():
    from attnprog.layout import text_cells
    from attnprog.synth.features import probe_sentences
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate
    from attnprog.synth.runtime.evaluate import evaluate_programs

    programs = golden_programs()[:3] + generate(n_min=40)
    streamed = evaluate_programs(programs, probe_sentences(), use_cache=False, progress=False,
                                 stream=True)
    texts = [2, 0]
    full = streamed.rows(0, streamed.n_programs)
    cells = text_cells(streamed.offsets, texts)
    assert np.array_equal(streamed.rows(0, streamed.n_programs, texts=texts), full[:, cells])
    dense = streamed.select(range(streamed.n_programs))
    assert np.array_equal(dense.rows(1, 7, texts=texts), full[1:7][:, cells])


def test_an_interrupted_evaluation_keeps_the_programs_it_finished(tmp_path, sandbox_calls,
                                                                  monkeypatch):
    from attnprog.synth.runtime.cache import OutputCache

    texts, programs = probe_sentences(), [Program(FIRST), Program(DIAGONAL)]
    original_put, puts = OutputCache.put, []

    def put_then_interrupt(self, *args, **kwargs):
        original_put(self, *args, **kwargs)
        puts.append(args[0])
        raise KeyboardInterrupt  # Ctrl-C right after the first program was written

    monkeypatch.setattr(OutputCache, "put", put_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluate_programs(programs, texts, cache_dir=tmp_path, workers=1, progress=False)
    monkeypatch.setattr(OutputCache, "put", original_put)
    evaluate_programs(programs, texts, cache_dir=tmp_path, workers=1, progress=False)
    assert len(puts) == 1 and sandbox_calls == [6, 3]  # the resumed run computes one program


def test_programs_that_fail_the_static_check_are_not_run(tmp_path, sandbox_calls):
    bad = Program("import os\ndef program(s):\n    return os.listdir('/')\n")
    out = evaluate_programs([bad, Program(FIRST)], probe_sentences(), cache_dir=tmp_path,
                            workers=1, progress=False)
    assert sandbox_calls == [3]
    assert out.failed[0].all() and out.reasons[0].startswith("refused: line 1: import of `os`")


def test_a_comment_mentioning_pos_does_not_change_the_cache_key(tmp_path, sandbox_calls):
    texts = probe_sentences()
    evaluate_programs([Program(FIRST)], texts, cache_dir=tmp_path, workers=1, progress=False)
    commented = Program("# uses s.pos and spacy? no\n" + FIRST)
    evaluate_programs([Program(FIRST), commented], texts, cache_dir=tmp_path, workers=1,
                      progress=False)
    assert sandbox_calls == [3, 3]  # only the new program ran; FIRST was a cache hit


def test_outputs_of_a_program_reading_pos_tags_are_not_reused_for_other_tags(tmp_path, sandbox_calls):
    nouns = Program("import numpy as np\ndef program(s):\n"
                    "    return np.tile([p == 'NOUN' for p in s.pos], (s.n, 1)) + np.eye(s.n)\n")

    def tagged(first_tag):  # the probes with made-up causal tags (no spaCy needed)
        texts = probe_sentences()
        for s in texts:
            s.pos, s.dep_head, s.dependents = ["NOUN"] * s.n, list(range(s.n)), [[]] * s.n
            s.pos[0], s.syntax_mode = first_tag, "causal"
        return texts

    kept = evaluate_programs([nouns], tagged("NOUN"), cache_dir=tmp_path, workers=1, progress=False)
    other = evaluate_programs([nouns], tagged("DET"), cache_dir=tmp_path, workers=1, progress=False)
    assert sandbox_calls == [3, 3]  # the same texts and program, other tags: run again
    assert not np.array_equal(kept.values, other.values)


def test_programs_may_import_a_helper_module_supplied_with_them(tmp_path):
    helpers = {"helpers": "import numpy as np\n\ndef sink(n):\n    m = np.zeros((n, n))\n"
                          "    m[:, 0] = 1\n    return m\n"}
    program = Program("from helpers import *\n\ndef program(s):\n    return sink(s.n)\n")
    out = evaluate_programs([program], probe_sentences(), helpers=helpers, use_cache=False,
                            workers=1, progress=False)
    expected = run_trusted([Program(FIRST)], probe_sentences())[0]
    assert out.reasons == [""]
    np.testing.assert_array_equal(out.values[0], expected.values)


def test_streamed_outputs_pickle_without_their_atom_cache():
    import pickle

    from attnprog.synth.features import probe_sentences
    from attnprog.synth.generator.specs import generate
    from attnprog.synth.runtime.evaluate import evaluate_programs

    streamed = evaluate_programs(generate(n_min=20), probe_sentences(), use_cache=False,
                                 progress=False, stream=True)
    rows = streamed.rows(0, 5)
    assert streamed._atoms is not None and streamed._atoms.rows
    copy = pickle.loads(pickle.dumps(streamed))
    assert copy._atoms is None and streamed._atoms is not None
    assert np.array_equal(copy.rows(0, 5), rows)


def test_a_paper_form_programs_outputs_with_the_stand_in_tokenizer_are_not_reused_with_the_models(
        tmp_path, sandbox_calls):
    from attnprog.engine.models import byte_tokenizer
    from attnprog.synth.features import sentences_from_texts

    tokenizer = byte_tokenizer()
    texts = sentences_from_texts(["The cat sat.", "A dog ran home."], tokenizer)
    tokens = Program("import numpy as np\ndef f(sentence, tokenizer):\n"
                     "    n = len(tokenizer(sentence)['input_ids'])\n"
                     "    return 'all', np.ones((n, n))\n", name="f")
    evaluate_programs([tokens], texts, cache_dir=tmp_path, workers=1, progress=False)
    evaluate_programs([tokens], texts, cache_dir=tmp_path, workers=1, progress=False,
                      tokenizer=tokenizer)
    assert sandbox_calls == [2, 2]  # the model's tokenizer may tell the program other tokens
