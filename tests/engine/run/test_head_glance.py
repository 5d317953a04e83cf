"""Each head at a glance: type scores, the program's terms by contribution, IoU by number of
terms, the sources collapsed, and the heads sharing its library program."""

from attnprog.engine.run.head_glance import head_section_html
from tests.engine.run.test_report import heads_2x2


def glance_head(**extra):
    info = heads_2x2(rows=(1,))[0]
    info.update(type="previous token", title="first token 20 % · previous token", sharing=["L1.H0", "L1.H1"],
                type_scores={"first token": 0.2, "previous token": 0.8},
                share={"value": 0.2, "contribution": 0.05},
                terms=[{"label": "previous token", "contribution": 0.31},
                       {"label": "' the'", "contribution": 0.02}],
                iou_by_terms={"1": 0.2, "2": 0.25}, terms_needed=2, **extra)
    return info


def test_a_head_section_gives_its_type_and_program_by_name():
    html = head_section_html(glance_head(), n_heads=2)
    assert html.startswith("<section class='head' id='L0.H1' data-head='L0.H1'>")
    assert "<h3>L0.H1: previous token head · first token 20 % · previous token</h3>" in html


def test_type_scores_terms_and_iou_by_terms_are_bars_with_their_values():
    html = head_section_html(glance_head(), n_heads=2)
    assert ("<td>previous token</td><td class='bar'><span style='width:80.0%'></span></td>"
            "<td class='num'>0.80") in html
    assert "<td>&#x27; the&#x27;</td>" in html and ">0.310<" in html  # largest contribution, full bar
    assert "<td>first token 20 %</td>" in html  # the fitted program's first-token share
    assert "2 within 0.01 of the best" in html and "<td>2 terms</td>" in html


def test_the_source_is_collapsed():
    html = head_section_html(glance_head(), n_heads=2)
    assert "<details><summary>source of the best program" in html and "return 1 &lt; 2" in html


def test_the_shortest_program_that_fits_comes_before_the_best():
    info = glance_head(shortest={"terms": 1, "name": "recency only", "heldout_iou": 0.245,
                                 "source": "def program(s):\n    return SHORT\n"})
    html = head_section_html(info, n_heads=2)
    assert html.index("return SHORT") < html.index("return 1 &lt; 2")
    assert "cut to 1 term, <b>recency only</b>" in html


def test_a_shortest_fit_well_below_the_best_comes_after_it():
    info = glance_head(shortest={"terms": 1, "name": "recency only", "heldout_iou": 0.1,
                                 "source": "def program(s):\n    return SHORT\n"})
    html = head_section_html(info, n_heads=2)
    assert html.index("return 1 &lt; 2") < html.index("return SHORT")


def test_the_heads_sharing_its_library_program_are_links():
    html = head_section_html(glance_head(), n_heads=2)
    assert "library program #1 also explains: <a href='#L1.H0'>L1.H0</a>, <a href='#L1.H1'>L1.H1</a>" in html


def test_a_head_from_a_run_without_heads_json_shows_what_there_is():
    html = head_section_html(heads_2x2(rows=(2,))[0], n_heads=2)
    assert "class='glance'" not in html and "<h3>L1.H0: lt</h3>" in html
