"""The run's report: one self-contained HTML file that opens offline (scripts, styles and data
inline; the library curve is a PNG data URI).

First the headline figures beside the paper's, then a layer x head grid coloured by held-out
IoU that people filter by type, IoU and name; clicking a cell opens that head in the attention
viewer (a held-out text as tokens: hover or pin a query token to see where the head, its
program or their difference attends) with the head at a glance under it; then the library
curve, the replacement charts (drawn by the page's script) and the library.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from attnprog.engine.heads import head_label, head_label_of
from attnprog.engine.run import rundir
from attnprog.engine.run.head_glance import head_infos, head_section_html
from attnprog.engine.run.rundir import PAPER
from attnprog.engine.run.sweep_chart import chart_data, interval, ppl_sweep, sweep_curves
from attnprog.engine.run.viewer import VIEWER_TEXTS, VIEWER_TOKENS, viewer_data, viewer_texts
from attnprog.errors import StoreError

TYPE_SHORT = {"first token": "first", "previous token": "previous", "duplicate token": "duplicate",
              "punctuation": "punct", "recent window": "window"}  # grid cells are narrow
GRID_NAME = 22  # characters of a program's name a grid cell shows (the whole name on hover)
ASSETS = ("report.css", "chart.js", "viewer.js")  # package data beside this module, inlined
VIEWS = ("model", "program", "diff")


def asset(name: str) -> str:
    """The text of one of the page's asset files (attnprog/engine/run/assets/)."""
    return resources.files("attnprog.engine.run").joinpath("assets", name).read_text(encoding="utf-8")


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _png(fig) -> str:
    """A matplotlib figure as a PNG data URI."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def library_curve_figure(library: dict, best_fit_mean: float | None) -> str:
    """Mean IoU over heads against library size, with the best-fit ceiling and the baselines."""
    import matplotlib

    matplotlib.use("Agg")  # no display; the report must build on a headless machine
    import matplotlib.pyplot as plt

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


# --- the headline table ----------------------------------------------------------------------------


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


# the paper's figures at 25 % of heads: the original hook, and its authors' corrected replacement
_PAPER_AT_25 = (f"+{PAPER['ppl_increase_at_25_percent']:.0f} % (original: program composed onto the "
                "head's output); corrected, attention replaced: " + ", ".join(
                    f"{model} +{value:g} %"
                    for model, value in PAPER["ppl_increase_at_25_percent_corrected"].items()))
_PAPER_SHARE = "corrected sweeps: " + ", ".join(
    f"{model} {100 * share:.0f} %" for model, share in PAPER["replaceable_share_at_16_percent"].items())


def _replacement_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """Perplexity with programs in place (with its interval when the sweep measured one), and the
    share of heads that can be replaced within a perplexity budget, when present."""
    rows = []
    for order, conditions in sweep_curves(ppl_sweep(summary)).items():
        for fraction, value in conditions.get("programs", []):
            if fraction > 0:
                paper = _PAPER_AT_25 if abs(fraction - 0.25) < 1e-9 else ""
                suffix = "" if order == "IoU" else f", {order} order"
                bounds = interval(summary.get("ppl_increase_ci"), order, fraction, "programs")
                ci = f" (interval {bounds[0]:+.1f} to {bounds[1]:+.1f} %)" if bounds else ""
                rows.append((f"perplexity, {100 * fraction:g} % of heads replaced{suffix}{ci}",
                             f"ppl_increase_{fraction:g}_{order}", _fmt(value, signed=True), paper))
    for budget, shares in sorted((summary.get("replaceable_share") or {}).items(), key=lambda b: float(b[0])):
        if isinstance(shares, dict):
            rows.append((f"heads replaceable by programs within +{budget} % perplexity "
                         "(selection / held-out)",
                         f"replaceable_share_{budget}",
                         f"{_fmt(shares.get('selection'), percent=True)} / "
                         f"{_fmt(shares.get('heldout'), percent=True)}",
                         _PAPER_SHARE if budget == "16" else ""))
    protocol = summary.get("paper_protocol_iou")
    if isinstance(protocol, dict) and protocol.get("mean") is not None:
        rows.append(("best-fit IoU by the paper's protocol (chosen and scored on the same texts), "
                     "mean (min to max)", "paper_protocol_iou",
                     f"{_fmt(protocol.get('mean'))} ({_fmt(protocol.get('min'))} to "
                     f"{_fmt(protocol.get('max'))})",
                     " / ".join(f"{100 * v:.0f} %" for v in PAPER["best_fit_iou"].values())))
    return rows


def _heldout_texts(summary: dict) -> str:
    """"held-out", with the texts' mean length when the run recorded it (IoU depends on it)."""
    tokens = summary.get("tokens_per_text")
    return f"held-out texts of {tokens:.0f} tokens on average" if tokens else "held-out"


