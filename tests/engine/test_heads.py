"""The one head vocabulary: specs 18.3, 18.*, *.3, all in; labels L18.H3 out."""

import pytest

from attnprog.engine.heads import check_spec, head_label, head_label_of, parse_heads
from attnprog.errors import AttnProgError


def test_one_head_is_its_head_index():
    assert parse_heads("1.2", 2, 3) == [1 * 3 + 2]


def test_a_layer_wildcard_takes_every_head_of_that_layer():
    assert parse_heads("1.*", 2, 3) == [3, 4, 5]


def test_a_head_wildcard_takes_that_head_in_every_layer():
    assert parse_heads("*.1", 3, 2) == [1, 3, 5]


def test_items_are_comma_separated_sorted_and_without_repeats():
    assert parse_heads("1.*, 0.2,1.0", 2, 3) == [2, 3, 4, 5]


@pytest.mark.parametrize("spec", ["all", "ALL", "*", "*.*", "", "  ", None])
def test_all_and_an_empty_spec_name_every_head(spec):
    assert parse_heads(spec, 2, 3) == list(range(6))


def test_a_label_is_accepted_as_a_spec_item():
    assert parse_heads("L1.H2,L0.*", 2, 3) == [0, 1, 2, 5]


@pytest.mark.parametrize("spec", ["5.0", "0.3", "2.*", "*.7"])
def test_a_head_outside_the_model_says_the_models_shape(spec):
    with pytest.raises(AttnProgError, match="out of range: the model has 2 layers x 3 heads"):
        parse_heads(spec, 2, 3)


@pytest.mark.parametrize("spec", ["18", "1-2", "a.b", "1.2.3", "L1H2", "-1.0"])
def test_a_malformed_item_says_what_to_write(spec):
    with pytest.raises(AttnProgError, match=r"not LAYER\.HEAD.*write heads as 18\.3, 18\.\*"):
        parse_heads(spec, 30, 9)


@pytest.mark.parametrize("spec", ["1.²", "١.٣"])
def test_digits_other_than_ascii_are_a_malformed_item_not_a_traceback(spec):
    with pytest.raises(AttnProgError, match=r"not LAYER\.HEAD"):
        check_spec(spec)
    with pytest.raises(AttnProgError, match=r"not LAYER\.HEAD"):
        parse_heads(spec, 2, 4)


@pytest.mark.parametrize("spec", ["1.0,*", "all, 1.0"])
def test_every_spec_check_spec_accepts_parses(spec):
    check_spec(spec)
    assert parse_heads(spec, 2, 3) == list(range(6))


def test_a_spec_is_checked_for_form_before_the_models_shape_is_known():
    check_spec("L99.H0, 18.*, all")  # well formed; its range waits for the model
    with pytest.raises(AttnProgError, match=r"head 'L1H2' is not LAYER\.HEAD"):
        check_spec("18.3,L1H2")


def test_a_spec_of_only_commas_names_no_heads():
    with pytest.raises(AttnProgError, match="no heads"):
        parse_heads(",", 2, 3)


def test_a_head_is_labelled_L_layer_dot_H_head():
    assert head_label(20 * 9 + 3, 9) == "L20.H3" == head_label_of(20, 3)
    assert head_label(0, 9) == "L0.H0"


def test_a_label_parses_back_to_its_head_index():
    assert [parse_heads(head_label(h, 4), 3, 4) for h in range(12)] == [[h] for h in range(12)]


@pytest.mark.parametrize("spec", ["18.*", "*.3", "18.3,20.1", "all"])
def test_llm_heads_specs_name_the_same_heads_as_heads(spec):
    """`run --llm-heads` and `synthesize --heads` (engine.synthesis) read specs as `--heads` does."""
    from attnprog.engine.synthesis import head_pairs as llm_heads

    store = _Shape(n_layers=24, n_heads=9)
    assert [store.row(*pair) for pair in llm_heads(spec, store)] == parse_heads(spec, 24, 9)


class _Shape:
    """The part of an AttentionStore that head specs read: its shape."""

    def __init__(self, n_layers: int, n_heads: int):
        self.n_layers, self.n_heads = n_layers, n_heads

    def head_of(self, head_index: int) -> tuple[int, int]:
        return divmod(head_index, self.n_heads)

    def row(self, layer: int, head: int) -> int:
        return layer * self.n_heads + head
