"""What a run says about each head (``heads.json``): its type and pattern scores
(:mod:`attnprog.engine.head_types`), its best program by name with that program's terms ranked by
contribution, the held-out IoU of its own fitted program cut to 1, 2, 3, 4, 6, 8 and 12 terms,
and the fewest terms that fit (:mod:`attnprog.engine.terms`).

One entry per explained head::

    {"head": "L18.H3", "head_index": 165, "type": "previous token",
     "type_scores": {"first token": 0.12, "previous token": 0.81, ...},
     "program": {"name": "first token 12 % · previous token", "hash": ..., "family": "fitted",
                 "heldout_iou": 0.81, "fitted_to": "L18.H3",
                 "share": {"value": 0.12, "contribution": 0.03},
                 "terms": [{"term": "previous_1", "label": "previous token", "weight": 4.1,
                            "contribution": 0.31}, ...]},
     "fitted": {...the head's own fitted program, when its best program is another...},
     "iou_by_terms": {"1": 0.74, "2": 0.79, ..., "12": 0.81}, "terms_needed": 2,
     "shortest": {"terms": 2, "name": ..., "hash": ..., "heldout_iou": 0.79, "fit": {...},
                  "source": "...the cut program, when it is not the full one..."}}

A fitted program's terms and contributions are measured against the head it was fitted to
(``fitted_to``), also where it is another head's best program.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from attnprog.engine.head_types import DOMINANT, MIXED, PATTERNS, HeadTypes, head_types, induction_scores
from attnprog.engine.heads import head_label, parse_heads
from attnprog.engine.terms import COUNTS, TOLERANCE, TermReport, term_reports
from attnprog.synth.fitted import program_from_fit, term_label
from attnprog.synth.program import Program
from attnprog.synth.titles import fit_title, program_title

SHOWN = 0.001  # terms that cost less IoU than this when dropped are left out of the name
VERSION = 1


def named_terms(report: TermReport) -> list[str]:
    """The terms a fitted program's name lists: those that matter, by contribution."""
    kept = [name for name in report.ranked if report.contributions[name] >= SHOWN]
    return kept or report.ranked[:1]


def program_entry(program: Program, heldout_iou: float, report: TermReport | None) -> dict:
    """A program as heads.json shows it: name, hash, family, held-out IoU, and for a fitted
    program its sink share and terms with weight and contribution, the largest first."""
    entry = {"name": program_title(program, named_terms(report) if report else None),
             "hash": program.hash, "family": program.family, "heldout_iou": round(float(heldout_iou), 4)}
    if report is None:
        return dict(entry, terms=[])
    weights = report.fit["weights"]
    return dict(entry, fitted_to=program.provenance.get("head", ""),
                share={"value": report.fit["share"], "contribution": round(report.share_contribution, 4)},
                terms=[{"term": name, "label": term_label(name, weights[name]), "weight": weights[name],
                        "contribution": round(report.contributions[name], 4)} for name in report.ranked])


def shortest_entry(program: Program, report: TermReport) -> dict:
    """The head's fitted program with ``terms_needed`` terms (the full one when it needs them all)."""
    k, fit = report.terms_needed, report.shortest
    # a cut keeps its terms in the order they were ranked in the cut it came from
    ranked = report.ranked if k == len(report.fit["weights"]) else list(fit["weights"])
    entry = {"terms": k, "name": fit_title(fit, ranked), "hash": program.hash,
             "heldout_iou": report.iou_by_terms[k], "fit": fit}
    if k == len(report.fit["weights"]):
        return entry  # the fitted program itself
    cut = program_from_fit(fit, head=program.provenance.get("head", ""),
                           model_id=program.provenance.get("model_id", ""),
                           split=program.provenance.get("split", "synthesis"),
                           score=report.cut_synthesis_iou[k])
    return dict(entry, hash=cut.hash, source=cut.source)


