"""`attnprog show`: a head's programs by name, with its type when heads.json is beside the table."""

import json

import torch

from attnprog.engine.rank import IoUTable
from attnprog.engine.run.show import show_head
from attnprog.synth.generator.golden import golden_programs


def two_program_table(directory):
    programs = golden_programs()[:2]
    iou = torch.tensor([[0.2, 0.9, 0.1, 0.3], [0.8, 0.1, 0.2, 0.4]])  # [P, L*H] with 2 x 2 heads
    IoUTable(iou=iou, programs=programs, split="selection", n_layers=2, n_heads=2).save(
        directory / "iou_table.safetensors")
    return programs


def test_programs_are_shown_by_name_beside_their_hash(tmp_path):
    programs = two_program_table(tmp_path)
    text = show_head(tmp_path / "iou_table.safetensors", "0.1", top=1)
    assert (f"# 1. L0.H1: IoU 0.900 on selection: First-token head (family first, "
            f"hash {programs[0].hash})") in text
    assert programs[0].source.strip() in text and "head (share of attention" not in text


def test_a_run_directory_stands_for_its_table(tmp_path):
    two_program_table(tmp_path)
    assert show_head(tmp_path, "0.1", top=2) == show_head(tmp_path / "iou_table.safetensors", "0.1", top=2)


def test_the_heads_type_scores_and_shortest_program_come_first_when_heads_json_is_beside(tmp_path):
    programs = two_program_table(tmp_path)
    entry = {"head": "L0.H1", "head_index": 1, "type": "first token",
             "type_scores": {"first token": 0.97, "self": 0.01},
             "program": {"name": "sink", "hash": programs[0].hash},
             "iou_by_terms": {"1": 0.8, "2": 0.85}, "terms_needed": 2,
             "shortest": {"terms": 1, "name": "first token 90 %", "hash": "abc", "heldout_iou": 0.8,
                          "source": "def program(s):\n    return SHORTEST\n"}}
    (tmp_path / "heads.json").write_text(json.dumps({"heads": [entry]}))
    text = show_head(tmp_path / "iou_table.safetensors", "L0.H1", top=1)
    lines = text.splitlines()
    assert lines[0] == "# L0.H1: first token head (share of attention: first token 0.97, self 0.01)"
    assert "held-out IoU by number of terms: 1: 0.800 · 2: 0.850; 2 within 0.01" in lines[1]
    assert text.index("return SHORTEST") < text.index(programs[0].source.strip())
    assert f"on selection: sink (family first, hash {programs[0].hash})" in text  # heads.json's name


def test_a_shortest_program_of_one_term_is_said_in_the_singular(tmp_path):
    two_program_table(tmp_path)
    entry = {"head": "L0.H1", "head_index": 1, "type": "first token", "type_scores": {},
             "shortest": {"terms": 1, "name": "first token 90 %", "hash": "abc", "heldout_iou": 0.8,
                          "source": "def program(s):\n    return SHORTEST\n"}}
    (tmp_path / "heads.json").write_text(json.dumps({"heads": [entry]}))
    assert "# the shortest program that fits: 1 term, first token 90 %" in show_head(tmp_path, "L0.H1")
