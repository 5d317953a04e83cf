"""LLM synthesis of programs for attention heads: ask, parse, validate, repair, refine.

Per head: one request asks for N hypotheses about the head's attention summary; each code
block is validated with the program contract, and a failing one is sent back with its
reason, up to ``attempts`` tries per hypothesis. Then ``rounds`` refinement rounds: the
best program so far (on the selection texts) is shown with its best and worst synthesis
texts and asked for a minimal change; the child is kept only if it scores better on the
selection texts. Heads run concurrently (bounded by the client), every request goes
through the client's cache, and every attempt is recorded, failed or not, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

from attnprog.errors import LLMError
from attnprog.synth.llm.client import BudgetExhausted, ChatClient, Reply, RequestRejected
from attnprog.synth.llm.parsing import ParsedProgram, parse_reply
from attnprog.synth.llm.prompts import refinement_messages, repair_messages, synthesis_messages
from attnprog.synth.llm.refinement import Example, Score, mean_iou, refinement_evidence
from attnprog.synth.llm.summaries import summarise_head
from attnprog.synth.program import Program
from attnprog.synth.runtime.validate import validate

FAMILY = "llm"


@dataclass
class HeadTask:
    """One head to explain: its label, the texts the LLM sees and the texts that judge refinements."""

    label: str  # e.g. "L18.H7", written by the caller (engine.heads.head_label)
    synthesis: list[Example]
    selection: list[Example]


@dataclass
class Candidate:
    """One attempt at one hypothesis: the code received and whether it passed, and if not why."""

    head: str
    round: int
    hypothesis: int
    attempt: int
    source: str
    ok: bool
    reason: str
    request_id: str
    cached: bool
    program_hash: str = ""


@dataclass
class HeadResult:
    """What synthesis produced for one head: valid programs, every attempt, and why it stopped early."""

    label: str
    programs: list[Program] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    error: str = ""  # set when the head stopped early (a rejected request, the token cap)

    def to_dict(self) -> dict:
        return {"label": self.label, "programs": [p.hash for p in self.programs],
                "candidates": [asdict(c) for c in self.candidates], "error": self.error}


@dataclass
class SynthesisOptions:
    """How many hypotheses, attempts and refinement rounds; how the summary is made."""

    n: int = 4
    rounds: int = 1
    attempts: int = 3  # tries per hypothesis: the first plus re-prompts with the failure reason
    summary_format: str = "stratified"
    summary_tokens: int = 1500


def head_prompt(task: HeadTask, options: SynthesisOptions) -> list[dict]:
    """The first request for ``task``: the head's summary and the ask for N hypotheses."""
    summary = summarise_head(task.synthesis, options.summary_format, options.summary_tokens)
    return synthesis_messages(summary, options.n, task.label)


