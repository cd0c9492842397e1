"""The ViT example runs end to end, offline: built-in digits, a local image folder, a JSON config."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "vit"))


@pytest.mark.parametrize("method", ["none", "sam", "wasam", "saf+ema"])
def test_digits_runs_and_learns(tmp_path, method):
    import run_vit

    metrics = run_vit.main(["--output_dir", str(tmp_path), "--flat_method", method, "--num_train_epochs", "2",
                            "--use_cpu", "true", "--average_start", "0.5", "--saf_start_epoch", "1",
                            "--saf_past_epochs", "1"])
    assert metrics["eval_accuracy"] > 0.3  # 10 classes: chance is 0.1
    saved = json.loads((tmp_path / "all_results.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    assert (tmp_path / "model.safetensors").exists()


def test_holdout_fraction_evaluates_on_training_data(tmp_path):
    import run_vit

    metrics = run_vit.main(["--output_dir", str(tmp_path), "--flat_method", "none", "--num_train_epochs", "1",
                            "--holdout_fraction", "0.1", "--use_cpu", "true"])
    held_out = 144  # ceil(0.1 * 1437) training images; the test split has 360
    assert abs(metrics["eval_accuracy"] * held_out - round(metrics["eval_accuracy"] * held_out)) < 1e-6


def test_image_folder_with_a_local_model_and_a_json_config(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    import run_vit

    model_dir = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16, num_labels=2)).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(model_dir)
    for split in ("train", "val"):
        for label, color in (("red", (220, 10, 10)), ("blue", (10, 10, 220))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (10, 10), tuple(max(0, c - 20 * i) for c in color)).save(folder / f"{i}.png")
    config = {"_source": "test", "train_dir": str(tmp_path / "train"), "validation_dir": str(tmp_path / "val"),
              "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "flat_method": "asam",
              "sam_rho": 0.5, "num_train_epochs": 2, "per_device_train_batch_size": 4, "use_cpu": True,
              "learning_rate": 0.01}
    (tmp_path / "config.json").write_text(json.dumps(config))
    metrics = run_vit.main([str(tmp_path / "config.json")])
    assert 0 <= metrics["eval_accuracy"] <= 1 and (tmp_path / "out" / "all_results.json").exists()
