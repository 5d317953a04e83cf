"""LLM synthesis on an attention store: heads and texts in, programs added to a pool out.

The engine side of ``attnprog.synth.llm``: it picks the heads, cuts each head's attention on
the synthesis and selection texts out of the store, runs the synthesiser, and saves the
pool after every head, so an interrupted or failed run keeps what it already paid for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnprog.engine.heads import head_label_of, parse_heads
from attnprog.engine.store import AttentionStore
from attnprog.errors import StoreError
from attnprog.kernels.iou import pair_iou
from attnprog.synth.llm.client import ChatClient, LLMSettings
from attnprog.synth.llm.synthesiser import HeadResult, HeadTask, Synthesiser, SynthesisOptions
from attnprog.synth.program import Program, load_pool, save_pool


def head_pairs(spec: str, store: AttentionStore) -> list[tuple[int, int]]:
    """The heads ``spec`` names (``18.3``, ``18.*``, ``*.3``, ``all``) as (layer, head) pairs of
    ``store``, in head_index order: ``engine.heads.parse_heads`` on the store's shape."""
    return [store.head_of(head_index)
            for head_index in parse_heads(spec, store.n_layers, store.n_heads)]


def head_tasks(store: AttentionStore, heads, n_texts: int = 4, n_selection: int = 16) -> list[HeadTask]:
    """One task per head: its attention on the first ``n_texts`` synthesis texts (what the LLM
    sees) and the first ``n_selection`` selection texts (what judges a refinement)."""
    synthesis = _texts(store, "synthesis", n_texts)
    selection = _texts(store, "selection", n_selection) if "selection" in store.splits else synthesis
    sentences = {s: sentence for s, sentence in zip(synthesis + selection,
                                                    store.sentences(synthesis + selection))}
    tasks = []
    for layer, head in heads:
        head_index = store.row(layer, head)

        def examples(indices, head_index=head_index):
            return [(sentences[s], store.dense(head_index, s).float().cpu().numpy().astype(np.float64))
                    for s in indices]

        tasks.append(HeadTask(head_label_of(layer, head), examples(synthesis), examples(selection)))
    return tasks


def _texts(store: AttentionStore, split: str, limit: int) -> list[int]:
    if split not in store.splits:
        raise StoreError(f"the store has no {split} texts; LLM synthesis needs them (use more texts)")
    return store.split_indices(split)[: max(1, limit)]


@dataclass
class SynthesisReport:
    """What a synthesis run did: per head, programs and every attempt; the token usage.
    ``earlier``: the reports of earlier calls into the same pool, oldest first."""

    model: str
    base_url: str
    heads: list[dict] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    programs_added: int = 0
    earlier: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def report_path(pool_path: Path) -> Path:
    """Where the report of a pool's synthesis runs goes: ``pool.jsonl`` -> ``pool.llm.json``."""
    return pool_path.with_name(pool_path.stem + ".llm.json")


def earlier_reports(path: Path) -> list[dict]:
    """The calls a report file records, oldest first ([] when there is none or it is not one)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict) or "heads" not in saved:
        return []
    earlier = saved.pop("earlier", [])
    return [*(earlier if isinstance(earlier, list) else []), saved]


def synthesize_into_pool(store: AttentionStore, heads, settings: LLMSettings, options: SynthesisOptions,
                         pool_path: Path, n_texts: int = 4, progress: bool = True,
                         client: ChatClient | None = None) -> tuple[list[Program], SynthesisReport]:
    """Synthesise programs for ``heads`` and add them to the pool at ``pool_path`` (created when
    missing), saving pool and report after every head. Returns (the new programs, the report)."""
    pool_path = Path(pool_path)
    existing = load_pool(pool_path) if pool_path.is_file() and pool_path.stat().st_size else []
    client = client or ChatClient(settings)
    synthesiser = Synthesiser(client, options, score=pair_iou)
    report = SynthesisReport(model=client.model, base_url=client.settings.base_url,
                             earlier=earlier_reports(report_path(pool_path)))
    known = {p.hash for p in existing}
    added: list[Program] = []

    def keep(result: HeadResult) -> None:
        for program in result.programs:
            if program.hash not in known:
                known.add(program.hash)
                added.append(program)
        report.heads.append(result.to_dict())
        report.usage = client.usage.to_dict()
        report.programs_added = len(added)
        tmp = pool_path.with_name(pool_path.name + ".partial")
        save_pool(existing + added, tmp)
        tmp.replace(pool_path)  # the earlier pool survives a crash mid-write
        report.save(report_path(pool_path))

    try:
        synthesiser.synthesise(head_tasks(store, heads, n_texts), on_result=keep, progress=progress)
    finally:
        report.usage = client.usage.to_dict()
        report.save(report_path(pool_path))  # earlier calls' reports kept under "earlier"
    return added, report


def llm_programs(store: AttentionStore, config, pool_path: Path, echo) -> list[Program]:
    """Programs for ``config.llm_heads`` (the ``llm_*`` settings of a RunConfig), written to a
    fresh ``pool_path``; replies come from the cache on a re-run."""
    settings = LLMSettings(model=config.llm_model, base_url=config.llm_base_url,
                           max_tokens_total=config.llm_max_tokens_total)
    options = SynthesisOptions(n=config.llm_n, rounds=config.llm_rounds)
    pool_path.unlink(missing_ok=True)
    pool_path.touch()
    added, report = synthesize_into_pool(store, head_pairs(config.llm_heads, store), settings, options,
                                         pool_path)
    usage = report.usage
    echo(f"  LLM {report.model}: {len(added)} valid programs for {len(report.heads)} heads; "
         f"{usage['requests']} requests, {usage['cache_hits']} from cache, "
         f"{usage['total_tokens']} tokens (report: {report_path(pool_path)})")
    return added
