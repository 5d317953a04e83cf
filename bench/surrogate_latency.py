"""Surrogate latency: a forward on 16 x 256 tokens and per generated token, with 0, 25 and 50 %
of a run's heads replaced, against the unmodified model (SDPA). A measurement, not a test.

    PYTHONPATH=. python bench/surrogate_latency.py RUN_DIR [--texts 16] [--tokens 256]
"""

import argparse
import time

import torch

from attnprog import Surrogate
from attnprog.engine.corpus import builtin_corpus
from attnprog.synth.features import sentences_from_texts


def long_texts(tokenizer, n_texts: int, n_tokens: int) -> list:
    """``n_texts`` Sentences of ``n_tokens`` tokens from the built-in stories, run together."""
    stories = builtin_corpus().texts
    texts = [" ".join(stories[k + j] for j in range(6)) for k in range(n_texts)]
    sentences = sentences_from_texts(texts, tokenizer, max_length=n_tokens)
    return [s for s in sentences if s.n == n_tokens]


def timed(surrogate, call) -> tuple[float, float]:
    """(seconds, of which computing program rows) of one call."""
    surrogate.timings.rows = 0.0
    start = time.perf_counter()
    call()
    return time.perf_counter() - start, surrogate.timings.rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = Surrogate.from_run(args.run, 0.0)
    plain = Surrogate(base.model, base.tokenizer, {})
    texts = long_texts(base.tokenizer, args.texts, args.tokens)
    prompt = texts[0].text[: len(texts[0].text) // 4]
    print(f"{len(texts)} x {args.tokens} tokens; threads {torch.get_num_threads()}")
    plain.forward_batch(texts[:2])  # warm-up
    rows = [("unmodified (SDPA)", plain)]
    for fraction in (0.25, 0.5):
        s = Surrogate.from_run(args.run, fraction)
        rows.append((f"{100 * fraction:g} % replaced ({len(s.heads)} heads)",
                     Surrogate(base.model, base.tokenizer, s.heads)))
        s.forward_batch([s.sentences([prompt])[0]])  # warm caches (spaCy, sandbox)
    for name, s in rows:
        fresh = [t.copy() for t in texts]
        forward, f_rows = timed(s, lambda s=s, fresh=fresh: s.forward_batch(fresh))
        gen, g_rows = timed(s, lambda s=s: s.generate(prompt, args.new_tokens, stop_at_eos=False))
        print(f"{name:<32} forward {forward:7.2f} s (program rows {f_rows:6.2f} s)   "
              f"per new token {gen / args.new_tokens:6.3f} s (rows {g_rows / args.new_tokens:.3f} s)")


if __name__ == "__main__":
    main()
