"""The run's report: one self-contained HTML file (no network; images are data URIs).

First the headline figures beside the paper's, then a layer x head grid coloured by held-out
IoU (each cell links to its head), the IoU-vs-library-size and perplexity-vs-fraction curves
(matplotlib, Agg), the library, and one section per head: its best program's source and
heatmaps of real attention beside the program's output on two held-out texts.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from attnprog.engine.heads import head_label, head_label_of
from attnprog.engine.run import rundir
from attnprog.engine.run.rundir import PAPER
from attnprog.errors import StoreError

HEATMAP_TOKENS = 24  # tokens shown per heatmap axis: the matrix's top-left block, exact rows
HEATMAP_TEXTS = 2
CELL_PX = 11  # pixels per matrix entry; token labels are 11 px apart to match
TYPE_SHORT = {"first token": "first", "previous token": "previous", "duplicate token": "duplicate",
              "punctuation": "punct", "recent window": "window"}  # grid cells are 10 letters wide


# --- reading the run directory ------------------------------------------------------------------


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def sweep_curves(sweep: dict | None) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``sweep.json`` as {order: {condition: [(fraction, % increase), ...]}}; reads both
    {fraction: {condition: x}} (one order, named "IoU") and {order: {fraction: {condition: x}}}."""
    if not sweep:
        return {}

    def is_fraction(key) -> bool:
        try:
            float(key)
            return True
        except (TypeError, ValueError):
            return False

    orders = {"IoU": sweep} if all(is_fraction(k) for k in sweep) else sweep
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for order, by_fraction in orders.items():
        if not isinstance(by_fraction, dict):
            continue
        for fraction, by_condition in by_fraction.items():
            if not (is_fraction(fraction) and isinstance(by_condition, dict)):
                continue
            for condition, value in by_condition.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    curves.setdefault(str(order), {}).setdefault(condition, []).append(
                        (float(fraction), float(value)))
    for conditions in curves.values():
        for points in conditions.values():
            points.sort()
    return curves


# --- figures -------------------------------------------------------------------------------------


