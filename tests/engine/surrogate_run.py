"""A hand-made run directory for surrogate tests: tiny GPT-2, a store of eight short texts, an
IoU table whose best fits take every program path (fitted, generator, golden, sandbox) and one
program that reads a later token, head costs, and the run's leak check."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.corpus import make_corpus
from attnprog.engine.extract import extract_attention
from attnprog.engine.head_costs import HeadCosts
from attnprog.engine.leak import LeakCheck
from attnprog.engine.pool import build_pool
from attnprog.engine.rank import IoUTable
from attnprog.engine.run import rundir
from attnprog.engine.run.config import RunConfig
from attnprog.synth.fitted import program_from_fit
from attnprog.synth.generator.golden import golden_programs
from attnprog.synth.program import Program

TEXTS = [
    "The cat sat on the mat, and the dog slept by the door.",
    "She said that Paris is big. Then she left.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The old man the boats while the young sailors rest.",
    "A bird sang in the tree; the children listened quietly.",
    "He opened the box, and inside it he found a small key.",
    "Rain fell all night, so the river rose over the road.",
    "They walked home slowly, talking about the long day.",
]
SPLITS = ["selection"] * 4 + ["heldout"] * 4
PREVIOUS = Program(name="program", source="import numpy as np\n\ndef program(s):\n"
                                          "    return np.eye(s.n, k=-1)\n")
PEEKS_AHEAD = Program(name="program", source="""import numpy as np

def program(s):
    m = np.eye(s.n)
    m[:, 0] += s.n  # the text's full length: a later token changes every row
    return m
""")
FIT = {"share": 0.2, "weights": {"syntactic_head": 1.5, "pos_noun": 1.0, "previous_1": 1.0}}
COSTS = [0.5, 0.1, 0.4, 0.3, 0.9, 0.2, 0.8, 0.6]  # cheapest first: heads 1, 5, 3, 2, ...


def programs() -> list[Program]:
    """fitted, generator, golden (native), sandbox (custom), then the leaky one."""
    golden = next(p for p in golden_programs() if p.provenance["form"] == "native")
    return [program_from_fit(FIT), build_pool(3, golden=False)[0], golden, PREVIOUS, PEEKS_AHEAD]


def make_run(out: Path, model, tokenizer, leak: bool = True) -> Path:
    """Write the run directory; head h's best causal fit is program h % 4, and the leaky
    program beats it on heads 1 and 5."""
    out.mkdir(parents=True, exist_ok=True)
    store = extract_attention(model, tokenizer, make_corpus(TEXTS), max_tokens=32, progress=False)
    store.splits = list(SPLITS)
    store.save(out / rundir.STORE)
    pool = programs()
    iou = torch.full((len(pool), 8), 0.2)
    for h in range(8):
        iou[h % 4, h] = 0.9 - 0.01 * h
    iou[4, [1, 5]] = 0.95
    IoUTable(iou=iou, programs=pool, split="selection", n_layers=2, n_heads=4).save(out / rundir.TABLE)
    HeadCosts(np.asarray(COSTS), "exact", "selection", [0, 1, 2, 3], 40, 5.0).save(out / rundir.COSTS)
    if leak:
        LeakCheck({p.hash: (2.0 if p is PEEKS_AHEAD else 0.0) for p in pool}, [4, 5, 6]).save(
            out / rundir.LEAK, n_heads=4)
    config = RunConfig(out=str(out), model="tiny-gpt2", max_tokens=32)
    (out / rundir.CONFIG).write_text(json.dumps(dataclasses.asdict(config)))
    return out
