"""`hf-flat` end to end on saved tiny models: built-in digits, a local CSV with the model's own
tokenizer, and an image folder with the model's own image processor."""

import csv
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_flat.analysis import evaluate
from hf_flat.cli import run
from hf_flat.data import batches, load_splits


def tiny_vit(path, seed, channels=1, size=8):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=size, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=10 if channels == 1 else 2)
    model = ViTForImageClassification(config)
    model.save_pretrained(path)
    return model


def test_digits_interpolate_plane_and_sharpness(tmp_path):
    a, b = tiny_vit(tmp_path / "a", 0), tiny_vit(tmp_path / "b", 1)
    common = ["--data", "digits", "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "32"]
    out = run(["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--points", "3", "--alpha_min", "0",
               "--alpha_max", "1", "--output_dir", str(tmp_path / "i"), *common])
    test = load_splits("digits")["eval"]
    for model, row in ((a, out["interpolation"][0]), (b, out["interpolation"][-1])):
        assert row["test"]["loss"] == pytest.approx(evaluate(model.eval(), batches(test, 32, limit=64))["loss"], rel=1e-5)
    assert json.loads((tmp_path / "i" / "results.json").read_text())["interpolation"][1]["alpha"] == 0.5
    assert (tmp_path / "i" / "interpolation.png").stat().st_size > 1000

    out = run(["plane", str(tmp_path / "a"), "--steps", "3", "--output_dir", str(tmp_path / "p"), *common])
    assert len(out["plane"]["grid"]) == 9 and out["plane"]["best_test_metric"] is not None
    for name in ("plane_test_loss.png", "plane_test_metric.png", "plane_train_loss.png"):
        assert (tmp_path / "p" / name).exists()

    out = run(["sharpness", str(tmp_path / "a"), "--m", "16", "--n", "2", "--n_average", "2", "--directions", "2",
               "--hessian_iterations", "3", "--output_dir", str(tmp_path / "s"), *common])
    assert out["adversarial"]["n"] == 2 and out["adversarial"]["sharpness"] > 0
    assert out["hessian"]["eigenvalue"] is not None and "omega" in out["asymmetry"]


def test_local_csv_with_the_models_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "very", "not"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=8, num_labels=2))
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        with open(data / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(8):
                writer.writerow([["very good film", "not good", "bad film", "good"][i % 4], [1, 0, 0, 1][i % 4]])
    out = run(["interpolate", str(tmp_path / "a"), str(tmp_path / "b"), "--points", "2", "--data", str(data),
               "--output_dir", str(tmp_path / "o"), "--batch_size", "4"])
    rows = out["interpolation"]
    assert rows[0]["test"]["loss"] == pytest.approx(rows[1]["test"]["loss"], rel=1e-6)  # same model twice
    assert 0 <= rows[0]["test"]["metric"] <= 1


def test_image_folder_with_the_models_image_processor(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    tiny_vit(tmp_path / "m", 0, channels=3, size=8)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "m")
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                color = (40 * i, 200, 10) if label == "cat" else (10, 20, 200 - 40 * i)
                Image.new("RGB", (12, 12), color).save(folder / f"{i}.png")
    out = run(["plane", str(tmp_path / "m"), "--steps", "2", "--data", str(tmp_path / "images"),
               "--output_dir", str(tmp_path / "o"), "--batch_size", "4"])
    assert len(out["plane"]["grid"]) == 4 and "metric" in out["plane"]["grid"][0]["test"]
