"""Head subsets named on the command line: 18.*,20.3 and friends."""

import pytest

from attnprog.engine.heads import head_name, parse_heads
from attnprog.errors import AttnProgError


def test_empty_spec_names_every_head():
    assert parse_heads("", 2, 3) == list(range(6)) == parse_heads(None, 2, 3)


def test_a_layer_wildcard_and_a_single_head():
    assert parse_heads("1.*,0.2", 2, 3) == [2, 3, 4, 5]


def test_a_head_wildcard_takes_that_head_in_every_layer():
    assert parse_heads("*.1", 3, 2) == [1, 3, 5]


def test_a_head_outside_the_model_says_the_models_shape():
    with pytest.raises(AttnProgError, match="2 layers x 3 heads"):
        parse_heads("5.0", 2, 3)


def test_a_malformed_item_says_the_expected_form():
    with pytest.raises(AttnProgError, match="LAYER.HEAD"):
        parse_heads("18", 30, 9)


def test_head_name_is_layer_dot_head():
    assert head_name(20 * 9 + 3, 9) == "20.3"
