"""Do two runs of one model, on different corpora, explain its heads alike? A measurement, not
a test: each run's mean held-out best-fit IoU, the correlation of the heads' IoU between the
runs, how many heads get the same type (heads.json), type by type, and how each run's fitted
programs score on the other run's held-out texts (do they transfer?).

    python bench/corpus_agreement.py runs/demo runs/other

``runs/other`` as measured in bench/RESULTS.md:
``attnprog run --corpus bench/corpora/other_stories.txt --out runs/other``.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from attnprog.engine.fit import fit_scores
from attnprog.engine.heads import head_label
from attnprog.engine.store import AttentionStore


def heads(run: Path) -> dict[str, dict]:
    """The run's heads.json entries by head label ("L18.H3")."""
    if not (run / "heads.json").is_file():
        raise SystemExit(f"no heads.json in {run}: give two directories written by `attnprog run`")
    entries = json.loads((run / "heads.json").read_text())["heads"]
    return {entry["head"]: entry for entry in entries}


def fits(run: Path, store: AttentionStore) -> list[dict]:
    """The run's fitted programs' fits, one per head_index of ``store``."""
    by_head = {}
    for line in (run / "fitted.jsonl").read_text().splitlines():
        provenance = json.loads(line)["provenance"]
        by_head[provenance["head"]] = provenance["fit"]
    return [by_head[head_label(h, store.n_heads)] for h in range(store.n_rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    a, b = heads(args.run_a), heads(args.run_b)
    if set(a) != set(b):
        raise SystemExit("the two runs explain different heads: compare runs of one model")
    labels = sorted(a)
    for run in (args.run_a, args.run_b):
        summary = json.loads((run / "summary.json").read_text())
        print(f"{run}: {summary['store']['texts']} texts, mean held-out best-fit IoU "
              f"{summary['best_fit_iou']['mean']:.3f} (median {summary['best_fit_iou']['median']:.3f}), "
              f"median terms needed {summary['median_terms_needed']:g}")
    iou_a = np.array([a[h]["program"]["heldout_iou"] for h in labels])
    iou_b = np.array([b[h]["program"]["heldout_iou"] for h in labels])
    print(f"per-head held-out IoU of the fitted programs: correlation {np.corrcoef(iou_a, iou_b)[0, 1]:.3f}")
    same = [h for h in labels if a[h]["type"] == b[h]["type"]]
    print(f"same type on both: {len(same)} of {len(labels)} heads")
    for kind, count in Counter(a[h]["type"] for h in labels).most_common():
        both = sum(a[h]["type"] == kind for h in same)
        print(f"  {kind:15} {count:4} in {args.run_a.name}, {both} of them also in {args.run_b.name}")
    moved = Counter((a[h]["type"], b[h]["type"]) for h in labels if a[h]["type"] != b[h]["type"])
    print("changed:", ", ".join(f"{x} -> {y} {n}" for (x, y), n in moved.most_common()))
    stores = {run: AttentionStore.load(run / "attention.safetensors") for run in (args.run_a, args.run_b)}
    for home, away in ((args.run_a, args.run_b), (args.run_b, args.run_a)):
        own = fit_scores(fits(home, stores[home]), stores[home], "heldout").mean()
        moved_in = fit_scores(fits(away, stores[away]), stores[home], "heldout").mean()
        print(f"fitted programs on {home.name}'s held-out texts: its own {own:.3f}, "
              f"{away.name}'s {moved_in:.3f}")


if __name__ == "__main__":
    main()
