"""`attnprog surrogate RUN`: a prompt's continuation with the run's heads replaced beside the
unmodified model's, and with a text file the perplexity of its lines with and without."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnprog.errors import CorpusError


@dataclass
class SurrogateConfig:
    """What `attnprog surrogate` does; the CLI fills it."""

    run: Path
    prompt: str = ""
    max_new_tokens: int = 20
    fraction: float = 0.25
    order: str = "cost"
    score: Path | None = None
    device: str = "auto"
    batch_size: int = 8


def run_surrogate(config: SurrogateConfig, echo: Callable[[str], None] = print) -> dict:
    """Build the surrogate, generate and score as ``config`` asks; return the figures."""
    from attnprog.engine.surrogate import Surrogate

    lines = _lines(Path(config.score)) if config.score is not None else []  # before the model loads
    surrogate = Surrogate.from_run(config.run, config.fraction, config.order, device=config.device)
    plain = Surrogate(surrogate.model, surrogate.tokenizer, {})
    info = surrogate.info
    echo(f"{len(surrogate.heads)} of {info['n_candidates']} heads replaced ({config.order} order, "
         f"{100 * config.fraction:g} %); leak check: {info['leak']}")
    for line in surrogate.describe():
        echo(f"  {line}")
    figures: dict = {"heads": len(surrogate.heads)}
    if config.prompt:
        from attnprog.synth.features import syntax_available

        syntax_available()  # loads spaCy now, so its start-up is not timed as generation
        for model in (surrogate, plain):  # first calls pay one-off set-up: neither is timed with it
            model.generate(_WARM_UP, 1)
        start = time.perf_counter()
        replaced = surrogate.generate(config.prompt, config.max_new_tokens)
        middle = time.perf_counter()
        unmodified = plain.generate(config.prompt, config.max_new_tokens)
        seconds = (middle - start, time.perf_counter() - middle)
        echo(f"prompt:      {config.prompt!r}")
        echo(f"replaced:    {replaced.continuation!r}  ({_pace(seconds[0], replaced.new_ids)})")
        echo(f"unmodified:  {unmodified.continuation!r}  ({_pace(seconds[1], unmodified.new_ids)})")
        figures["continuation"] = {"replaced": replaced.continuation,
                                   "unmodified": unmodified.continuation}
        figures["seconds"] = {"replaced": seconds[0], "unmodified": seconds[1]}
    if config.score is not None:
        sentences = surrogate.sentences(lines)
        keep = [s for s in sentences if s.n > 1]
        figures["perplexity"] = {"replaced": surrogate.perplexity(keep, config.batch_size),
                                 "unmodified": plain.perplexity(keep, config.batch_size)}
        ppl = figures["perplexity"]
        echo(f"perplexity on {len(keep)} lines of {config.score}: replaced {ppl['replaced']:.3f}, "
             f"unmodified {ppl['unmodified']:.3f} "
             f"({100 * (ppl['replaced'] / ppl['unmodified'] - 1):+.1f} %)")
    return figures


_WARM_UP = "Warm up."  # a text of its own, so that the prompt's parses are not cached by it


def _pace(seconds: float, new_ids: list[int]) -> str:
    """"12 tokens in 0.61 s": a continuation's pace, prompt included."""
    return f"{len(new_ids)} tokens in {seconds:.2f} s"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CorpusError(f"no text file at {path}: give a file with one text per line")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise CorpusError(f"{path} has no non-empty lines to score")
    return lines
