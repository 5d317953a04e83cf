"""The report page: what it reads from a run, what it shows, and how big it gets."""

import base64
import io
import re

import numpy as np

from attnprog.engine.run.report import CELL_PX, head_heatmaps, render_html, sweep_curves
from attnprog.synth.program import Program

ONE_ORDER = {"0": {"programs": 0.0, "uniform": 0.0}, "0.25": {"programs": 12.5, "uniform": 300.0},
             "0.05": {"programs": 1.0, "uniform": 40.0}}


def test_sweep_curves_read_one_order_sorted_by_fraction():
    curves = sweep_curves(ONE_ORDER)
    assert list(curves) == ["IoU"]
    assert curves["IoU"]["programs"] == [(0.0, 0.0), (0.05, 1.0), (0.25, 12.5)]


def test_sweep_curves_read_every_order_of_a_nested_sweep():
    curves = sweep_curves({"iou": ONE_ORDER, "random": {"0.25": {"programs": 30.0}}})
    assert set(curves) == {"iou", "random"} and curves["random"]["programs"] == [(0.25, 30.0)]


def test_sweep_curves_skip_what_is_not_a_number():
    assert sweep_curves({"0.1": {"programs": None, "uniform": float("nan")}}) == {}
    assert sweep_curves(None) == {}


def heads_2x2(rows=(0, 1, 2, 3)):
    program = Program(source="def program(s):\n    return 1 < 2\n", name="lt", family="previous")
    return [{"head_index": r, "program": program, "name": program.name, "family": program.family,
             "hash": program.hash, "source": program.source, "heldout_iou": 0.25 * r,
             "selection_iou": 0.3, "library_position": 0, "library_iou": 0.2, "figure": None}
            for r in rows]


def page(**overrides):
    arguments = dict(summary={"mean_best_fit_iou": 0.5514, "library_size": 3,
                              "ppl_increase": ONE_ORDER},
                     manifest={"model": {"id": "m@sha256:abc"}}, library=None, sweep_figure=None,
                     library_figure=None, heads=heads_2x2(), n_layers=2, n_heads=2)
    arguments.update(overrides)
    return render_html(**arguments)


def test_summary_figures_stand_beside_the_papers():
    html = page()
    assert "id='mean_best_fit_iou'>0.551<" in html and "69 % / 74 % / 79 %" in html
    assert "id='ppl_increase_0.25_IoU'>+12.5 %<" in html and "+16 %" in html


def test_every_grid_cell_links_to_its_heads_section():
    html = page()
    for layer, head in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert f"href='#L{layer}.H{head}'" in html and f"id='L{layer}.H{head}'" in html


def test_heads_outside_the_explained_subset_are_blank_grid_cells():
    html = page(heads=heads_2x2(rows=(3,)))
    assert html.count("class='head'") == 1 and "href='#L0.H0'" not in html


def test_program_source_is_escaped():
    assert "return 1 &lt; 2" in page()


def random_panels(n=24, texts=2, tokens=None):
    rng = np.random.default_rng(0)
    panels = []
    for _ in range(texts):
        attention = np.tril(rng.random((n, n)))
        attention /= attention.sum(1, keepdims=True)
        panels.append((attention, np.eye(n), tokens or [f"tok{i}" for i in range(n)]))
    return panels


def test_heatmaps_are_png_data_uris_with_the_tokens_on_both_axes():
    from PIL import Image

    snippet = head_heatmaps(random_panels(n=5), "L0 H0")
    images = re.findall(r"src='data:image/png;base64,([^']+)'", snippet)
    assert len(images) == 4  # attention and program, two texts
    image = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert image.size == (5 * CELL_PX, 5 * CELL_PX)
    assert snippet.count("<div>tok3</div>") == 2 * 3  # rows once, columns under both panels


def test_heatmaps_of_270_heads_fit_in_15_mb():
    snippet = head_heatmaps(random_panels(), "L0 H0")  # dense random attention compresses worst
    assert 270 * len(snippet) < 13e6


def test_odd_tokens_are_escaped():
    snippet = head_heatmaps(random_panels(n=3, texts=1, tokens=["<b>", "a'b", " x"]), "h")
    assert "&lt;b&gt;" in snippet and "a&#x27;b" in snippet and "<b>" not in snippet


def test_no_external_resources():
    assert not re.search(r"(src|href)=['\"](https?:)?//", page())


def typed_heads():
    """heads_2x2 with what heads.json adds: a type, a program name, the shortest program."""
    heads = heads_2x2()
    heads[1].update(type="previous token", title="first token 20 % · previous token",
                    type_scores={"first token": 0.2, "previous token": 0.8},
                    iou_by_terms={"1": 0.2, "2": 0.25}, terms_needed=2)
    heads[2].update(type="recent window", title="recency",
                    shortest={"terms": 1, "name": "recency only", "heldout_iou": 0.49,
                              "source": "def program(s):\n    return SHORT\n"})
    return heads


def test_the_grid_shows_each_heads_type_and_names_its_program():
    html = page(heads=typed_heads())
    assert ">previous<br>0.25<" in html and ">window<br>0.50<" in html
    assert "title='L0.H1: previous token head; first token 20 % · previous token (previous)" in html


def test_a_heads_section_gives_its_type_scores_and_iou_by_terms():
    html = page(heads=typed_heads())
    assert "<h3>L0.H1: previous token head · first token 20 % · previous token</h3>" in html
    assert "previous token 0.80" in html and "1: 0.200 &middot; 2: 0.250; 2 within 0.01" in html


def test_the_shortest_program_that_fits_is_shown_before_the_best():
    html = page(heads=typed_heads())
    section = html.split("id='L1.H0'")[1].split("class='head'")[0]
    assert section.index("return SHORT") < section.index("return 1 &lt; 2")
    assert "cut to 1 term, <b>recency only</b>" in section


def test_library_programs_are_shown_by_name_not_by_hash():
    program = heads_2x2()[0]["program"]
    library = {"programs": [dict(program.to_dict(), index=0, gain=0.1, heads=["L0.H0"])]}
    html = page(library=library, titles={program.hash: "a named program"})
    assert f"<summary>a named program <small>{program.hash}</small>" in html
    assert f"<summary>lt <small>{program.hash}</small>" in page(library=library)  # derived