def _png(fig) -> str:
    """A matplotlib figure as a PNG data URI."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; the report must build on a headless machine
    import matplotlib.pyplot as plt

    return plt


def library_curve_figure(library: dict, best_fit_mean: float | None) -> str:
    """Mean IoU over heads against library size, with the best-fit ceiling and the baselines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90, layout="constrained")
    sizes = np.arange(1, len(library["curve_heldout"]) + 1)
    ax.plot(sizes, library["curve_selection"], label="library, selection texts", color="#888")
    ax.plot(sizes, library["curve_heldout"], label="library, held-out texts", color="#1f77b4", lw=2)
    if best_fit_mean is not None:
        ax.axhline(best_fit_mean, color="#2ca02c", ls="--", label="best fit per head (held-out)")
    for (name, value), colour in zip(library.get("baselines", {}).items(), ("#d62728", "#9467bd", "#8c564b")):
        ax.axhline(value, color=colour, ls=":", label=f"{name} baseline")
    ax.set_xscale("log" if len(sizes) > 20 else "linear")
    ax.set_xlabel("programs in the library")
    ax.set_ylabel("mean IoU over heads")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def perplexity_figure(curves: dict) -> str:
    """% perplexity increase against the share of heads replaced, for every order and condition."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90, layout="constrained")
    styles = ["-", "--", "-.", ":"]
    colours = {"programs": "#1f77b4", "uniform": "#d62728", "random": "#9467bd"}
    for k, (order, conditions) in enumerate(curves.items()):
        for condition, points in conditions.items():
            x, y = zip(*points)
            label = condition if len(curves) == 1 else f"{condition} ({order} order)"
            ax.plot(100 * np.asarray(x), y, styles[k % len(styles)], marker="o", ms=3,
                    color=colours.get(condition), label=label)
    ax.axhline(0, color="black", lw=0.5)
    ax.plot([25], [PAPER["ppl_increase_at_25_percent"]], "k*", ms=9, label="paper, programs at 25 %")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("heads replaced (%)")
    ax.set_ylabel("perplexity increase (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _token_label(piece: str) -> str:
    piece = piece.replace("\n", "\u23ce").replace("\t", "\u21e5")
    piece = piece.replace("\u0120", "\u00b7").replace("\u2581", "\u00b7").replace(" ", "\u00b7")
    return (piece[:9] + "\u2026") if len(piece) > 10 else piece


def heatmap_png(matrix: np.ndarray, cell: int = CELL_PX) -> str:
    """One attention matrix as a PNG data URI: ``cell`` pixels per entry, matplotlib's "Blues"
    scaled to the largest entry below the first row (row 0 always holds a single 1). Drawn
    directly, not as a matplotlib figure: 4 heatmaps x 270 heads would take minutes to lay
    out on 2 CPU cores, and the axes are HTML text."""
    import matplotlib
    from PIL import Image

    top = max(float(matrix[1:].max() if len(matrix) > 1 else matrix.max()), 1e-9)
    rgba = matplotlib.colormaps["Blues"](np.clip(matrix / top, 0.0, 1.0), bytes=True)
    image = Image.fromarray(rgba[..., :3], "RGB").quantize(colors=32)
    image = image.resize((matrix.shape[1] * cell, matrix.shape[0] * cell), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def head_heatmaps(panels: list[tuple[np.ndarray, np.ndarray, list[str]]], head: str) -> str:
    """HTML: per text, real attention beside the program's output, tokens on both axes
    (rows: the attending token, columns: the token attended to)."""
    e = html.escape
    parts = []
    for t, (attention, program, tokens) in enumerate(panels):
        labels = [e(_token_label(token)) for token in tokens]
        n = len(labels)
        rows = "".join(f"<div>{label}</div>" for label in labels)
        columns = "".join(f"<div>{label}</div>" for label in labels)
        size = n * CELL_PX
        cells = []
        for name, matrix in (("attention", attention), ("program", program)):
            cells.append(
                f"<td><div class='cap'>{name}</div><img width='{size}' height='{size}' "
                f"alt='{name} of {e(head)} on held-out text {t + 1}' src='{heatmap_png(matrix)}'>"
                f"<div class='xl'>{columns}</div></td>")
        parts.append(f"<table class='hm'><tr><td class='yl'><div class='cap'>text {t + 1}</div>"
                     f"{rows}</td>{''.join(cells)}</tr></table>")
    return "".join(parts)


# --- head panels -----------------------------------------------------------------------------------


def _dense(packed: np.ndarray, n: int, keep: int) -> np.ndarray:
    """The top-left ``keep`` x ``keep`` block of a packed causal n x n matrix."""
    rows, cols = np.tril_indices(n)
    dense = np.zeros((n, n), dtype=np.float32)
    dense[rows, cols] = packed
    return dense[:keep, :keep]


def heatmap_texts(store, count: int = HEATMAP_TEXTS) -> list[int]:
    """Store indices of the held-out texts to draw: the first ``count`` with enough tokens."""
    held = store.split_indices("heldout") if "heldout" in store.splits else list(range(store.n_texts))
    long = [s for s in held if int(store.lengths[s]) >= 8]
    return (long or held)[:count]


def head_panels(store, programs: dict[int, object], texts: list[int], keep: int = HEATMAP_TOKENS):
    """{head_index: [(attention, program output, tokens) per text]} for every head in
    ``programs`` (head_index -> Program), evaluating each distinct program once on the chosen
    texts."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    unique = list({p.hash: p for p in programs.values()}.values())
    sentences = store.sentences(texts)
    outputs = evaluate_programs(unique, sentences, tokenizer_id=store.meta.get("tokenizer_id", ""),
                                progress=False)
    position = {p.hash: k for k, p in enumerate(unique)}
    offsets = np.asarray(outputs.offsets)
    panels = {}
    for head_index, program in programs.items():
        panels[head_index] = []
        for t, s in enumerate(texts):
            n = int(store.lengths[s])
            k = min(n, keep)
            attention = store.dense(head_index, s).cpu().numpy()[:k, :k]
            values = outputs.values[position[program.hash], offsets[t] : offsets[t + 1]]
            panels[head_index].append((attention, _dense(values, n, k), store.tokens[s][:k]))
    return panels


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 48px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:2px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.headline td:first-child{color:#444}.headline td.ours{font-weight:600}
.grid td{width:62px;height:30px;padding:1px 2px;border:1px solid #fff;font-size:9px;line-height:1.1;
 text-align:center;overflow:hidden}
.grid a{color:inherit;text-decoration:none;display:block}.grid th{font-size:10px;text-align:center}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px;margin:6px 0}
.head{border-top:1px solid #eee;margin-top:18px}.head img{max-width:100%}
details summary{cursor:pointer}
.hm{margin:4px 0}.hm td{vertical-align:top;border:0;padding:0 6px 0 0}
.hm .cap{font-size:11px;color:#555;height:16px}
.hm .yl{text-align:right;font:9px/11px monospace;padding-top:16px}.hm .yl>div{height:11px;overflow:hidden}
.hm .xl{display:flex;height:64px}.hm .xl>div{width:11px;writing-mode:vertical-rl;font:9px/11px monospace;
 overflow:hidden;white-space:nowrap}
.hm img{display:block;image-rendering:pixelated;border:1px solid #ccc}
"""


def _colour(iou: float) -> tuple[str, str]:
    """(background, text colour) for an IoU in the grid."""
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["viridis"](max(0.0, min(1.0, iou)))
    text = "#fff" if iou < 0.55 else "#000"
    return f"#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x}", text


def _fmt(value, percent: bool = False, signed: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if percent:
        return f"{100 * value:+.1f} %" if signed else f"{100 * value:.1f} %"
    return f"{value:+.1f} %" if signed else f"{value:.{digits}f}"


def _heads_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """Head types and the median terms a fitted program needs, when the run measured them."""
    rows = []
    if summary.get("head_types"):
        rows.append(("head types", "head_types",
                     ", ".join(f"{t} {n}" for t, n in summary["head_types"].items()), ""))
    if summary.get("median_terms_needed") is not None:
        rows.append(("median terms a fitted program needs (within 0.01 IoU of its best)",
                     "median_terms_needed", f"{summary['median_terms_needed']:g}", ""))
    return rows


def _headline_rows(summary: dict, n_heads: int) -> list[tuple[str, str, str, str]]:
    """(label, key, our figure, the paper's) for the summary table."""
    paper_iou = " / ".join(f"{100 * v:.0f} %" for v in PAPER["best_fit_iou"].values())
    paper_models = ", ".join(PAPER["best_fit_iou"])
    rows = [
        ("heads explained", "heads", str(summary.get("heads", n_heads)), ""),
        ("mean best-fit IoU (held-out)", "mean_best_fit_iou", _fmt(summary.get("mean_best_fit_iou")),
         f"{paper_iou} ({paper_models})"),
        ("median best-fit IoU (held-out)", "median_best_fit_iou",
         _fmt(summary.get("median_best_fit_iou")), ""),
        ("heads with IoU > 0.5", "share_heads_iou_above_0_5",
         _fmt(summary.get("share_heads_iou_above_0_5"), percent=True), ""),
        ("heads with IoU > 0.75", "share_heads_iou_above_0_75",
         _fmt(summary.get("share_heads_iou_above_0_75"), percent=True), ""),
        ("library size", "library_size", str(summary.get("library_size", "-")),
         "fewer than 1,000 programs explain all heads"),
        ("library mean IoU (held-out)", "library_mean_iou", _fmt(summary.get("library_mean_iou")), ""),
    ]
    rows += _heads_rows(summary)
    for name, value in (summary.get("baseline_iou") or {}).items():
        rows.append((f"{name} baseline IoU", f"baseline_{name.replace(' ', '_')}", _fmt(value), ""))
    for order, conditions in sweep_curves(summary.get("ppl_increase")).items():
        for fraction, value in conditions.get("programs", []):
            if fraction > 0:
                paper = f"+{PAPER['ppl_increase_at_25_percent']:.0f} %" if abs(fraction - 0.25) < 1e-9 else ""
                suffix = "" if order == "IoU" else f", {order} order"
                rows.append((f"perplexity, {100 * fraction:g} % of heads replaced{suffix}",
                             f"ppl_increase_{fraction:g}_{order}", _fmt(value, signed=True), paper))
    qa = summary.get("qa_accuracy")
    if qa:
        rows.append(("QA accuracy, unmodified", "qa_before", _fmt(qa.get("before"), percent=True), ""))
        after = qa.get("after", {})
        if after:
            largest = max(after, key=float)
            rows.append((f"QA accuracy, {100 * float(largest):g} % replaced by programs", "qa_after",
                         _fmt(after[largest].get("programs"), percent=True), ""))
    return rows


def render_html(*, summary: dict, manifest: dict, library: dict | None, sweep_figure: str | None,
                library_figure: str | None, heads: list[dict], n_layers: int, n_heads: int,
                sweep_text: str = "", titles: dict[str, str] | None = None) -> str:
    """The report page from prepared pieces (``heads``: one dict per explained head, keyed by
    ``head_index``; ``titles``: program hash -> name, from heads.json)."""
    parts = (_page_top_html(manifest, n_layers, n_heads)
             + _summary_html(summary, len(heads))
             + _grid_html(heads, n_layers, n_heads)
             + _curves_html(library_figure, sweep_figure, sweep_text)
             + _library_html(library, titles)
             + _heads_html(heads, n_heads)
             + ["</body></html>"])
    return "\n".join(parts)


def _page_top_html(manifest: dict, n_layers: int, n_heads: int) -> list[str]:
    """The document head, the title and one line on the model, corpus and device."""
    e = html.escape
    model = manifest.get("model", {})
    corpus = manifest.get("corpus", {})
    device = manifest.get("device", {}).get("cuda") or "cpu"
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnprog report: {e(str(model.get('id', '')))}</title><style>{_CSS}</style></head><body>",
        "<h1>attnprog report</h1>",
        f"<p class='sub'>{e(str(model.get('id', '?')))}: {model.get('layers', n_layers)} layers x "
        f"{model.get('heads', n_heads)} heads; corpus {e(str(corpus.get('spec', '?')))} "
        f"({corpus.get('texts', '?')} texts, splits {e(json.dumps(corpus.get('splits', {})))}, "
        f"hash {e(str(corpus.get('hash', '?')))}); device {e(str(device))}; "
        f"seed {manifest.get('seed')}; updated {e(str(manifest.get('updated', '')))}</p>",
    ]


def _summary_html(summary: dict, n_explained: int) -> list[str]:
    """The headline figures beside the paper's."""
    e = html.escape
    parts = ["<h2 id='summary'>Summary</h2>",
             "<table class='headline'><tr><th></th><th>this run</th><th>paper</th></tr>"]
    for label, key, ours, paper in _headline_rows(summary, n_explained):
        parts.append(f"<tr><td>{e(label)}</td><td class='num ours' id='{e(key)}'>{e(ours)}</td>"
                     f"<td>{e(paper)}</td></tr>")
    parts.append("</table><p class='sub'>The paper (Hayes, Li, Andreas, 2026) uses GPT-2 and Llama models "
                 "with LLM-written programs; IoU is measured on held-out texts, each head's best fit "
                 "chosen on the selection texts.</p>")
    return parts


def _grid_html(heads: list[dict], n_layers: int, n_heads: int) -> list[str]:
    """Layers x heads, each cell coloured by held-out IoU and linked to its head's section."""
    e = html.escape
    by_head_index = {h["head_index"]: h for h in heads}
    parts = ["<h2 id='grid'>Heads by held-out IoU</h2><p class='sub'>Each cell: the head's type "
             "(the pattern most of its attention follows; hover for its best program's name), "
             "and the held-out IoU of that program.</p><table class='grid'><tr><th></th>"
             + "".join(f"<th>H{h}</th>" for h in range(n_heads)) + "</tr>"]
    for layer in range(n_layers):
        parts.append(f"<tr><th>L{layer}</th>")
        for head in range(n_heads):
            info = by_head_index.get(layer * n_heads + head)
            if info is None:
                parts.append("<td style='background:#eee'></td>")
                continue
            background, colour = _colour(info["heldout_iou"])
            label = head_label_of(layer, head)
            kind = info.get("type") or info["family"]
            about = f"{info['type']} head; " if info.get("type") else ""
            parts.append(
                f"<td style='background:{background};color:{colour}' title='{label}: {e(about)}"
                f"{e(info.get('title') or info['name'])} ({e(info['family'])}), IoU "
                f"{info['heldout_iou']:.3f}'><a href='#{label}'>"
                f"{e(TYPE_SHORT.get(kind, kind[:10]))}<br>{info['heldout_iou']:.2f}</a></td>")
        parts.append("</tr>")
    parts.append("</table>")
    return parts


def _curves_html(library_figure: str | None, sweep_figure: str | None, sweep_text: str) -> list[str]:
    parts = ["<h2 id='curves'>Library size and head replacement</h2>"]
    if library_figure:
        parts.append(f"<p><img alt='mean IoU against library size' src='{library_figure}'></p>")
    if sweep_figure:
        parts.append(f"<p><img alt='perplexity increase against heads replaced' src='{sweep_figure}'></p>")
    if sweep_text:
        parts.append(f"<pre>{html.escape(sweep_text)}</pre>")
    return parts


def _library_html(library: dict | None, titles: dict[str, str] | None = None) -> list[str]:
    """The library's programs in order, each by name (``titles``: hash -> name, else derived
    from the program) with its source and the heads it explains."""
    from attnprog.synth.program import Program
    from attnprog.synth.titles import program_title

    if not library:
        return []
    titles = titles or {}
    e = html.escape
    count = len(library["programs"])
    parts = [f"<h2 id='library'>The library ({count} program{'' if count == 1 else 's'})</h2>"
             "<table><tr><th>#</th><th>program</th><th>family</th><th>gain</th><th>heads</th></tr>"]
    for k, program in enumerate(library["programs"]):
        names = program.get("heads", [])
        shown = ", ".join(names[:12]) + (f", ... ({len(names)})" if len(names) > 12 else "")
        parts.append(
            f"<tr><td class='num'>{k + 1}</td><td><details><summary>"
            f"{e(titles.get(program['hash']) or program_title(Program.from_dict(program)))} "
            f"<small>{e(program['hash'])}</small></summary><pre>{e(program['source'].strip())}</pre>"
            f"</details></td><td>{e(program['family'])}</td><td class='num'>{program['gain']:.4f}</td>"
            f"<td>{e(shown)}</td></tr>")
    parts.append("</table>")
    return parts


def _head_about_html(info: dict) -> str:
    """A head's pattern scores and its fitted program's held-out IoU by number of terms (from
    heads.json; empty for a run without it)."""
    e = html.escape
    parts = []
    if info.get("type_scores"):
        parts.append("pattern scores (share of attention): " + " &middot; ".join(
            f"{e(name)} {score:.2f}" for name, score in info["type_scores"].items()))
    if info.get("iou_by_terms"):
        parts.append("its fitted program by number of terms (held-out IoU): " + " &middot; ".join(
            f"{k}: {iou:.3f}" for k, iou in info["iou_by_terms"].items())
            + f"; {info['terms_needed']} within 0.01 of the best")
    return "".join(f"<p class='sub'>{part}</p>" for part in parts)


def _head_source_html(info: dict) -> str:
    """The best program's source; first the shortest program that fits when there is a shorter
    one within 0.01 of the best's held-out IoU (else the shortest beside the best)."""
    e = html.escape
    best = f"<pre>{e(info['source'].strip())}</pre>"
    shortest = info.get("shortest") or {}
    if not shortest.get("source"):
        return best
    terms = f"{shortest['terms']} term{'' if shortest['terms'] == 1 else 's'}"
    about = (f"its own fitted program cut to {terms}, <b>{e(shortest['name'])}</b>, IoU "
             f"{shortest['heldout_iou']:.3f} held-out")
    cut = f"<pre>{e(shortest['source'].strip())}</pre>"
    if shortest["heldout_iou"] >= info["heldout_iou"] - 0.01:
        return (f"<p>The shortest program that fits: {about}</p>{cut}<details><summary>the best "
                f"program, {e(info.get('title') or info['name'])}</summary>{best}</details>")
    return f"{best}<details><summary>the shortest fit: {about}</summary>{cut}</details>"


def _heads_html(heads: list[dict], n_heads: int) -> list[str]:
    """One section per head: its type, its best program by name, the shortest program that fits
    when there is a shorter one, and its heatmaps."""
    e = html.escape
    parts = ["<h2 id='heads'>Every head</h2>"]
    for info in heads:
        label = head_label(info["head_index"], n_heads)
        kind = f"{info['type']} head · " if info.get("type") else ""
        parts.append(
            f"<div class='head' id='{label}'><h3>{label}: {e(kind)}{e(info.get('title') or info['name'])}"
            f"</h3><p class='sub'>best fit: {e(info['family'])} program {e(info['hash'])}, IoU "
            f"{info['heldout_iou']:.3f} held-out ({info['selection_iou']:.3f} selection)"
            + (f"; in the library it uses #{info['library_position'] + 1} "
               f"(IoU {info['library_iou']:.3f})" if info.get("library_position") is not None else "")
            + " &middot; <a href='#grid'>back to the grid</a></p>"
            + _head_about_html(info) + _head_source_html(info))
        if info.get("heatmaps"):
            parts.append(info["heatmaps"])
        parts.append("</div>")
    return parts


def head_infos(table, library: dict | None, explained: dict | None) -> list[dict]:
    """One dict per explained head for the page: its best program (named, from heads.json when
    there is one), IoU, place in the library, and what heads.json says about it."""
    from attnprog.synth.titles import program_title

    entries = {e["head_index"]: e for e in (explained or {}).get("heads", [])}
    head_indices = (table.meta.get("heads") or (library or {}).get("heads")
                    or list(range(table.iou.shape[1])))
    best_iou, best_index = table.best()
    heldout = table.heldout_iou if table.heldout_iou is not None else best_iou
    library_of = {}
    if library:
        for k, head_index in enumerate(library["heads"]):
            library_of[head_index] = (library["assignment"][k], library["heldout_iou"][k])
    heads = []
    for head_index in head_indices:
        program = table.programs[int(best_index[head_index])]
        position, library_iou = library_of.get(head_index, (None, None))
        entry = entries.get(head_index, {})
        heads.append({"head_index": head_index, "program": program, "name": program.name,
                      "title": entry.get("program", {}).get("name") or program_title(program),
                      "family": program.family, "hash": program.hash, "source": program.source,
                      "heldout_iou": float(heldout[head_index]),
                      "selection_iou": float(best_iou[head_index]),
                      "library_position": position, "library_iou": library_iou,
                      **{key: entry[key] for key in ("type", "type_scores", "iou_by_terms",
                                                     "terms_needed", "shortest") if key in entry}})
    return heads


def write_report(run_dir: str | Path, out: str | Path | None = None, store=None,
                 texts: int = HEATMAP_TEXTS, tokens: int = HEATMAP_TOKENS, progress: bool = True) -> Path:
    """Build ``report.html`` (or ``out``) from a run directory; ``store`` skips reloading it."""
    from tqdm.auto import tqdm

    from attnprog.engine.head_entries import program_names
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore

    run_dir = Path(run_dir)
    if not (run_dir / rundir.TABLE).is_file():
        raise StoreError(f"{run_dir} holds no finished run (no iou_table.safetensors): "
                         f"run `attnprog run --out {run_dir}` first")
    table = IoUTable.load(run_dir / rundir.TABLE)
    if store is None:
        store = AttentionStore.load(run_dir / rundir.STORE)
    summary = _read_json(run_dir / rundir.SUMMARY, {})
    manifest = _read_json(run_dir / rundir.MANIFEST, {})
    library = _read_json(run_dir / rundir.LIBRARY)
    sweep = _read_json(run_dir / rundir.SWEEP)
    sweep_text = (run_dir / rundir.SWEEP_TEXT).read_text() if (run_dir / rundir.SWEEP_TEXT).is_file() else ""

    explained = rundir.read_heads(run_dir)
    heads = head_infos(table, library, explained)

    chosen = heatmap_texts(store, texts)
    if chosen:
        panels = head_panels(store, {h["head_index"]: h["program"] for h in heads}, chosen, tokens)
        for info in tqdm(heads, desc="report", unit="head", disable=None if progress else True):
            head_index = info["head_index"]
            info["heatmaps"] = head_heatmaps(panels[head_index], head_label(head_index, table.n_heads))
    best_fit_mean = summary.get("mean_best_fit_iou")
    curves = sweep_curves(sweep)
    page = render_html(
        summary=summary, manifest=manifest, library=library,
        sweep_figure=perplexity_figure(curves) if curves else None,
        library_figure=library_curve_figure(library, best_fit_mean) if library else None,
        heads=heads, n_layers=table.n_layers, n_heads=table.n_heads, sweep_text=sweep_text,
        titles=program_names(explained),
    )
    path = Path(out) if out else run_dir / rundir.REPORT
    tmp = path.with_suffix(".html.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
