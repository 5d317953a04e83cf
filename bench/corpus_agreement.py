"""Do two runs of one model, on different corpora, explain its heads alike? A measurement, not
a test: each run's mean held-out best-fit IoU, the correlation of the heads' IoU between the
runs, how many heads get the same type (heads.json), type by type, and how each run's fitted
programs score on the other run's held-out texts (do they transfer?), and each run's fitted
programs on the first ``--prefix`` tokens of its held-out texts: soft IoU falls as rows grow
longer, so corpora of different text lengths compare fairly only at a common length.

    python bench/corpus_agreement.py runs/demo runs/other

``runs/other`` as measured in bench/RESULTS.md:
``attnprog run --corpus bench/corpora/other_stories.txt --out runs/other``.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.fit import fit_scores
from attnprog.engine.heads import head_label
from attnprog.engine.store import AttentionStore
from attnprog.kernels.iou import segment_iou
from attnprog.layout import prefix_cells
from attnprog.synth.fitted import evaluate_fits


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


def prefix_iou(run: Path, store: AttentionStore, tokens: int) -> float:
    """Mean IoU of the run's fitted programs on the first ``tokens`` tokens of each held-out text.
    The rows of a causal program and of the model's attention do not depend on later tokens
    (the run's leak check), so these rows are those of the texts cut there."""
    sub = store.subset(store.split_indices("heldout"))
    values = torch.from_numpy(evaluate_fits(fits(run, store), sub.sentences()))  # [heads, cells]
    cells, cut_offsets = prefix_cells(sub.lengths.numpy(), tokens)
    cells = torch.from_numpy(cells)
    per_text = segment_iou(values[:, cells].T.float(), sub.attn_packed[:, cells].T.float(),
                           cut_offsets)  # [texts, heads]
    return float(per_text.double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--prefix", type=int, default=64,
                        help="tokens of each held-out text for the length-matched IoU (default 64)")
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
    for run in (args.run_a, args.run_b):
        lengths = stores[run].lengths[stores[run].split_indices("heldout")].float()
        print(f"{run.name}: held-out texts of {lengths.mean():.0f} tokens on average "
              f"({lengths.min():.0f} to {lengths.max():.0f}); its fitted programs on their first "
              f"{args.prefix} tokens: {prefix_iou(run, stores[run], args.prefix):.3f}")


if __name__ == "__main__":
    main()
