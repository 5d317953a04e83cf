"""`attnprog rank` end to end: SmolLM2-135M, the built-in corpus, the golden library."""

import subprocess
import sys

import pytest

from attnprog.engine.rank import IoUTable


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", *args],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_rank_names_first_token_and_previous_token_heads(tmp_path):
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.program import save_pool

    store, pool, table = (tmp_path / name for name in ("s.safetensors", "golden.jsonl", "t.safetensors"))
    extracted = run_cli("extract", "--max-tokens", "48", "--out", str(store))
    assert extracted.returncode == 0, extracted.stderr
    save_pool(golden_programs(), pool)

    ranked = run_cli("rank", "--store", str(store), "--pool", str(pool), "--out", str(table))
    assert ranked.returncode == 0, ranked.stderr
    best_by_family = {}
    for fit in IoUTable.load(table).best_fits():
        if fit.reported_iou > best_by_family.get(fit.family, (0.0,))[0]:
            best_by_family[fit.family] = (fit.reported_iou, f"L{fit.layer}.H{fit.head}")
    assert best_by_family["first"][0] > 0.8
    assert best_by_family["previous"][0] > 0.3
    for family in ("first", "previous"):  # printed with its held-out IoU
        assert f"{best_by_family[family][1]} " in ranked.stdout
