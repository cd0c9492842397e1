"""examples/glue/run_glue.py offline: local CSV files, a tiny model and tokenizer saved by the test."""

import csv
import json
import os
import sys

import pytest

from helpers import save_tiny_roberta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "glue"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_roberta(tmp_path_factory.mktemp("model"))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


SENTENCES = ["very good film", "not good", "bad plot", "a good plot", "very bad film", "not bad"]


@pytest.mark.parametrize("task, method, metric", [("sst2", "sam", "eval_accuracy"), ("cola", "wasam", "eval_matthews_correlation"),
                                                  ("stsb", "mesa", "eval_pearson")])
def test_glue_tasks_run_offline_with_their_metric(tmp_path, tiny_model, task, method, metric):
    import run_glue

    if task == "stsb":
        header, rows = ["sentence1", "sentence2", "label"], [[s, t, float(i % 5)] for i, (s, t) in enumerate(zip(SENTENCES, SENTENCES[::-1]))] * 3
    else:
        header, rows = ["sentence", "label"], [[s, int("good" in s)] for s in SENTENCES] * 3
    write_csv(tmp_path / "train.csv", header, rows)
    write_csv(tmp_path / "dev.csv", header, rows[:6])
    metrics = run_glue.main([
        "--model_name_or_path", tiny_model, "--task_name", task, "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "dev.csv"), "--output_dir", str(tmp_path / "out"), "--flat_method", method,
        "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--learning_rate", "0.01", "--use_cpu", "true",
        "--average_start", "0.5", "--mesa_start_epoch", "0",
        *(["--ignore_mismatched_sizes", "true"] if task == "stsb" else []),  # the saved head has 2 labels
    ])
    assert metric in metrics and -1 <= metrics[metric] <= 1
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())[metric] == metrics[metric]


def test_glue_metrics_by_hand():
    import numpy as np
    import run_glue
    from transformers import EvalPrediction

    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    assert run_glue.glue_metrics("sst2")(EvalPrediction(logits, labels))["accuracy"] == 0.75
    # Matthews: TP=1, TN=2, FP=1, FN=0 -> (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2)
    mcc = run_glue.glue_metrics("cola")(EvalPrediction(logits, labels))["matthews_correlation"]
    assert mcc == pytest.approx(2 / np.sqrt(12))
    pearson = run_glue.glue_metrics("stsb")(EvalPrediction(np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 6.5])))
    assert pearson["pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
