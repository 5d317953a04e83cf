"""engine.bootstrap: intervals over texts that hold the point estimate and narrow with more."""

import numpy as np

from attnprog.engine.bootstrap import mean_interval, ppl_increase, ppl_increase_interval


def synthetic(n_texts, seed=0, n_seeds=1):
    """Per-text summed NLL of a base model and of a model ~10 % worse, with text-level noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 200, size=n_texts).astype(float)
    base = tokens * rng.normal(2.0, 0.3, size=n_texts)
    worse = base[None] + tokens * rng.normal(np.log(1.1), 0.05, size=(n_seeds, n_texts))
    return base, worse, tokens


def test_point_estimate_is_the_perplexity_ratio():
    base, worse, tokens = synthetic(30)
    expected = 100 * (np.exp(worse.sum() / tokens.sum()) / np.exp(base.sum() / tokens.sum()) - 1)
    assert np.isclose(ppl_increase(base, worse[0], tokens), expected)


def test_interval_contains_the_point_estimate():
    for n_seeds in (1, 3):
        base, worse, tokens = synthetic(30, n_seeds=n_seeds)
        low, high = ppl_increase_interval(base, worse, tokens)
        assert low < ppl_increase(base, worse, tokens) < high


def test_interval_narrows_with_more_texts():
    widths = []
    for n_texts in (10, 100, 1000):
        low, high = ppl_increase_interval(*synthetic(n_texts))
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_seed_spread_widens_the_interval():
    base, worse, tokens = synthetic(30, n_seeds=1)
    spread = np.concatenate([worse, worse + 0.2 * tokens, worse - 0.2 * tokens])
    one = ppl_increase_interval(base, worse, tokens)
    three = ppl_increase_interval(base, spread, tokens)
    assert three[1] - three[0] > one[1] - one[0]


def test_mean_interval_holds_the_mean_and_narrows():
    rng = np.random.default_rng(1)
    few, many = rng.uniform(0, 1, size=(5, 10)), rng.uniform(0, 1, size=(5, 400))
    low, high = mean_interval(few)
    assert low < few.mean() < high
    low_many, high_many = mean_interval(many)
    assert high_many - low_many < high - low
