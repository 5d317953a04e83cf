"""engine.share: the replaceable-share bisection on a scorer whose cost is a known function."""

from attnprog.engine.share import largest_within, replaceable_shares


def counting(increase):
    """The scorer and the list of head counts it was asked for."""
    asked = []

    def increase_at(k):
        asked.append(k)
        return increase(k)

    return increase_at, asked


def test_exact_search_returns_the_boundary():
    increase_at, _ = counting(lambda k: 0.5 * k)  # +16 % at 32 heads, +5 % at 10
    found = replaceable_shares(increase_at, 100, (16.0, 5.0), steps=None)
    assert (found[16.0].count, found[16.0].above) == (32, 33)
    assert (found[5.0].count, found[5.0].above) == (10, 11)
    assert found[16.0].share == 0.32


def test_capped_search_brackets_the_boundary_in_few_steps():
    increase_at, asked = counting(lambda k: 0.07 * k ** 1.5)  # boundary: 0.07 k^1.5 <= 16 -> 37
    found = largest_within(increase_at, 270, 16.0, steps=6)
    assert len(asked) == 6
    assert found.count <= 37 < found.above
    assert found.above - found.count <= 270 // 2 ** 6 + 1


def test_every_head_fitting_has_nothing_above():
    increase_at, _ = counting(lambda k: 0.01 * k)
    found = largest_within(increase_at, 50, 16.0, steps=None)
    assert (found.count, found.above) == (50, None)


def test_known_counts_and_a_first_guess_save_measurements():
    increase_at, asked = counting(lambda k: 0.5 * k)
    found = largest_within(increase_at, 100, 16.0, steps=None, known={25: 12.5, 50: 25.0},
                           first=32)
    assert found.count == 32 and asked[0] == 32
    assert all(25 < k < 50 for k in asked)
