"""Each head at a glance, as the report shows it under the attention viewer: its type scores, its
best program by name with the terms and how much each contributes, its fitted program's
held-out IoU against the number of terms, the source (collapsed) and the other heads that share
its library program. What heads.json does not hold (an older run) is left out.
"""

from __future__ import annotations

import html

from attnprog.engine.heads import head_label

e = html.escape


def head_infos(table, library: dict | None, explained: dict | None) -> list[dict]:
    """One dict per explained head for the page: its best program (named, from heads.json when
    there is one), IoU, place in the library and the heads sharing it, and what heads.json says."""
    from attnprog.synth.titles import program_title

    entries = {entry["head_index"]: entry for entry in (explained or {}).get("heads", [])}
    head_indices = (table.meta.get("heads") or (library or {}).get("heads")
                    or list(range(table.iou.shape[1])))
    best_iou, best_index = table.best()
    heldout = table.heldout_iou if table.heldout_iou is not None else best_iou
    library_of, sharing = {}, {}
    if library:
        for k, head_index in enumerate(library["heads"]):
            library_of[head_index] = (library["assignment"][k], library["heldout_iou"][k])
            sharing.setdefault(library["assignment"][k], []).append(head_label(head_index, table.n_heads))
    heads = []
    for head_index in head_indices:
        program = table.programs[int(best_index[head_index])]
        position, library_iou = library_of.get(head_index, (None, None))
        entry = entries.get(head_index, {})
        label = head_label(head_index, table.n_heads)
        heads.append({"head_index": head_index, "program": program, "name": program.name,
                      "title": entry.get("program", {}).get("name") or program_title(program),
                      "family": program.family, "hash": program.hash, "source": program.source,
                      "heldout_iou": float(heldout[head_index]),
                      "selection_iou": float(best_iou[head_index]),
                      "library_position": position, "library_iou": library_iou,
                      "sharing": [h for h in sharing.get(position, []) if h != label],
                      "terms": entry.get("program", {}).get("terms", []),
                      "share": entry.get("program", {}).get("share"),
                      **{key: entry[key] for key in ("type", "type_scores", "iou_by_terms",
                                                     "terms_needed", "shortest") if key in entry}})
    return heads


def bars_html(caption: str, rows: list[tuple[str, float, str]], top: float | None = None) -> str:
    """A small table of horizontal bars: (label, value, value as text) per row, the longest bar
    ``top`` (default: the largest value)."""
    if not rows:
        return ""
    top = top or max((value for _, value, _ in rows), default=0.0) or 1.0
    body = "".join(
        f"<tr><td>{e(label)}</td><td class='bar'><span style='width:{100 * max(value, 0) / top:.1f}%'>"
        f"</span></td><td class='num'>{e(text)}</td></tr>" for label, value, text in rows)
    return f"<table class='bars'><caption>{e(caption)}</caption>{body}</table>"


def glance_html(info: dict) -> str:
    """The head's type scores, its program's terms by contribution, and IoU by number of terms."""
    parts = []
    if info.get("type_scores"):
        parts.append(bars_html("pattern scores (share of attention)",
                               [(name, score, f"{score:.2f}") for name, score in info["type_scores"].items()],
                               top=1.0))
    terms = [(t["label"], t["contribution"], f"{t['contribution']:.3f}") for t in info.get("terms") or []]
    if info.get("share"):
        share = info["share"]
        terms.insert(0, (f"first token {100 * share['value']:.0f} %", share["contribution"],
                         f"{share['contribution']:.3f}"))
    if terms:
        parts.append(bars_html(f"{info.get('title') or info['name']}: IoU each term adds", terms))
    if info.get("iou_by_terms"):
        parts.append(bars_html(f"its fitted program by number of terms (held-out IoU; "
                               f"{info['terms_needed']} within 0.01 of the best)",
                               [(f"{k} term{'' if k == '1' else 's'}", iou, f"{iou:.3f}")
                                for k, iou in info["iou_by_terms"].items()], top=1.0))
    return f"<div class='glance'>{''.join(parts)}</div>" if parts else ""


def source_html(info: dict) -> str:
    """The sources, collapsed: the shortest program that fits first when it is within 0.01 of the
    best's held-out IoU, else the best first and the shortest fit after it."""
    best = (f"<details><summary>source of the best program, {e(info.get('title') or info['name'])}"
            f"</summary><pre>{e(info['source'].strip())}</pre></details>")
    shortest = info.get("shortest") or {}
    if not shortest.get("source"):
        return best
    terms = f"{shortest['terms']} term{'' if shortest['terms'] == 1 else 's'}"
    cut = (f"<details><summary>source of the shortest program that fits: its own fitted program cut "
           f"to {terms}, <b>{e(shortest['name'])}</b>, IoU {shortest['heldout_iou']:.3f} held-out"
           f"</summary><pre>{e(shortest['source'].strip())}</pre></details>")
    return cut + best if shortest["heldout_iou"] >= info["heldout_iou"] - 0.01 else best + cut


def sharing_html(info: dict) -> str:
    """The other heads explained by the same library program, as links to them."""
    if info.get("library_position") is None:
        return ""
    others = ", ".join(f"<a href='#{h}'>{h}</a>" for h in info.get("sharing", [])) or "no other head"
    return (f"<p class='sharing'>library program #{info['library_position'] + 1} also explains: "
            f"{others}</p>")


def head_section_html(info: dict, n_heads: int) -> str:
    """One head's section: title line, figures, glance, sources, heads sharing its program."""
    label = head_label(info["head_index"], n_heads)
    kind = f"{info['type']} head · " if info.get("type") else ""
    library = (f"; in the library it uses #{info['library_position'] + 1} (IoU {info['library_iou']:.3f})"
               if info.get("library_position") is not None else "")
    return (f"<section class='head' id='{label}' data-head='{label}'>"
            f"<h3>{label}: {e(kind)}{e(info.get('title') or info['name'])}</h3>"
            f"<p class='sub'>best fit: {e(info['family'])} program {e(info['hash'])}, IoU "
            f"{info['heldout_iou']:.3f} held-out ({info['selection_iou']:.3f} selection){library}"
            f" &middot; <a href='#grid'>back to the grid</a></p>"
            + glance_html(info) + source_html(info) + sharing_html(info) + "</section>")
