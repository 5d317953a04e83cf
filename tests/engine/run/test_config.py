"""A run's settings are checked before any stage runs, with the option to change named."""

import pytest

from attnprog.engine.run.config import RunConfig
from attnprog.engine.run.pipeline import run_pipeline
from attnprog.errors import AttnProgError


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"max_tokens": -5}, "--max-tokens must be at least 2, got -5"),
    ({"n_candidates": -1}, "--candidates must be at least 0, got -1"),
    ({"fraction": 1.5}, "fraction must be between 0 and 1, got 1.5"),
    ({"cost_method": "foo"}, "unknown cost method 'foo': use auto, exact"),
    ({"order": "foo"}, "unknown head order 'foo'"),
    ({"heads": "L1H2"}, "head 'L1H2' is not LAYER.HEAD"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_a_setting_a_later_stage_would_refuse_is_refused_up_front(settings, message):
    with pytest.raises(AttnProgError, match=message):
        RunConfig(**settings).check()


def test_a_refused_setting_leaves_no_run_directory_behind(tmp_path):
    with pytest.raises(AttnProgError, match="fraction"):
        run_pipeline(RunConfig(out=str(tmp_path / "run"), fraction=2.0), echo=lambda line: None)
    assert not (tmp_path / "run").exists()
