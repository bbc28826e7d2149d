"""The report's comparison with chance: a model on a few dozen test images can look like it learned
something while it only guessed."""

import math

from pipeline import report


def test_the_binomial_tail_is_exact_on_small_cases_and_holds_on_large_ones():
    assert math.isclose(report.binomial_tail(8, 10, 0.5), 56 / 1024)  # C(10,8)+C(10,9)+C(10,10) over 2^10
    assert report.binomial_tail(0, 10, 0.3) == 1.0 and report.binomial_tail(11, 10, 0.3) == 0.0
    assert report.binomial_tail(6000, 10000, 0.5) < 1e-80  # no overflow at MNIST's test size
    assert math.isclose(report.binomial_tail(5000, 10000, 0.5), 0.5, abs_tol=0.01)


def test_a_model_at_chance_is_named_and_one_above_it_is_not():
    at_chance = report.versus_chance(16 / 30, [15, 15])
    assert at_chance["chance_acc"] == 0.5 and at_chance["chance_p"] > 0.3
    warning = "\n".join(report.chance_warning("scratch", 16 / 30, 30, at_chance))
    assert "scratch is not clearly above chance" in warning and "16 of 30" in warning and "0.500" in warning
    above = report.versus_chance(27 / 30, [15, 15])
    assert above["chance_p"] < 1e-4 and report.chance_warning("finetune", 27 / 30, 30, above) == []


def test_chance_is_the_most_common_class_so_imbalance_cannot_pass_for_skill():
    # 90% of the test images are one class: 0.9 accuracy is what always answering it scores
    assert report.versus_chance(0.9, [90, 10])["chance_p"] > 0.5


def test_the_report_says_it_under_the_table():
    rows = {"scratch": {"test_acc": 0.5, **report.versus_chance(0.5, [10, 10])},
            "finetune": {"test_acc": 1.0, **report.versus_chance(1.0, [10, 10])}}
    evaluations = {name: {"test": {"acc": row["test_acc"], "images": 20}} for name, row in rows.items()}
    text = report.markdown(rows, evaluations, {"source": "folder"}, {"scratch": [], "finetune": []})
    assert "| chance (most common class) | 0.5000 | 0.5000 |" in text
    assert "**scratch is not clearly above chance**" in text and "finetune is not" not in text


def test_the_int8_file_is_reported_shipped_or_withheld():
    parity = {"onnx": {"max_abs_diff": 1e-7},
              "onnx_int8": {"shipped": 0.0, "top1_agreement": 0.9925, "max_abs_diff": 0.408}}
    withheld = report.headline({"test": {"acc": 0.99}}, parity, 1000)
    shipped = report.headline({"test": {"acc": 0.99}}, {"onnx_int8": {**parity["onnx_int8"], "shipped": 1.0}}, 1000)
    rows = {"scratch": shipped, "finetune": withheld}
    evaluations = {name: {"test": {"acc": 0.99, "images": 20}} for name in rows}
    text = report.markdown(rows, evaluations, {"source": "digits"}, {"scratch": [], "finetune": []})
    assert ("| int8 file | shipped (top-1 agreement 0.9925, largest move 0.41) | "
            "**withheld** by its gate (top-1 agreement 0.9925, largest move 0.41) |") in text


def test_the_report_says_what_the_reviewed_exclude_file_changed():
    rows = {"scratch": {"test_acc": 0.99}}
    evaluations = {"scratch": {"test": {"acc": 0.99, "images": 268}}}
    dataset = {"source": "digits", "images": 1797, "classes": 10,
               "review": {"file": "data/review/exclude.csv", "dropped": 6, "relabelled": 2}}
    text = report.markdown(rows, evaluations, dataset, {"scratch": []})
    assert "1797 images (6 dropped and 2 relabelled by `data/review/exclude.csv`), 10 classes" in text
    assert "dropped" not in report.markdown(rows, evaluations, {"source": "digits"}, {"scratch": []})