def _by_length_rows(summary: dict, paper_iou: str) -> list[tuple[str, str, str, str]]:
    """The best fits on the first m tokens of each held-out text, beside the paper's sentences."""
    figures = summary.get("best_fit_iou_by_length")
    if not isinstance(figures, dict) or not figures:
        return []
    return [(f"mean best-fit IoU on the first {' / '.join(figures)} tokens of each held-out text",
             "best_fit_iou_by_length", " / ".join(_fmt(v) for v in figures.values()),
             f"{paper_iou} on sentences of 12 to 20 words")]


def _headline_rows(summary: dict, n_heads: int) -> list[tuple[str, str, str, str]]:
    """(label, key, our figure, the paper's) for the summary table."""
    paper_iou = " / ".join(f"{100 * v:.0f} %" for v in PAPER["best_fit_iou"].values())
    paper_models = ", ".join(PAPER["best_fit_iou"]) + "; on " + PAPER["best_fit_iou_texts"]
    rows = [
        ("heads explained", "heads", str(summary.get("heads", n_heads)), ""),
        (f"mean best-fit IoU ({_heldout_texts(summary)})", "mean_best_fit_iou",
         _fmt(summary.get("mean_best_fit_iou")),
         f"{paper_iou} ({paper_models})"),
        *_by_length_rows(summary, paper_iou),
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
    rows += _replacement_rows(summary)
    qa = summary.get("qa_accuracy")
    if qa:
        rows.append(("QA accuracy, unmodified", "qa_before", _fmt(qa.get("before"), percent=True), ""))
        after = qa.get("after", {})
        if after:
            largest = max(after, key=float)
            rows.append((f"QA accuracy, {100 * float(largest):g} % replaced by programs", "qa_after",
                         _fmt(after[largest].get("programs"), percent=True), ""))
    return rows


# --- the page ----------------------------------------------------------------------------------------


def render_html(*, summary: dict, manifest: dict, library: dict | None, library_figure: str | None,
                heads: list[dict], n_layers: int, n_heads: int, sweep_text: str = "",
                titles: dict[str, str] | None = None, viewer: dict | None = None,
                charts: list[dict] | None = None) -> str:
    """The report page from prepared pieces (``heads``: one dict per explained head, keyed by
    ``head_index``; ``titles``: program hash -> name, from heads.json; ``viewer``: the viewer's
    data from :func:`viewer_data`; ``charts``: from :func:`chart_data`)."""
    data = {"viewer": viewer, "charts": charts or [],
            "paper": {"fraction": 0.25, "ppl_increase": PAPER["ppl_increase_at_25_percent"]}}
    parts = (_page_top_html(manifest, n_layers, n_heads)
             + _summary_html(summary, len(heads))
             + _grid_html(heads, n_layers, n_heads)
             + _viewer_html(heads, n_heads, viewer)
             + _curves_html(library_figure, bool(charts), sweep_text)
             + _library_html(library, titles)
             + [_data_script(data), f"<script>{asset('chart.js')}\n{asset('viewer.js')}</script>",
                "</body></html>"])
    return "\n".join(parts)


def _data_script(data: dict) -> str:
    """The page's data as a JSON script element ("</" escaped so no string can end it)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
    return f"<script type='application/json' id='attnprog-data'>{text}</script>"


def _page_top_html(manifest: dict, n_layers: int, n_heads: int) -> list[str]:
    """The document head, the title and one line on the model, corpus and device."""
    e = html.escape
    model = manifest.get("model", {})
    corpus = manifest.get("corpus", {})
    device = manifest.get("device", {}).get("cuda") or "cpu"
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnprog report: {e(str(model.get('id', '')))}</title><style>{asset('report.css')}</style>",
        # with scripts on, only the chosen head's section shows; without, every one does
        "<script>document.documentElement.classList.add('js')</script></head><body>",
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


def _grid_filters_html(heads: list[dict]) -> str:
    """The grid's filters: type, IoU range, and a search over head, type and program name."""
    types = sorted({h.get("type") or h["family"] for h in heads})
    options = "".join(f"<option>{html.escape(t)}</option>" for t in types)
    return ("<div class='filters' id='grid-filters'><label>type <select id='type-filter'>"
            f"<option value=''>any</option>{options}</select></label> "
            "<label>IoU from <input id='iou-min' type='number' min='0' max='1' step='0.05' value='0'>"
            "</label> <label>to <input id='iou-max' type='number' min='0' max='1' step='0.05' value='1'>"
            "</label> <label>search <input id='grid-search' type='search' placeholder='L18.H3, previous, "
            "\u2019the\u2019\u2026'></label> <span id='grid-count'></span></div>")


def _grid_cell_html(info: dict, label: str) -> str:
    from attnprog.synth.titles import shorten

    e = html.escape
    background, colour = _colour(info["heldout_iou"])
    kind = info.get("type") or info["family"]
    title = info.get("title") or info["name"]
    about = f"{info['type']} head; " if info.get("type") else ""
    return (f"<td data-head='{label}' data-type='{e(kind)}' data-iou='{info['heldout_iou']:.4f}' "
            f"data-name='{e(title)}' style='background:{background};color:{colour}' "
            f"title='{label}: {e(about)}{e(title)} ({e(info['family'])}), IoU {info['heldout_iou']:.3f}'>"
            f"<a href='#{label}'><b>{e(TYPE_SHORT.get(kind, kind[:10]))}</b> {info['heldout_iou']:.2f}"
            f"<br><span>{e(shorten(title, GRID_NAME))}</span></a></td>")


def _grid_html(heads: list[dict], n_layers: int, n_heads: int) -> list[str]:
    """Layers x heads, each cell coloured by held-out IoU and opening its head in the viewer."""
    by_head_index = {h["head_index"]: h for h in heads}
    parts = ["<h2 id='grid'>Heads by held-out IoU</h2><p class='sub'>Each cell: the head's type "
             "(the pattern most of its attention follows), the held-out IoU of its best program and "
             "that program's name. Click a cell to open the head in the viewer.</p>",
             _grid_filters_html(heads),
             "<table class='grid'><tr><th></th>" + "".join(f"<th>H{h}</th>" for h in range(n_heads))
             + "</tr>"]
    for layer in range(n_layers):
        parts.append(f"<tr><th>L{layer}</th>")
        for head in range(n_heads):
            info = by_head_index.get(layer * n_heads + head)
            parts.append("<td class='none'></td>" if info is None
                         else _grid_cell_html(info, head_label_of(layer, head)))
        parts.append("</tr>")
    parts.append("</table>")
    return parts


def _viewer_html(heads: list[dict], n_heads: int, viewer: dict | None) -> list[str]:
    """The attention viewer's controls and token row (filled by the page's script), then every
    head's section (the script shows the chosen one)."""
    e = html.escape
    labels = [head_label(h["head_index"], n_heads) for h in heads]
    first = labels[0] if labels else ""
    parts = ["<h2 id='head'>A head, its program, and where each attends</h2>"]
    if viewer and viewer["texts"]:
        head_options = "".join(f"<option value='{label}'>{label}: {e(h.get('title') or h['name'])}</option>"
                               for label, h in zip(labels, heads))
        text_options = "".join(f"<option value='{k}'>held-out text {k + 1}</option>"
                               for k in range(len(viewer["texts"])))
        buttons = "".join(f"<button type='button' data-view-button='{v}'>{v}</button>" for v in VIEWS)
        parts.append(
            f"<div id='viewer' data-head='{first}' data-view='model' data-text='0'>"
            f"<div class='controls'><label>head <select id='head-select'>{head_options}</select></label> "
            f"<label>text <select id='text-select'>{text_options}</select></label> "
            f"<span class='views'>{buttons}</span></div>"
            "<p class='sub'>Hover a token to see where it attends (click to pin it): the head's "
            "attention (blue), its program's (orange), or program minus head (orange: the program "
            "attends more, blue: less). Each row is scaled to its largest entry.</p>"
            "<div id='tokens' class='tokens'></div><p id='row-info' class='row-info'></p></div>")
    parts += [head_section_html(info, n_heads) for info in heads]
    return parts


def _curves_html(library_figure: str | None, charts: bool, sweep_text: str) -> list[str]:
    parts = ["<h2 id='curves'>Library size and head replacement</h2>"]
    if library_figure:
        parts.append(f"<p><img alt='mean IoU against library size' src='{library_figure}'></p>")
    if charts:
        parts.append("<div id='replacement'></div>")
    if sweep_text:
        parts.append(f"<details><summary>the sweep as text</summary><pre>{html.escape(sweep_text)}</pre>"
                     "</details>")
    return parts


def _library_html(library: dict | None, titles: dict[str, str] | None = None) -> list[str]:
    """The library's programs in order, each by name (``titles``: hash -> name, else derived
    from the program) with its source and the heads it explains (linked)."""
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
        shown = ", ".join(f"<a href='#{e(n)}'>{e(n)}</a>" for n in names[:12])
        shown += f", ... ({len(names)})" if len(names) > 12 else ""
        parts.append(
            f"<tr><td class='num'>{k + 1}</td><td><details><summary>"
            f"{e(titles.get(program['hash']) or program_title(Program.from_dict(program)))} "
            f"<small>{e(program['hash'])}</small></summary><pre>{e(program['source'].strip())}</pre>"
            f"</details></td><td>{e(program['family'])}</td><td class='num'>{program['gain']:.4f}</td>"
            f"<td>{shown}</td></tr>")
    parts.append("</table>")
    return parts


def write_report(run_dir: str | Path, out: str | Path | None = None, store=None,
                 texts: int = VIEWER_TEXTS, tokens: int = VIEWER_TOKENS) -> Path:
    """Build ``report.html`` (or ``out``) from a run directory: ``texts`` held-out texts in the
    viewer, each cut to ``tokens`` tokens; ``store`` skips reloading the attention."""
    from attnprog.engine.head_entries import program_names
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise StoreError(f"{run_dir} is a file: give the run directory (`attnprog run --out` "
                         "wrote it)")
    if not (run_dir / rundir.TABLE).is_file():
        raise StoreError(f"{run_dir} holds no finished run (no iou_table.safetensors): "
                         f"run `attnprog run --out {run_dir}` first")
    table = IoUTable.load(run_dir / rundir.TABLE)
    if store is None:
        store = AttentionStore.load(run_dir / rundir.STORE)
    summary = _read_json(run_dir / rundir.SUMMARY, {})
    library = _read_json(run_dir / rundir.LIBRARY)
    if not ppl_sweep(summary):  # a run that stopped before its summary: the sweep file alone
        summary = dict(summary, ppl_increase=_read_json(run_dir / rundir.SWEEP))
    sweep_text = (run_dir / rundir.SWEEP_TEXT).read_text() if (run_dir / rundir.SWEEP_TEXT).is_file() else ""
    explained = rundir.read_heads(run_dir)
    heads = head_infos(table, library, explained)
    chosen = viewer_texts(store, texts)
    page = render_html(
        summary=summary, manifest=_read_json(run_dir / rundir.MANIFEST, {}), library=library,
        library_figure=library_curve_figure(library, summary.get("mean_best_fit_iou")) if library else None,
        heads=heads, n_layers=table.n_layers, n_heads=table.n_heads, sweep_text=sweep_text,
        titles=program_names(explained),
        viewer=viewer_data(store, {h["head_index"]: h["program"] for h in heads}, chosen, tokens),
        charts=chart_data(summary, len(heads), _read_json(run_dir / rundir.SWEEP_DETAIL)),
    )
    path = Path(out) if out else run_dir / rundir.REPORT
    path.parent.mkdir(parents=True, exist_ok=True)  # as the other --out files are written
    tmp = path.with_suffix(".html.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