class Synthesiser:
    """Writes programs for heads through a :class:`ChatClient`; ``score`` is the IoU of one
    text, (program, head) n x n matrices -> float, that judges refinements (the engine passes
    ``attnprog.kernels.iou.pair_iou``)."""

    def __init__(self, client: ChatClient, options: SynthesisOptions | None = None, *,
                 score: Score):
        self.client = client
        self.options = options or SynthesisOptions()
        self.score = score

    # --- one head --------------------------------------------------------------------------
    def synthesise_head(self, task: HeadTask) -> HeadResult:
        """Hypotheses, repairs and refinements for one head. Endpoint failures that no retry
        fixes raise LLMError; a rejected request or the token cap end this head early."""
        result = HeadResult(task.label)
        try:
            messages = head_prompt(task, self.options)
            reply = self._ask(messages, task.label)
            parsed = parse_reply(reply.text, reply.truncated, self.client.settings.max_tokens)
            for k, first in enumerate(parsed[: self.options.n]):
                program = self._settle(result, messages, reply, first, round_no=0, hypothesis=k)
                if program is not None and all(p.hash != program.hash for p in result.programs):
                    result.programs.append(program)
            for round_no in range(1, self.options.rounds + 1):
                if not result.programs:
                    break
                self._refine(result, task, round_no)
        except (BudgetExhausted, RequestRejected) as err:
            result.error = str(err)
        return result

    def _ask(self, messages: list[dict], tag: str) -> Reply:
        return self.client.complete(messages, tag=tag)

    def _settle(self, result: HeadResult, messages: list[dict], reply: Reply, parsed: ParsedProgram,
                round_no: int, hypothesis: int, parent: str = "") -> Program | None:
        """Validate a hypothesis; re-prompt with the reason until it passes or attempts run out."""
        history = messages
        for attempt in range(1, self.options.attempts + 1):
            program = self._program(parsed, reply, result.label, round_no, hypothesis, attempt, parent)
            reason = parsed.problem or validate(program).reason
            result.candidates.append(Candidate(
                result.label, round_no, hypothesis, attempt, parsed.source, not reason, reason,
                reply.request_id, reply.cached, program.hash if not reason else ""))
            if not reason:
                return program
            if attempt == self.options.attempts:
                return None
            history = repair_messages(history, reply.text, parsed.source, reason)
            reply = self._ask(history, result.label)
            parsed = parse_reply(reply.text, reply.truncated, self.client.settings.max_tokens)[0]
        return None

    def _program(self, parsed: ParsedProgram, reply: Reply, head: str, round_no: int,
                 hypothesis: int, attempt: int, parent: str) -> Program:
        provenance = {"generator": "llm", "model": self.client.model, "request_id": reply.request_id,
                      "round": round_no, "parent": parent or None, "head": head,
                      "hypothesis": hypothesis, "attempt": attempt}
        return Program(source=parsed.source, name=parsed.name, family=FAMILY, provenance=provenance)

    def _refine(self, result: HeadResult, task: HeadTask, round_no: int) -> None:
        """One refinement round: a minimal change to the best program, kept only if it scores better."""
        scored = [(mean_iou(p, task.selection, self.score), p) for p in result.programs]
        score, parent = max(scored, key=lambda pair: pair[0])
        best, worst = refinement_evidence(parent, task.synthesis, self.score)
        messages = refinement_messages(parent.source, task.label, score, best, worst)
        reply = self._ask(messages, task.label)
        parsed = parse_reply(reply.text, reply.truncated, self.client.settings.max_tokens)[0]
        child = self._settle(result, messages, reply, parsed, round_no, hypothesis=0, parent=parent.hash)
        if child is None or any(p.hash == child.hash for p in result.programs):
            return
        child_score = mean_iou(child, task.selection, self.score)
        if child_score > score:
            result.programs.append(child)
        else:
            last = result.candidates[-1]
            last.ok, last.program_hash = False, ""
            last.reason = (f"valid, but not kept: selection IoU {child_score:.3f} is not better "
                           f"than its parent's {score:.3f}")

    # --- many heads ------------------------------------------------------------------------
    def synthesise(self, tasks: Sequence[HeadTask],
                   on_result: Callable[[HeadResult], None] | None = None,
                   progress: bool = True) -> list[HeadResult]:
        """Every head, ``concurrency`` at a time; ``on_result`` sees each head as it finishes
        (so callers can save as they go). Results come back in task order. An endpoint
        failure stops the run with LLMError once the heads in flight have finished."""
        results: dict[str, HeadResult] = {}
        workers = max(1, min(self.client.settings.concurrency, len(tasks)))
        bar = _progress(len(tasks), progress)
        fatal: LLMError | None = None
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self.synthesise_head, task): task for task in tasks}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except LLMError as err:
                    fatal = fatal or err
                    for other in futures:
                        other.cancel()
                    continue
                results[result.label] = result
                if on_result is not None:
                    on_result(result)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if fatal is not None:
            raise fatal
        return [results[t.label] for t in tasks if t.label in results]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="LLM synthesis", unit="head", disable=None)
