"""The report driven like a person uses it, in a real headless Chromium: hover a token and the
earlier tokens take the head's attention row as colour; switch to the program and the
difference; pin a token and change heads; filter the grid and follow a cell; hover the
replacement chart. Colours are read back from the page and compared with the run's own files."""

import json
import re

import numpy as np
import pytest

VIEWS = {"model": (31, 119, 180), "program": (230, 110, 0)}
TOLERANCE = 0.02  # one byte per cell, and Chromium keeps colours' alpha in 8 bits


@pytest.fixture(scope="module")
def run(tiny_run):
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.store import AttentionStore

    out = tiny_run[0]
    return (out, AttentionStore.load(out / "attention.safetensors"),
            IoUTable.load(out / "iou_table.safetensors"))


@pytest.fixture
def page(browser, run):
    """The tiny run's report, freshly opened and rendered."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get((run[0] / "report.html").resolve().as_uri())
    WebDriverWait(browser, 60).until(
        lambda b: b.find_element("tag name", "body").get_attribute("data-rendered"))
    return browser


def rgba(element) -> tuple[tuple[int, int, int], float]:
    text = element.value_of_css_property("background-color")
    numbers = [float(x) for x in re.findall(r"[\d.]+", text)]
    return tuple(int(x) for x in numbers[:3]), (numbers[3] if len(numbers) == 4 else 1.0)


def tokens(page):
    return page.find_elements("css selector", "#tokens [data-token-index]")


def hover(page, element):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).move_to_element(element).perform()


def choose(page, select_id: str, value: str):
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", select_id)).select_by_value(value)


def set_view(page, view: str):
    page.find_element("css selector", f"[data-view-button='{view}']").click()
    assert page.find_element("id", "viewer").get_attribute("data-view") == view


def head_row(run, label: str, text: int, query: int) -> np.ndarray:
    """Row ``query`` of the head's stored attention on the viewer's text ``text``."""
    from attnprog.engine.heads import parse_heads
    from attnprog.engine.run.viewer import viewer_texts

    store = run[1]
    head_index = parse_heads(label, store.n_layers, store.n_heads)[0]
    return store.dense(head_index, viewer_texts(store)[text]).float().numpy()[query, : query + 1]


def program_row(run, label: str, text: int, query: int) -> np.ndarray:
    """Row ``query`` of the head's best program's output on the viewer's text ``text``."""
    from attnprog.engine.heads import parse_heads
    from attnprog.engine.run.viewer import viewer_texts
    from attnprog.synth.runtime.evaluate import evaluate_programs

    store, table = run[1], run[2]
    head_index = parse_heads(label, store.n_layers, store.n_heads)[0]
    program = table.programs[int(table.best()[1][head_index])]
    s = viewer_texts(store)[text]
    outputs = evaluate_programs([program], store.sentences([s]),
                                tokenizer_id=store.meta.get("tokenizer_id", ""), progress=False)
    n = int(store.lengths[s])
    dense = np.zeros((n, n))
    dense[np.tril_indices(n)] = outputs.values[0, outputs.offsets[0] : outputs.offsets[1]]
    return dense[query, : query + 1]


def assert_colours_follow(page, expected: np.ndarray, view: str):
    shown = tokens(page)
    for key, weight in enumerate(expected):
        colour, alpha = rgba(shown[key])
        assert colour == VIEWS[view], (key, colour)
        assert abs(alpha - weight / expected.max()) < TOLERANCE, (key, alpha, weight / expected.max())
    assert all(rgba(t)[1] == 0 for t in shown[len(expected) :])  # later tokens stay uncoloured


def test_hovering_a_token_colours_earlier_tokens_by_the_heads_attention(page, run, tmp_path):
    query = 17
    hover(page, tokens(page)[query])
    head = page.find_element("id", "viewer").get_attribute("data-head")
    assert page.find_element("id", "viewer").get_attribute("data-query") == str(query)
    assert_colours_follow(page, head_row(run, head, 0, query), "model")
    assert f"{head}, query {query}" in page.find_element("id", "row-info").text
    page.save_screenshot(str(tmp_path / "model.png"))


