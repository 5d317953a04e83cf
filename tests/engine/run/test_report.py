"""The report page: what it reads from a run, what it shows, and the hooks its script and tests use."""

import json
import re

from attnprog.engine.run.report import render_html, write_report
from attnprog.synth.program import Program
from tests.engine.run.test_sweep_chart import ONE_ORDER, extended_summary
from tests.engine.surrogate_run import make_run


def heads_2x2(rows=(0, 1, 2, 3)):
    program = Program(source="def program(s):\n    return 1 < 2\n", name="lt", family="previous")
    return [{"head_index": r, "program": program, "name": program.name, "family": program.family,
             "hash": program.hash, "source": program.source, "heldout_iou": 0.25 * r,
             "selection_iou": 0.3, "library_position": 0, "library_iou": 0.2}
            for r in rows]


def typed_heads():
    """heads_2x2 with what heads.json adds: a type and a program name."""
    heads = heads_2x2()
    heads[1].update(type="previous token", title="first token 20 % · previous token")
    heads[2].update(type="recent window", title="recency")
    return heads


def page(**overrides):
    arguments = dict(summary={"mean_best_fit_iou": 0.5514, "library_size": 3,
                              "ppl_increase": ONE_ORDER},
                     manifest={"model": {"id": "m@sha256:abc"}}, library=None,
                     library_figure=None, heads=heads_2x2(), n_layers=2, n_heads=2)
    arguments.update(overrides)
    return render_html(**arguments)


def page_data(html: str) -> dict:
    text = re.search(r"<script type='application/json' id='attnprog-data'>(.*?)</script>", html, re.S)[1]
    return json.loads(text)


def test_summary_figures_stand_beside_the_papers():
    html = page()
    assert "id='mean_best_fit_iou'>0.551<" in html and "69 % / 74 % / 79 %" in html
    assert "on single sentences of 12 to 20 words" in html
    assert "id='ppl_increase_0.25_IoU'>+12.5 %<" in html and "+16 %" in html


def test_the_held_out_figure_says_how_long_its_texts_are():
    html = page(summary={"mean_best_fit_iou": 0.5514, "tokens_per_text": 68.9})
    assert "mean best-fit IoU (held-out texts of 69 tokens on average)" in html


def test_the_best_fits_on_the_first_tokens_stand_beside_the_papers_sentences():
    html = page(summary={"mean_best_fit_iou": 0.5514,
                         "best_fit_iou_by_length": {"10": 0.77, "20": 0.71, "64": 0.615}})
    assert "on the first 10 / 20 / 64 tokens of each held-out text" in html
    assert "id='best_fit_iou_by_length'>0.770 / 0.710 / 0.615<" in html
    assert "69 % / 74 % / 79 % on sentences of 12 to 20 words" in html


def test_the_extended_sweeps_figures_join_the_headline_table():
    html = page(summary=extended_summary())
    assert "id='replaceable_share_16'>30.0 % / 25.0 %<" in html
    assert "id='replaceable_share_5'>10.0 % / 8.0 %<" in html
    assert "id='paper_protocol_iou'>0.710 (0.200 to 0.980)<" in html
    assert "25 % of heads replaced, iou order (interval +1.5 to +3.5 %)" in html


def test_rows_of_keys_a_summary_lacks_are_left_out():
    html = page()
    assert "id='replaceable_share" not in html and "id='paper_protocol_iou'" not in html
    assert "(interval" not in html


def test_every_grid_cell_names_its_head_and_links_to_it():
    html = page()
    for layer, head in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert f"<td data-head='L{layer}.H{head}'" in html and f"href='#L{layer}.H{head}'" in html
        assert f"<section class='head' id='L{layer}.H{head}'" in html


def test_heads_outside_the_explained_subset_are_blank_grid_cells():
    html = page(heads=heads_2x2(rows=(3,)))
    assert html.count("<section class='head'") == 1 and "data-head='L0.H0'" not in html


def test_the_grid_shows_each_heads_type_iou_and_program_name_and_filters_by_type():
    html = page(heads=typed_heads())
    assert "data-type='previous token' data-iou='0.2500'" in html
    assert "<b>previous</b> 0.25<br><span>first token 20 %…</span>" in html
    assert "<option>previous token</option><option>recent window</option>" in html
    assert "id='iou-min'" in html and "id='iou-max'" in html and "id='grid-search'" in html


def test_the_viewer_carries_its_hooks_and_the_data_its_script_reads():
    viewer = {"tokens": ["a"], "texts": [{"text": 3, "tokens": [0]}],
              "heads": {"L0.H0": {"model": "/w==", "program": "p"}}, "programs": {"p": "/w=="}}
    html = page(viewer=viewer, charts=[{"metric": "ppl_increase", "label": "x", "series": []}])
    assert "<div id='viewer' data-head='L0.H0' data-view='model' data-text='0'>" in html
    assert all(f"data-view-button='{v}'" in html for v in ("model", "program", "diff"))
    data = page_data(html)
    assert data["viewer"] == viewer and data["charts"][0]["metric"] == "ppl_increase"
    assert "<div id='replacement'>" in html


def test_no_text_in_the_data_can_close_its_script_element():
    viewer = {"tokens": ["</script><b>"], "texts": [{"text": 0, "tokens": [0]}], "heads": {}, "programs": {}}
    html = page(viewer=viewer)
    assert "</script><b>" not in html and page_data(html)["viewer"]["tokens"] == ["</script><b>"]


def test_program_source_is_escaped():
    assert "return 1 &lt; 2" in page()


def test_no_external_resources():
    assert not re.search(r"(src|href)=['\"](https?:)?//", page())


def test_library_programs_are_shown_by_name_not_by_hash():
    program = heads_2x2()[0]["program"]
    library = {"programs": [dict(program.to_dict(), index=0, gain=0.1, heads=["L0.H0"])]}
    html = page(library=library, titles={program.hash: "a named program"})
    assert f"<summary>a named program <small>{program.hash}</small>" in html
    assert f"<summary>lt <small>{program.hash}</small>" in page(library=library)  # derived
    assert "<a href='#L0.H0'>L0.H0</a>" in html


def test_a_report_written_into_a_folder_not_yet_made_makes_it(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "run", *tiny_gpt2)
    path = write_report(run, out=tmp_path / "pages" / "new" / "report.html", texts=1, tokens=8)
    assert path.is_file() and "<html" in path.read_text()
