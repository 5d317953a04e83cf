"""`attnprog surrogate`: a continuation beside the unmodified model's, and a file's perplexity."""

import pytest

from attnprog.engine.run.surrogate_command import SurrogateConfig, run_surrogate
from attnprog.errors import CorpusError
from tests.engine.surrogate_run import make_run


def test_prints_both_continuations_and_both_perplexities(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "run", *tiny_gpt2)
    lines = tmp_path / "lines.txt"
    lines.write_text("The cat sat on the mat.\n\nA dog ran home.\n")
    printed = []
    figures = run_surrogate(SurrogateConfig(run=run, prompt="The cat", max_new_tokens=3,
                                            score=lines), echo=printed.append)
    text = "\n".join(printed)
    assert "replaced:" in text and "unmodified:" in text and "perplexity on 2 lines" in text
    assert set(figures["perplexity"]) == {"replaced", "unmodified"}


def test_a_missing_file_to_score_is_refused_before_anything_is_printed(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "run", *tiny_gpt2)
    printed = []
    with pytest.raises(CorpusError, match="one text per line"):
        run_surrogate(SurrogateConfig(run=run, score=tmp_path / "none.txt"), echo=printed.append)
    assert printed == []  # the error is the one line a user sees