def test_the_program_view_and_the_difference_follow_the_program(page, run, tmp_path):
    query = 20
    hover(page, tokens(page)[query])
    head = page.find_element("id", "viewer").get_attribute("data-head")
    model, program = head_row(run, head, 0, query), program_row(run, head, 0, query)
    set_view(page, "program")
    assert_colours_follow(page, program, "program")
    set_view(page, "diff")
    shown = tokens(page)
    for key in range(query + 1):
        weight = float(shown[key].get_attribute("data-weight"))
        assert abs(weight - (program[key] - model[key])) < 0.01
        if abs(weight) > 1e-3:  # orange where the program attends more, blue where less
            assert rgba(shown[key])[0] == VIEWS["program" if weight > 0 else "model"]
    iou = float(page.find_element("id", "row-info").get_attribute("data-iou"))
    assert abs(iou - np.minimum(model, program).sum() / np.maximum(model, program).sum()) < 0.01
    page.save_screenshot(str(tmp_path / "diff.png"))


def test_a_pinned_token_and_the_text_stay_when_the_head_changes(page, run, tmp_path):
    choose(page, "text-select", "1")
    query = 9
    tokens(page)[query].click()
    hover(page, tokens(page)[2])  # hovering elsewhere does not move a pinned query
    choose(page, "head-select", "L1.H2")
    viewer = page.find_element("id", "viewer")
    kept = [viewer.get_attribute(f"data-{name}") for name in ("head", "text", "pinned", "query")]
    assert kept == ["L1.H2", "1", "9", "9"]
    assert "pinned" in tokens(page)[query].get_attribute("class")
    assert_colours_follow(page, head_row(run, "L1.H2", 1, query), "model")
    assert page.find_element("id", "L1.H2").is_displayed()
    assert not page.find_element("id", "L0.H0").is_displayed()  # only the chosen head's section
    page.save_screenshot(str(tmp_path / "pinned.png"))


def test_every_head_opens_in_the_viewer(page, run):
    labels = [o.get_attribute("value") for o in page.find_elements("css selector", "#head-select option")]
    assert len(labels) == 8
    tokens(page)[12].click()
    for label in labels:
        choose(page, "head-select", label)
        assert_colours_follow(page, head_row(run, label, 0, 12), "model")


def test_filtering_the_grid_and_following_a_cell_opens_that_head(page, tmp_path):
    cells = page.find_elements("css selector", ".grid td[data-head]")
    assert len(cells) == 8
    page.find_element("id", "grid-search").send_keys("L1.H")
    shown = [c.get_attribute("data-head") for c in cells if c.get_attribute("data-match") == "1"]
    assert shown == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert page.find_element("id", "grid-count").text == "4 of 8 heads"
    low = page.find_element("id", "iou-min")
    low.clear()
    low.send_keys("1.01")
    assert all(c.get_attribute("data-match") == "0" for c in cells)
    low.clear()
    low.send_keys("0")
    page.find_element("css selector", ".grid td[data-head='L1.H3']").click()
    assert page.find_element("id", "viewer").get_attribute("data-head") == "L1.H3"
    assert page.execute_script("return location.hash") == "#L1.H3"
    assert page.find_element("id", "L1.H3").is_displayed()
    page.save_screenshot(str(tmp_path / "grid.png"))


def test_hovering_a_replacement_point_gives_its_heads_and_figure(page, run):
    summary = json.loads((run[0] / "summary.json").read_text())
    chart = page.find_element("css selector", ".chart[data-metric='ppl_increase']")
    series = chart.find_elements("css selector", "g[data-condition]")
    assert len(series) == sum(len(next(iter(f.values()))) for f in summary["ppl_increase"].values())
    for item in chart.find_elements("css selector", ".legend li"):  # hide the lines on top of it
        if item.text != "programs (iou order)":
            item.click()
    assert [g.get_attribute("data-condition") for g in series if g.is_displayed()] == ["programs"]
    point = chart.find_element("css selector", "g[data-order='iou'][data-condition='programs'] "
                                               "circle[data-fraction='0.25']")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", point)
    hover(page, point)
    figure = summary["ppl_increase"]["iou"]["0.25"]["programs"]
    readout = chart.find_element("css selector", ".readout").text
    assert f"25 % of heads ({point.get_attribute('data-heads')} heads) replaced: {figure:+.1f} %" in readout
    assert int(point.get_attribute("data-heads")) == 2  # a quarter of the 8 heads


def test_the_page_opens_without_the_network(page):
    page.get_log("performance")  # what the browser itself fetched on starting
    page.refresh()
    requests = [json.loads(entry["message"])["message"] for entry in page.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(url.startswith(("file:", "data:")) for url in urls), urls
    assert not [e for e in page.get_log("browser") if e["level"] == "SEVERE"]  # no script errors
