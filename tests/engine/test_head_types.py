"""Head types: TransformerLens-style pattern scores, and the type they give a head."""

import numpy as np
import pytest
import torch

from attnprog.engine.head_types import (
    PATTERNS,
    classify,
    head_types,
    induction_scores,
    pattern_masks,
    pattern_scores,
    repeated_random_tokens,
)
from attnprog.layout import pack
from tests.engine.planted import first_token, planted_store, previous_token, self_token, store_of

LENGTHS = [12, 9, 15, 11]
SPLITS = ["heldout"] * len(LENGTHS)


def exact_store(*patterns):
    """A store whose heads attend exactly as ``patterns`` say (no noise), on texts of distinct
    tokens (no copies)."""
    store = planted_store(list(range(len(patterns))), list(patterns), LENGTHS, SPLITS, signal=1.0)
    store.ids_packed = torch.arange(sum(LENGTHS))
    return store


def score(types, head, pattern):
    return types.scores[head, PATTERNS.index(pattern)]


def test_a_previous_token_head_gets_its_type_with_score_1():
    types = head_types(exact_store(previous_token), range(len(LENGTHS)))
    assert types.types == ["previous token"]
    assert score(types, 0, "previous token") == pytest.approx(1.0)
    assert score(types, 0, "first token") == pytest.approx(np.mean([1 / (n - 1) for n in LENGTHS]))


def test_a_first_token_head_and_a_self_head_get_their_types_with_score_1():
    types = head_types(exact_store(first_token, self_token), range(len(LENGTHS)))
    assert types.types == ["first token", "self"]
    assert score(types, 0, "first token") == pytest.approx(1.0)
    assert score(types, 1, "self") == pytest.approx(1.0)
    assert score(types, 1, "previous token") == pytest.approx(0.0)


def tl_mul_score(attention, detection):
    """TransformerLens' detect_head "mul" score on one sequence, written from its definition:
    the elementwise product's sum over the attention's sum, every query row."""
    return float((attention * detection).sum() / attention.sum())


def test_rows_all_is_transformerlens_mul_score_exactly():
    rng = np.random.default_rng(1)
    ids = [[int(x) for x in rng.integers(0, 4, n)] for n in LENGTHS]  # small vocabulary: copies
    dense = []
    for n in LENGTHS:
        m = np.tril(rng.random((n, n)))
        dense.append(m / m.sum(1, keepdims=True))
    store = store_of(np.concatenate([pack(m) for m in dense])[None], LENGTHS, SPLITS)
    store.ids_packed = torch.tensor([i for row in ids for i in row])
    got = pattern_scores(store, patterns=("previous token", "duplicate token", "induction"), rows="all")
    for k, pattern in enumerate(("previous token", "duplicate token", "induction")):
        expected = np.mean([tl_mul_score(m, pattern_masks(x, patterns=(pattern,))[0])
                            for m, x in zip(dense, ids)])
        assert got[0, k] == pytest.approx(expected, rel=1e-5)


def test_duplicate_token_rows_are_those_with_an_earlier_copy():
    ids = [5, 1, 5, 2, 1, 3]  # rows 2 and 4 have an earlier copy
    dup = np.zeros((6, 6))
    dup[np.arange(6), [0, 0, 0, 2, 1, 4]] = 1.0  # rows 2 and 4 on their copy; others elsewhere
    store = store_of(pack(dup)[None], [6], ["heldout"])
    store.ids_packed = torch.tensor(ids)
    assert pattern_scores(store, patterns=("duplicate token",))[0, 0] == pytest.approx(1.0)
    assert pattern_scores(store, patterns=("duplicate token",), rows="all")[0, 0] == pytest.approx(2 / 6)


@pytest.mark.parametrize("scores, kind", [
    ({"first token": 0.9, "induction": 0.6}, "induction"),  # rests on the sink on ordinary text
    ({"first token": 0.55, "previous token": 0.4}, "first token"),
    ({"previous token": 0.3, "self": 0.3, "recent window": 0.8}, "recent window"),
    ({"first token": 0.3, "punctuation": 0.25, "recent window": 0.3}, "mixed"),
    ({"first token": 0.1, "punctuation": 0.1, "recent window": 0.2}, "content"),
])
def test_the_type_rules(scores, kind):
    assert classify(scores) == kind


def test_repeated_random_tokens_repeat_distinct_tokens_after_the_prefix():
    sequences = repeated_random_tokens(50, 10, 3, seed=0, prefix=[7], exclude=[0, 1])
    for seq in sequences:
        assert seq[0] == 7 and seq[1:11] == seq[11:] and len(set(seq[1:11])) == 10
        assert not {0, 1} & set(seq[1:])


# --- a tiny GPT-2 whose second layer is an induction head, wired by hand ------------------------

V, P = 32, 64  # vocabulary, positions
D = V + P + V + 1  # residual: token | position | previous token | one dimension no input uses


def _centred(weight: torch.Tensor) -> torch.Tensor:
    """Rows summing to 0 (the unused dimension takes the rest): LayerNorm's mean subtraction,
    the same on every input dimension, then adds nothing."""
    weight[D - 1] = -weight[: D - 1].sum(dim=0)
    return weight


def induction_gpt2():
    """Layer 0: a previous-token head that writes the previous token into its own dimensions
    (position i queries position i - 1 through the position embeddings). Layer 1: an induction
    head, the current token querying keys whose previous token is the same. MLPs are zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=1,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    beta = 4.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.wte.weight[torch.arange(V), torch.arange(V)] = 1.0
        model.transformer.wpe.weight[torch.arange(P), V + torch.arange(P)] = 1.0
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        q, k, v = (torch.zeros(D, D) for _ in range(3))
        q[V + torch.arange(P), torch.arange(P)] = beta  # query i on head dimension i
        k[V + torch.arange(P - 1), torch.arange(1, P)] = beta  # key j on dimension j + 1
        v[torch.arange(V), torch.arange(V)] = 1.0
        first = model.transformer.h[0].attn
        first.c_attn.weight.copy_(torch.cat([_centred(q), _centred(k), _centred(v)], dim=1))
        sigma = float(np.sqrt(2 / D * (1 - 2 / D)))  # LayerNorm's scale on token + position
        first.c_proj.weight[torch.arange(V), V + P + torch.arange(V)] = sigma
        q, k = torch.zeros(D, D), torch.zeros(D, D)
        q[torch.arange(V), torch.arange(V)] = beta  # the current token ...
        k[V + P + torch.arange(V), torch.arange(V)] = beta  # ... meets the key's previous token
        model.transformer.h[1].attn.c_attn.weight.copy_(
            torch.cat([_centred(q), _centred(k), torch.zeros(D, D)], dim=1))
    model.config._attnprog_id = "induction-gpt2"
    return model


def test_a_hand_wired_induction_head_scores_high_and_the_previous_token_head_low():
    induction = induction_scores(induction_gpt2(), tokenizer=None, n_sequences=4, seed=0)
    assert induction[1] > 0.95  # L1.H0: the token after the earlier copy
    assert induction[0] < 0.05  # L0.H0 attends to the previous token, not after the copy
    assert classify({"first token": 0.9, "induction": float(induction[1])}) == "induction"
