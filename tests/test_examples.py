"""The example scripts run end to end, offline, on their built-in data."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "vit"))


@pytest.mark.parametrize("method", ["none", "sam", "asam"])
def test_digits_example_runs_and_learns(tmp_path, method):
    import train_digits

    metrics = train_digits.main(
        ["--output_dir", str(tmp_path), "--flat_method", method, "--num_train_epochs", "2", "--use_cpu", "true"]
    )
    assert metrics["eval_accuracy"] > 0.3  # 10 classes: chance is 0.1
    saved = json.loads((tmp_path / "all_results.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]
    assert (tmp_path / "model.safetensors").exists()
