"""Surrogate latency: a forward pass on 16 x 256 tokens and each generated token, with 0, 25 and
50 % of a run's heads replaced (cheapest first), against the unmodified model (SDPA) and against
eager attention with the same heads' probabilities overwritten (matrices given, no programs).
A measurement, not a test; every figure is the median of ``--repeats`` runs, all in one process.

    PYTHONPATH=. python bench/surrogate_latency.py RUN_DIR [--texts 16] [--tokens 256]

Rows: "surrogate" is ``attnprog.Surrogate`` (program rows computed for the texts, then the
model through attnprog's attention); "eager, overwritten" runs the same heads through
``replace_heads(impl="reference")`` with the surrogate's matrices computed beforehand, i.e.
what overwriting materialised eager probabilities costs without computing any program.
"""

import argparse
import statistics
import time

import torch

from attnprog import Surrogate
from attnprog.engine.batching import make_batch, pad_token_id
from attnprog.engine.corpus import builtin_corpus
from attnprog.engine.replace import replace_heads
from attnprog.synth.features import Sentence, _parses, sentences_from_texts


def long_texts(tokenizer, n_texts: int, n_tokens: int) -> list:
    """``n_texts`` Sentences of exactly ``n_tokens`` tokens: built-in stories run together,
    no story in two texts (where there are stories enough), so no parse serves two texts."""
    stories = builtin_corpus().texts
    per_text = max(1, len(stories) // n_texts)
    texts = [" ".join(stories[(per_text * k + j) % len(stories)] for j in range(per_text + 2))
             for k in range(n_texts)]
    sentences = sentences_from_texts(texts, tokenizer, max_length=n_tokens)
    return [s for s in sentences if s.n == n_tokens]


def median_time(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forget_texts(texts: list) -> list:
    """Copies of ``texts`` with nothing computed for them kept anywhere (features, tags, the
    process's spaCy parses): each measurement sees them as new text."""
    _parses.clear()
    return [Sentence(text=t.text, ids=list(t.ids), tokens=list(t.tokens),
                     offsets=list(t.offsets)) for t in texts]


def timed(surrogate: Surrogate, call) -> tuple[float, float, float]:
    """(seconds, of which program rows, of which spaCy parses) of one call."""
    surrogate.timings.rows = surrogate.timings.syntax = 0.0
    start = time.perf_counter()
    call()
    return time.perf_counter() - start, surrogate.timings.rows, surrogate.timings.syntax


def forward_split(surrogate: Surrogate, texts: list, repeats: int) -> tuple[float, ...]:
    """(seconds per forward of the batch, of which program rows, of which spaCy parses), on
    texts new each time."""
    runs = [timed(surrogate, lambda: surrogate.forward_batch(forget_texts(texts)))
            for _ in range(repeats)]
    return tuple(statistics.median(r[k] for r in runs) for k in range(3))


def per_token(surrogate: Surrogate, prompt: str, new_tokens: int, repeats: int) -> tuple[float, ...]:
    """(seconds per generated token after the first, of which program rows, of which spaCy
    parses): generating 1 + new_tokens minus generating 1 token, divided by new_tokens."""
    def run(count):  # the prompt is new text each time (no parse kept)
        _parses.clear()
        return timed(surrogate, lambda: surrogate.generate(prompt, count, stop_at_eos=False))

    runs = []
    for _ in range(repeats):
        long, short = run(1 + new_tokens), run(1)
        runs.append([(a - b) / new_tokens for a, b in zip(long, short, strict=True)])
    return tuple(statistics.median(r[k] for r in runs) for k in range(3))


def eager_overwritten(surrogate: Surrogate, texts: list, repeats: int) -> float:
    """Seconds per forward with the heads' matrices given and eager attention overwritten."""
    model = surrogate.model
    batch = make_batch([s.ids for s in texts], pad_id=pad_token_id(surrogate.tokenizer),
                       device=next(model.parameters()).device)
    surrogate._attach_meaning(texts)
    sources = {key: m.cpu().numpy() for key, m in surrogate.head_sources(texts, batch.width).items()}
    with replace_heads(model, sources, impl="reference") as replacement:
        return median_time(lambda: replacement.forward(batch), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fractions", default="0.25,0.5")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = Surrogate.from_run(args.run, 0.0)
    model, tokenizer = base.model, base.tokenizer
    texts = long_texts(tokenizer, args.texts, args.tokens)
    prompt = texts[0].text[: len(texts[0].text) // 4]
    device = next(model.parameters()).device
    print(f"{len(texts)} x {args.tokens} tokens on {device}; torch threads "
          f"{torch.get_num_threads()}; {args.new_tokens} generated tokens after a "
          f"{len(base.sentences([prompt])[0].ids)}-token prompt; median of {args.repeats}")
    rows = [("unmodified (SDPA)", base)]
    for fraction in map(float, args.fractions.split(",")):
        chosen = Surrogate.from_run(args.run, fraction)
        rows.append((f"{100 * fraction:g} % ({len(chosen.heads)} heads)",
                     Surrogate(model, tokenizer, chosen.heads, leaks=chosen.leaks)))
    for _, s in rows:  # warm-up: spaCy, the sandbox, torch's kernels
        s.forward_batch(texts[:2])
        s.generate(prompt, 2, stop_at_eos=False)

    print("| heads replaced | forward (s) | program rows (s) | of which parsing (s) | "
          "x unmodified | eager, overwritten (s) | per token (ms) | rows (ms) | "
          "of which parsing (ms) | x unmodified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_forward = base_token = None
    for name, s in rows:
        forward, f_rows, f_parse = forward_split(s, texts, args.repeats)
        token, t_rows, t_parse = per_token(s, prompt, args.new_tokens, args.repeats)
        base_forward, base_token = base_forward or forward, base_token or token
        eager = f"{eager_overwritten(s, texts, args.repeats):.2f}" if s.heads else "-"
        print(f"| {name} | {forward:.2f} | {f_rows:.2f} | {f_parse:.2f} | "
              f"{forward / base_forward:.2f} | {eager} | {1000 * token:.1f} | "
              f"{1000 * t_rows:.1f} | {1000 * t_parse:.1f} | {token / base_token:.2f} |",
              flush=True)

if __name__ == "__main__":
    main()
