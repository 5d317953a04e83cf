"""``attnprog show``: a head's best programs as readable source, each by name, with the head's
type, its pattern scores and the shortest program that fits when the run directory beside the
table holds ``heads.json``."""

from __future__ import annotations

from pathlib import Path

from attnprog.engine.heads import head_label, parse_heads
from attnprog.engine.run import rundir
from attnprog.errors import AttnProgError


def head_summary_lines(entry: dict) -> list[str]:
    """What heads.json says about one head, as comment lines."""
    scores = sorted(entry.get("type_scores", {}).items(), key=lambda item: -item[1])
    lines = [f"# {entry['head']}: {entry['type']} head (share of attention: "
             + ", ".join(f"{name} {score:.2f}" for name, score in scores) + ")"]
    if entry.get("iou_by_terms"):
        lines.append("# its fitted program, held-out IoU by number of terms: "
                     + " · ".join(f"{k}: {iou:.3f}" for k, iou in entry["iou_by_terms"].items())
                     + f"; {entry['terms_needed']} within 0.01 of the best")
    return lines


def shortest_lines(entry: dict) -> list[str]:
    """The shortest program that fits, when it is shorter than the full fitted program."""
    shortest = entry.get("shortest") or {}
    if not shortest.get("source"):
        return []
    terms = f"{shortest['terms']} term{'' if shortest['terms'] == 1 else 's'}"
    return [f"# the shortest program that fits: {terms}, {shortest['name']}, "
            f"IoU {shortest['heldout_iou']:.3f} held-out (hash {shortest['hash']})",
            shortest["source"].rstrip() + "\n"]


def show_head(table_path: str | Path, head: str, top: int = 3) -> str:
    """The text ``attnprog show`` prints for ``head`` (LAYER.HEAD or L18.H3) of an IoU table, or
    of a run directory's table."""
    from attnprog.engine.head_entries import program_names
    from attnprog.engine.rank import IoUTable
    from attnprog.synth.titles import program_title

    if Path(table_path).is_dir():  # a run directory: its table
        table_path = Path(table_path) / rundir.TABLE
    table = IoUTable.load(table_path)
    chosen = parse_heads(head, table.n_layers, table.n_heads)
    if len(chosen) != 1:
        raise AttnProgError(f"show takes one head (e.g. 18.3), not {head!r}")
    head_index, label = chosen[0], head_label(chosen[0], table.n_heads)
    explained = rundir.read_heads(Path(table_path).parent)
    names = program_names(explained)
    entry = next((e for e in (explained or {}).get("heads", []) if e["head_index"] == head_index), None)
    lines = head_summary_lines(entry) + shortest_lines(entry) if entry else []
    values, indices = table.topk(top)
    for number, (iou, index) in enumerate(zip(values[head_index].tolist(),
                                               indices[head_index].tolist()), 1):
        program = table.programs[index]
        lines.append(f"# {number}. {label}: IoU {iou:.3f} on {table.split}: "
                     f"{names.get(program.hash) or program_title(program)} "
                     f"(family {program.family}, hash {program.hash})")
        if program.provenance.get("generator") == "llm":
            lines.append("# provenance: " + ", ".join(
                f"{key} {program.provenance.get(key)}" for key in
                ("model", "request_id", "round", "parent", "head") if key in program.provenance))
        lines.append(program.source.rstrip() + "\n")
    return "\n".join(lines)