def fitted_heads(fitted: Sequence[Program], n_layers: int, n_heads: int) -> dict[int, Program]:
    """{head_index: the program fitted to that head} from the programs' provenance."""
    own = {}
    for program in fitted:
        label = program.provenance.get("head", "")
        if label and isinstance(program.provenance.get("fit"), dict):
            own[parse_heads(label, n_layers, n_heads)[0]] = program
    return own


def head_entry(head_index: int, table, types: HeadTypes, own: dict[int, Program],
               reports: dict[str, TermReport], best: Program, best_iou: float) -> dict:
    """One head's entry (the module's schema)."""
    entry = {"head": head_label(head_index, table.n_heads), "head_index": int(head_index),
             "type": types.types[head_index], "type_scores": types.scores_of(head_index),
             "program": program_entry(best, best_iou, reports.get(best.hash)),
             "iou_by_terms": {}, "terms_needed": None}
    fitted = own.get(head_index)
    report = reports.get(fitted.hash) if fitted is not None else None
    if report is None:
        return entry
    full = report.iou_by_terms[len(report.fit["weights"])]
    if fitted.hash != best.hash:
        entry["fitted"] = program_entry(fitted, full, report)
    entry["iou_by_terms"] = {str(k): v for k, v in sorted(report.iou_by_terms.items())}
    entry["terms_needed"] = report.terms_needed
    entry["shortest"] = shortest_entry(fitted, report)
    return entry


def explain_heads(store, table, heads: Sequence[int], fitted: Sequence[Program], model=None,
                  tokenizer=None, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """heads.json's content for ``heads`` (head indices) of a run: ``store`` holds every text
    (synthesis and held-out), ``table`` the ranking, ``fitted`` the fitted programs; ``model``
    (eager attention) measures induction on repeated random tokens (scored 0 without it)."""
    induction = induction_scores(model, tokenizer, seed=seed) if model is not None else None
    types = head_types(store, store.split_indices("heldout"), induction)
    best_iou, best_index = table.best()
    heldout = table.heldout_iou if table.heldout_iou is not None else best_iou
    best = {h: table.programs[int(best_index[h])] for h in heads}
    own = fitted_heads(fitted, store.n_layers, store.n_heads)
    # the explained heads' own fitted programs, and fitted programs that are some head's best
    wanted = {own[h].hash: h for h in heads if h in own}
    best_hashes = {program.hash for program in best.values()}
    wanted.update({p.hash: h for h, p in own.items() if p.hash in best_hashes})
    reports = {}
    if wanted and "synthesis" in store.splits:
        rows = sorted(set(wanted.values()))
        found = term_reports(store, [own[h].provenance["fit"] for h in rows], rows, device=device,
                             progress=progress)
        reports = {own[h].hash: report for h, report in zip(rows, found)}
    entries = [head_entry(h, table, types, own, reports, best[h], float(heldout[h])) for h in heads]
    return {"version": VERSION, "model_id": store.meta.get("model_id", ""), "patterns": list(PATTERNS),
            "thresholds": {"dominant": DOMINANT, "mixed": MIXED, "terms_within": TOLERANCE},
            "term_counts": list(COUNTS), "heads": entries}


def heads_figures(document: dict) -> dict:
    """The figures summary.json quotes: heads per type, median terms needed."""
    entries = document.get("heads", [])
    needed = [e["terms_needed"] for e in entries if e.get("terms_needed") is not None]
    return {"head_types": dict(Counter(e["type"] for e in entries).most_common()),
            "median_terms_needed": float(np.median(needed)) if needed else None}


def program_names(document: dict | None) -> dict[str, str]:
    """{program hash: name} of every program heads.json names (terms ranked by contribution)."""
    names = {}
    for entry in (document or {}).get("heads", []):
        for key in ("program", "fitted", "shortest"):
            if key in entry:
                names.setdefault(entry[key]["hash"], entry[key]["name"])
    return names
