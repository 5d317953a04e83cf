"""engine.sweep_result: the sweep's figures as a printed table."""

from attnprog.engine.sweep_result import SweepResult, SweepRow


def test_the_qa_table_names_the_condition_of_each_column():
    rows = [SweepRow(fraction, n, 0.5, {"programs": 20.0, "uniform": 30.0, "random": 40.0},
                     qa_accuracy={"programs": 0.9, "uniform": 0.5, "random": 0.25}, order=order)
            for order in ("iou", "cost") for fraction, n in ((0.0, 0), (0.5, 4))]
    result = SweepResult("tiny", 2, 10, 20.0, rows, base_qa_accuracy=1.0, n_questions=4,
                         qa_conditions=("programs", "uniform", "random"))
    lines = result.to_text().splitlines()
    qa = lines[next(i for i, line in enumerate(lines) if line.startswith("QA accuracy")):]
    header = next(line for line in qa if "programs" in line)
    assert header.count("programs") == header.count("uniform") == header.count("random") == 2
    row = next(line for line in qa if line.lstrip().startswith("50 %"))
    assert header.index("uniform") + len("uniform") == row.index("50.0%") + len("50.0%")
