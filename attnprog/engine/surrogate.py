"""A surrogate model: the model with chosen heads computed by their programs, on any text.

``Surrogate(model, tokenizer, {(layer, head): program})`` or ``Surrogate.from_run(run_dir)``
(the heads a run's sweep replaces at a fraction). Each forward pass computes the replaced
heads' program matrices for its texts on the model's device (``engine.program_rows``:
fitted programs in torch, attnprog's other programs in this process, the rest in the
sandbox) and runs the model with them installed in attnprog's attention (``engine.replace``).
Generation is greedy and uses the KV cache: each new token computes only its own row of each
replaced head (programs are causal, so the rows of earlier tokens do not change).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnprog.engine.batching import batches_by_length, make_batch, pad_token_id
from attnprog.engine.heads import head_label_of, parse_heads
from attnprog.engine.program_rows import (
    ROW_BY_ROW,
    newest_rows,
    outputs_by_path,
    program_matrices,
    program_path,
)
from attnprog.engine.replace import head_counts, replace_heads
from attnprog.errors import ModelError
from attnprog.synth.program import as_program
from attnprog.synth.runtime.evaluate import _reads_syntax


@dataclass
class Generation:
    """A greedy continuation: the whole sequence as a Sentence, the new tokens, and the
    logits [new tokens, vocab] each was chosen from."""

    sentence: object  # attnprog.synth.features.Sentence: prompt and continuation
    new_ids: list[int]
    continuation: str
    logits: torch.Tensor | None = None


@dataclass
class Timings:
    """Seconds spent computing program rows (``syntax`` of them in spaCy's parses of the
    texts' prefixes) and in the model, summed over calls."""

    rows: float = 0.0
    model: float = 0.0
    syntax: float = 0.0
    calls: int = 0


def _head_key(key, n_layers: int, n_heads: int) -> tuple[int, int]:
    """(layer, head) from a key of ``Surrogate.heads``: a pair, or one head as a label ("L18.H3",
    "18.3") copied from a report."""
    if isinstance(key, str):
        found = parse_heads(key, n_layers, n_heads)
        if len(found) != 1 or not key.strip():
            raise ModelError(f"head key {key!r} names {len(found)} heads: key each program by "
                             "one head, (18, 3) or 'L18.H3'")
        return divmod(found[0], n_heads)
    try:
        layer, head = key
        return int(layer), int(head)
    except (TypeError, ValueError) as err:
        raise ModelError(f"head key {key!r} is not a head: key each program by (layer, head), "
                         "e.g. (18, 3), or by a label such as 'L18.H3'") from err


@dataclass
class Surrogate:
    """``model`` with ``heads`` {(layer, head) or "L18.H3": Program or Python function} replaced
    by their programs (a function is taken as a custom program of its own source).

    ``paths`` says how each head's program is computed (see ``engine.program_rows``);
    ``info`` what ``from_run`` read (order, fraction, leak check, swaps). ``leaks`` {program
    hash: leak} known already (``from_run``'s are checked); the others are measured on the
    probe texts, and a program that reads later tokens is computed row by row on prefixes.
    """

    model: torch.nn.Module
    tokenizer: object
    heads: Mapping
    impl: str = "auto"
    info: dict = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    leaks: Mapping | None = None

    def __post_init__(self) -> None:
        if self.model.training:
            raise ModelError("a surrogate is inference-only: call model.eval() first")
        n_layers, n_heads = head_counts(self.model)
        self.heads = {_head_key(key, n_layers, n_heads): as_program(p)
                      for key, p in dict(self.heads).items()}
        for layer, head in self.heads:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ModelError(f"head {head_label_of(layer, head)} does not exist: the model "
                                 f"has {n_layers} layers x {n_heads} heads")
        self.programs = list({p.hash: p for p in self.heads.values()}.values())
        self.paths = [program_path(p) for p in self.programs]
        self._needs_syntax = any(map(_reads_syntax, self.programs))
        self._check_leaks()
        # the keyword a forward takes its KV cache by: ``cache`` in newer transformers
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        row_of = {p.hash: k for k, p in enumerate(self.programs)}
        self._row_of_head = {key: row_of[p.hash] for key, p in self.heads.items()}

    def _check_leaks(self) -> None:
        """Measure the leaks not known yet; a leaky program's path becomes ROW_BY_ROW."""
        from attnprog.synth.features import probe_sentences, sentences_from_texts
        from attnprog.synth.runtime.leak import is_leaky, program_leaks

        known = dict(self.leaks or {})
        todo = [p for p in self.programs if p.hash not in known]
        if todo:
            texts = sentences_from_texts([s.text for s in probe_sentences()], self.tokenizer)
            self._attach_meaning(texts)
            known.update(zip([p.hash for p in todo],
                             program_leaks(todo, texts, outputs_by_path).tolist(), strict=True))
        self.leaks = known
        self.paths = [ROW_BY_ROW if is_leaky(known[p.hash]) else path
                      for p, path in zip(self.programs, self.paths, strict=True)]

    @classmethod
    def from_run(cls, run_dir: str | Path, fraction: float = 0.25, order: str = "cost", *,
                 device: str = "auto", impl: str = "auto") -> Surrogate:
        """The run's model with the heads its sweep replaces at ``fraction`` in ``order``
        ("cost": cheapest first, "iou": best fit first), each by its best causal program."""
        from attnprog.engine.models import load_model
        from attnprog.engine.run.surrogate_heads import check_run, run_heads

        model, tokenizer = load_model(check_run(Path(run_dir), fraction, order).model,
                                      device=device, attn_implementation="sdpa")
        chosen = run_heads(Path(run_dir), fraction, order, tokenizer)
        info = {"run": str(run_dir), "order": order, "fraction": fraction,
                "n_candidates": chosen.n_candidates, "leak": chosen.leak, "swaps": chosen.swaps,
                "max_tokens": chosen.max_tokens}
        causal = {p.hash: 0.0 for p in chosen.heads.values()}  # the run's leak check chose them
        return cls(model, tokenizer, chosen.heads, impl=impl, info=info, leaks=causal)

    # --- texts in ----------------------------------------------------------------------------
    def sentences(self, texts: Sequence) -> list:
        """Sentences for texts (strings are tokenised as the model sees them; Sentences kept)."""
        from attnprog.synth.features import sentences_from_texts

        texts = list(texts)
        raw = [k for k, t in enumerate(texts) if isinstance(t, str)]
        if raw:
            for k, s in zip(raw, sentences_from_texts([texts[k] for k in raw], self.tokenizer),
                            strict=True):
                texts[k] = s
        self._check_length(texts)
        return texts

    def _check_length(self, sentences: Sequence, new_tokens: int = 0) -> None:
        """ModelError for a text (with ``new_tokens`` to come) longer than the model's
        positions, which it would otherwise index past."""
        from attnprog.engine.models import context_size

        limit = context_size(self.model)
        for k, s in enumerate(sentences):
            if s.n + new_tokens > limit:
                more = f" and {new_tokens} new tokens" if new_tokens else ""
                raise ModelError(f"text {k + 1} has {s.n} tokens{more}, more than the {limit} "
                                 "positions the model takes: shorten or split it")

    def describe(self) -> list[str]:
        """One line per replaced head: its label, program and how the program runs."""
        from attnprog.synth.titles import program_title

        path_of = dict(zip([p.hash for p in self.programs], self.paths, strict=True))
        return [f"{head_label_of(*key):<7} {path_of[p.hash]:<24} {program_title(p)}"
                for key, p in sorted(self.heads.items())]

    # --- forward passes ----------------------------------------------------------------------
    def head_sources(self, sentences: Sequence, width: int) -> dict:
        """Each replaced head's [batch, query_pos, key_pos] program matrices for one batch, on
        the model's device, texts right-padded to ``width`` (a text without the token meaning
        programs read gets it here)."""
        if not self.heads:
            return {}
        self._attach_meaning(sentences)
        device = next(self.model.parameters()).device
        dense = program_matrices(self.programs, sentences, width, device, self.tokenizer,
                                 self.paths)
        return {key: dense[row] for key, row in self._row_of_head.items()}

    def newest_sources(self, s) -> dict:
        """Each replaced head's row for the last token of ``s``: [1, 1, n] on the model's device."""
        device = next(self.model.parameters()).device
        rows = newest_rows(self.programs, s, device, self.tokenizer, self.paths)
        return {key: rows[row] for key, row in self._row_of_head.items()}

    @contextmanager
    def _replaced(self):
        """The model with attnprog's attention while the heads' matrices are installed (the
        model's own attention when nothing is replaced)."""
        if not self.heads:
            yield None
            return
        with replace_heads(self.model, {}, impl=self.impl) as replacement:
            yield replacement

    def _run(self, replacement, sources_of, **inputs):
        """One model call with the matrices ``sources_of()`` computes, timed in two parts."""
        start = time.perf_counter()
        if replacement is not None:
            replacement.install(sources_of(), next(self.model.parameters()).device)
        middle = time.perf_counter()
        output = self.model(**inputs)
        self.timings.rows += middle - start
        self.timings.model += time.perf_counter() - middle
        self.timings.calls += 1
        return output

    @torch.no_grad()
    def forward_batch(self, sentences: Sequence) -> torch.Tensor:
        """Logits [batch, query_pos, vocab] of one right-padded batch of Sentences."""
        device = next(self.model.parameters()).device
        batch = make_batch([s.ids for s in sentences], pad_id=pad_token_id(self.tokenizer),
                           sentences=list(sentences), device=device)

        with self._replaced() as replacement:
            return self._run(replacement, lambda: self._text_sources(sentences, batch.width),
                             input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).logits

    def _text_sources(self, sentences: Sequence, width: int | None = None,
                      newest: bool = False) -> dict:
        """What the texts' programs read (token meaning, causal syntax; a no-op for a text
        grown from one that had them), then ``head_sources`` (``newest_sources`` for the last
        token of one text)."""
        self._attach_meaning(sentences)
        self._attach_syntax(sentences)
        if newest:
            return self.newest_sources(sentences[0])
        return self.head_sources(sentences, width or max(s.n for s in sentences))

    def _attach_meaning(self, sentences: Sequence) -> None:
        """Token meaning for programs that read it: the cosine of the model's own input
        embeddings of each new text's tokens (texts from a store already carry it), as
        ``synth.embeddings`` computes it. In torch: a numpy matmul here would wake BLAS
        threads that then spin against the model's own (3x slower decoding on 2 cores)."""
        for s in sentences:
            if s.token_similarity is None:
                unit = self._unit_embeddings(s.ids)
                s.token_similarity = (unit @ unit.T).float().cpu().numpy()
                s.token_similarity.setflags(write=False)

    def _attach_syntax(self, sentences: Sequence) -> None:
        """Causal tags and arcs for texts without them, when a replaced head's program reads
        them (timed apart: one spaCy parse per token is most of a new text's rows)."""
        from attnprog.synth.features import attach_syntax

        if self._needs_syntax and not all(s.has_syntax for s in sentences):
            start = time.perf_counter()
            attach_syntax(sentences)
            self.timings.syntax += time.perf_counter() - start

    def _unit_embeddings(self, ids) -> torch.Tensor:
        """[len(ids), d] float64 input-embedding rows divided by their norms (zero rows stay 0)."""
        weight = self.model.get_input_embeddings().weight
        rows = weight[torch.as_tensor(ids, device=weight.device)].detach().double()
        norms = rows.norm(dim=1, keepdim=True)
        return torch.where(norms > 0, rows / norms.clamp_min(1e-300), 0.0)

    def _grow(self, s, token: int):
        """``s`` with one more token, carrying what earlier tokens already have (causal syntax,
        similarities): only the newest token's are computed."""
        from attnprog.synth.features import extend_syntax

        start = time.perf_counter()
        grown = _extended(s, token, self.tokenizer.decode([token]))
        if s.has_syntax:
            parse = time.perf_counter()
            extend_syntax(grown, s)
            self.timings.syntax += time.perf_counter() - parse
        if s.token_similarity is not None:
            unit = self._unit_embeddings(grown.ids)
            row = (unit @ unit[-1]).float().cpu().numpy()  # [n + 1] the newest token's
            similarity = np.zeros((grown.n, grown.n), dtype=np.float32)
            similarity[:-1, :-1] = s.token_similarity
            similarity[-1], similarity[:, -1] = row, row
            grown.token_similarity = similarity
            grown.token_similarity.setflags(write=False)
        self.timings.rows += time.perf_counter() - start
        return grown

    def logits(self, texts: Sequence, batch_size: int = 8) -> list[torch.Tensor]:
        """Each text's logits [query_pos, vocab] (texts: strings or Sentences)."""
        sentences = self.sentences(texts)
        result: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
        for group in batches_by_length([s.n for s in sentences], batch_size):
            logits = self.forward_batch([sentences[k] for k in group])
            for b, k in enumerate(group):
                result[k] = logits[b, : sentences[k].n].float().cpu()
        return result

    def token_logprobs(self, texts: Sequence, batch_size: int = 8) -> list[np.ndarray]:
        """log p(token t | tokens < t), t = 1..n-1, per text: float64 (as ``engine.nll``)."""
        sentences = self.sentences(texts)
        result: list[np.ndarray] = [np.zeros(0)] * len(sentences)
        for group in batches_by_length([s.n for s in sentences], batch_size):
            logits = self.forward_batch([sentences[k] for k in group])
            for b, k in enumerate(group):
                n = sentences[k].n
                targets = torch.as_tensor(sentences[k].ids[1:], device=logits.device)
                logp = -F.cross_entropy(logits[b, : n - 1].float(), targets, reduction="none")
                result[k] = logp.double().cpu().numpy()
        return result

    def perplexity(self, texts: Sequence, batch_size: int = 8) -> float:
        """Perplexity over every predicted token of ``texts``."""
        from attnprog.engine.nll import perplexity

        return perplexity(self.token_logprobs(texts, batch_size))

    # --- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 20, stop_at_eos: bool = True,
                 use_cache: bool = True) -> Generation:
        """Greedy continuation of ``prompt`` (a string or Sentence), heads replaced throughout.

        With the KV cache (the default) the prompt runs once and each new token is one step
        that computes only that token's row of each replaced head (programs are causal, so
        earlier rows do not change); ``use_cache=False`` reruns the whole sequence per token.
        """
        if max_new_tokens < 0:
            raise ModelError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        s = self.sentences([prompt])[0]
        self._check_length([s], max_new_tokens)
        if max_new_tokens == 0:  # the loop below chooses a token before it checks the count
            return Generation(s, [], "", torch.zeros(0, 0))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        device = next(self.model.parameters()).device
        new_ids: list[int] = []
        chosen_from = []  # each step's logits for its new token
        with self._replaced() as replacement:
            output = self._run(replacement, lambda: self._text_sources([s]), use_cache=use_cache,
                               input_ids=torch.tensor([s.ids], device=device))
            while True:
                chosen_from.append(output.logits[0, -1].float().cpu())
                token = int(chosen_from[-1].argmax())
                new_ids.append(token)
                s = self._grow(s, token)
                if len(new_ids) == max_new_tokens or (stop_at_eos and token == eos):
                    break
                if use_cache:  # the new token alone, its rows only, against the cache
                    output = self._run(replacement, lambda s=s: self._text_sources([s], newest=True),
                                       use_cache=True,
                                       input_ids=torch.tensor([[token]], device=device),
                                       **{self._cache_name: _cache_of(output)})
                else:
                    output = self._run(replacement, lambda s=s: self._text_sources([s]),
                                       use_cache=False,
                                       input_ids=torch.tensor([s.ids], device=device))
        return Generation(s, new_ids, "".join(s.tokens[s.n - len(new_ids):]),
                          torch.stack(chosen_from))


def _cache_of(output):
    """The KV cache a forward returned (``cache`` in newer transformers, ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _extended(s, token: int, piece: str):
    """``s`` with one more token, its text ``piece`` appended (earlier spans unchanged)."""
    from attnprog.synth.features import Sentence

    end = len(s.text)
    return Sentence(text=s.text + piece, ids=[*s.ids, token], tokens=[*s.tokens, piece],
                    offsets=[*s.offsets, (end, end + len(piece))])
