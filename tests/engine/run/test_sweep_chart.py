"""The replacement story's numbers: every sweep shape summary.json has held, and the keys the
extended sweep writes (KL, intervals, replaceable share, the paper's protocol)."""

from attnprog.engine.run.sweep_chart import chart_data, heads_by_fraction, sweep_curves

ONE_ORDER = {"0": {"programs": 0.0, "uniform": 0.0}, "0.25": {"programs": 12.5, "uniform": 300.0},
             "0.05": {"programs": 1.0, "uniform": 40.0}}
FRACTIONS = ("0", "0.05", "0.1", "0.25", "0.5", "0.75", "1")
CONDITIONS = ("programs", "uniform", "random", "zero", "mean")


def extended_summary() -> dict:
    """A summary.json with every key of the extended sweep (issue 20's contract)."""
    def grid(value):
        return {order: {f: {c: value(order, float(f), k) for k, c in enumerate(CONDITIONS)}
                        for f in FRACTIONS} for order in ("iou", "cost")}

    return {"ppl_increase": grid(lambda o, f, k: 10.0 * f * (k + 1)),
            "kl": grid(lambda o, f, k: 0.01 * f * (k + 1)),
            "ppl_increase_ci": grid(lambda o, f, k: [10.0 * f * (k + 1) - 1, 10.0 * f * (k + 1) + 1]),
            "replaceable_share": {"16": {"selection": 0.3, "heldout": 0.25},
                                  "5": {"selection": 0.1, "heldout": 0.08}},
            "paper_protocol_iou": {"mean": 0.71, "min": 0.2, "max": 0.98}}


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


def test_todays_summary_gives_one_perplexity_chart_from_its_sweep_key():
    charts = chart_data({"sweep": {"iou": ONE_ORDER}}, n_explained=20)
    assert [c["metric"] for c in charts] == ["ppl_increase"]
    programs = next(s for s in charts[0]["series"] if s["condition"] == "programs")
    assert programs["points"][-1] == [0.25, 12.5, None, None, 5]  # no interval; 25 % of 20 heads


def test_the_extended_summary_gives_every_order_condition_and_interval():
    charts = chart_data(extended_summary(), n_explained=270)
    assert [c["metric"] for c in charts] == ["ppl_increase", "kl"]
    ppl, kl = charts
    assert {(s["order"], s["condition"]) for s in ppl["series"]} == {
        (o, c) for o in ("iou", "cost") for c in CONDITIONS}
    mean = next(s for s in ppl["series"] if (s["order"], s["condition"]) == ("cost", "mean"))
    assert [p[0] for p in mean["points"]] == [float(f) for f in FRACTIONS]
    assert mean["points"][3][:4] == [0.25, 12.5, 11.5, 13.5]
    assert all(p[2] is None for s in kl["series"] for p in s["points"])  # no KL intervals given


def test_heads_replaced_are_read_from_the_sweep_detail_rows():
    detail = {"rows": [{"fraction": 0.25, "n_heads": 67, "order": "iou"}, {"fraction": 0.0, "n_heads": 0}]}
    assert heads_by_fraction(detail) == {0.25: 67, 0.0: 0}
    charts = chart_data({"ppl_increase": {"iou": ONE_ORDER}}, n_explained=270, detail=detail)
    assert charts[0]["series"][0]["points"][-1][-1] == 67
