"""The built-in generator: enough distinct candidates, readable sources, vectorised == executed."""

import json
import random

import numpy as np
import pytest

from attnprog.errors import ProgramError
from attnprog.layout import causal_offsets, pack
from attnprog.synth.features import Sentence
from attnprog.synth.generator.probes import tokenise
from attnprog.synth.generator.specs import (
    enumerate_specs,
    evaluate_generated,
    generate,
    is_generated,
    probe_sentences,
    program_from_spec,
)
from attnprog.synth.policy import check_source
from attnprog.synth.program import Program, normalise
from attnprog.synth.runtime.validate import validate_many

ALLOWED_IMPORTS = {"numpy", "math", "re", "string", "collections", "itertools", "functools"}


@pytest.fixture(scope="module")
def programs() -> list[Program]:
    return generate(5000)


@pytest.fixture(scope="module")
def texts() -> list[Sentence]:
    """Probe texts plus texts the generator never saw: no POS tags, one token, 64 tokens."""
    vocab: dict[str, int] = {}
    long_text = " ".join(["The model reads the text, and the model writes the text again (twice)."] * 6)
    unseen = [
        tokenise('Bob said "hi" to Bob. Then Bob left, quietly.', vocab, with_pos=False),
        tokenise("Hello", vocab, with_pos=False),
        tokenise(long_text, vocab),
    ]
    long_sentence = unseen[-1]
    unseen[-1] = Sentence(
        text=long_sentence.text,
        ids=long_sentence.ids[:64],
        tokens=long_sentence.tokens[:64],
        offsets=long_sentence.offsets[:64],
        pos=long_sentence.pos[:64],
    )
    return probe_sentences() + unseen


def run_source(program: Program, sentences) -> np.ndarray:
    """Execute the emitted source in-process (our own trusted code), normalise, pack."""
    namespace: dict = {}
    exec(compile(program.source, "<generated>", "exec"), namespace)
    function = namespace[program.name]
    return np.concatenate([pack(normalise(function(s))) for s in sentences]).astype(np.float32)


def test_generate_yields_5000_distinct_candidates(programs):
    assert len(programs) == 5000
    assert len({p.hash for p in programs}) == 5000
    outputs = evaluate_generated(programs, probe_sentences())
    rounded = np.round(outputs.astype(np.float64), 5)
    assert len(np.unique(rounded, axis=0)) == 5000


def test_generate_covers_singles_sinks_pairs_and_triples(programs):
    sizes = {len(p.provenance["spec"]["terms"]) for p in programs}
    families = {p.family for p in programs}
    assert sizes == {1, 2, 3}
    assert {"previous", "first", "induction", "duplicate", "sink+previous"} <= families
    assert {"sink+recency", "sink+recency+the", "sink+previous+recency"} <= families


def test_multi_argument_sources_survive_sorted_json(programs):
    program = next(p for p in programs if p.provenance["spec"]["terms"][0]["prim"] == "sink_recency")
    restored = Program.from_dict(json.loads(json.dumps(program.to_dict(), sort_keys=True)))
    assert is_generated(restored)
    assert "sink_recency(s, sink=" in program.source


def test_generate_is_deterministic_and_simplest_first(programs):
    assert [p.hash for p in generate(50)] == [p.hash for p in programs[:50]]


def test_generated_programs_are_recognised(programs):
    assert all(is_generated(p) for p in programs)


def test_edited_program_is_not_generated_and_is_refused(programs):
    edited = Program(
        programs[0].source.replace("1.0", "2.0"),
        programs[0].name,
        programs[0].family,
        programs[0].provenance,
    )
    assert not is_generated(edited)
    with pytest.raises(ProgramError, match="sandbox"):
        evaluate_generated([edited], probe_sentences())


def test_spec_survives_a_json_round_trip(programs):
    record = json.loads(json.dumps(programs[1234].to_dict()))
    restored = Program.from_dict(record)
    assert is_generated(restored)
    assert program_from_spec(restored.provenance["spec"]).source == programs[1234].source


def test_sources_import_only_allowed_modules(programs):
    for program in programs[::50]:
        lines = program.source.splitlines()
        imports = {line.split()[1] for line in lines if line.startswith(("import", "from"))}
        assert imports <= ALLOWED_IMPORTS


def test_vectorised_outputs_equal_executed_sources(programs, texts):
    richest = list(enumerate_specs())[-2000:]  # pairs with fallbacks, beyond the first 5000
    sample = random.Random(0).sample(programs, 250) + [
        program_from_spec(spec) for spec in random.Random(0).sample(richest, 50)
    ]
    vectorised = evaluate_generated(sample, texts)
    assert vectorised.shape == (300, int(causal_offsets([s.n for s in texts])[-1]))
    executed = np.stack([run_source(p, texts) for p in sample])
    assert np.abs(vectorised - executed).max() <= 1e-6


def test_vectorised_outputs_are_normalised(programs, texts):
    outputs = evaluate_generated(programs[::25], texts)
    start = 0
    for s in texts:
        rows, _ = np.tril_indices(s.n)
        cells = outputs[:, start : start + len(rows)]
        row_sums = np.zeros((len(outputs), s.n))
        np.add.at(row_sums.T, rows, cells.T)
        np.testing.assert_allclose(row_sums, 1.0, atol=1e-5)
        start += len(rows)


def test_emitted_sources_pass_static_checks(programs):
    assert [check_source(p) for p in programs[::10]] == [""] * 500


def test_emitted_sources_pass_validate(programs):
    sample = random.Random(1).sample(programs, 100)
    results = validate_many(sample)
    failures = [(p.hash, r.reason) for p, r in zip(sample, results, strict=True) if not r.ok]
    assert not failures


@pytest.mark.parametrize("budget_bytes", [2 << 30, 200_000, 0])
def test_an_atom_cache_shared_by_chunks_changes_no_output(programs, texts, budget_bytes):
    from attnprog.synth.generator.mixing import AtomCache, evaluate_specs

    specs = [p.provenance["spec"] for p in programs[::11]]
    cache = AtomCache(budget_bytes)
    chunks = [evaluate_specs(specs[i : i + 60], texts, cache) for i in range(0, len(specs), 60)]
    assert np.array_equal(np.concatenate(chunks), evaluate_specs(specs, texts))
    assert cache.used_bytes <= budget_bytes
    assert (len(cache.rows) > 0) == (budget_bytes > 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_torch_mixer_equals_the_numpy_path(programs, texts, workers):
    import torch

    from attnprog.synth.generator.mixing import TorchMixer, evaluate_specs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [p.provenance["spec"] for p in programs[::7]]  # singles, pairs, triples, sinks
    mixer = TorchMixer(specs, texts, device, workers=workers)
    got = torch.cat([mixer.rows(range(i, min(i + 100, len(specs))))
                     for i in range(0, len(specs), 100)]).cpu().numpy()
    np.testing.assert_allclose(got, evaluate_specs(specs, texts), rtol=0, atol=1e-6)
