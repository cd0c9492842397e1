"""examples/fid/run_fid.py offline: FiD JSON data, a tiny T5 and tokenizer saved by the test."""

import json
import os
import sys

import pytest
import torch

from helpers import save_tiny_t5

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "fid"))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


def fid_examples(n):
    base = [
        {"question": "who wrote hamlet", "answers": ["shakespeare"],
         "ctxs": [{"title": "hamlet", "text": "the play hamlet shakespeare"}, {"title": "paris", "text": "paris city"}]},
        {"question": "capital of france", "answers": ["paris"],
         "ctxs": [{"title": "france", "text": "the capital of france is paris"}]},
    ]
    return (base * n)[:n]


def test_fid_encodes_each_passage_and_concatenates_for_the_decoder(tiny_t5):
    from transformers import AutoTokenizer

    import run_fid

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    model = run_fid.FiDT5.from_pretrained(tiny_t5).eval()
    collator = run_fid.FiDCollator(tokenizer, n_context=2, text_maxlength=12, answer_maxlength=4)
    batch = collator(fid_examples(2))
    assert batch["input_ids"].shape == (2, 2, 12)  # the second question is padded to 2 passages
    encoded, mask = model.encode_passages(batch["input_ids"], batch["attention_mask"])
    alone = model.encoder(input_ids=batch["input_ids"][0, 1:2], attention_mask=batch["attention_mask"][0, 1:2])
    torch.testing.assert_close(encoded.last_hidden_state[0, 12:24], alone.last_hidden_state[0])  # passage 2 on its own
    assert mask.shape == (2, 24)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    assert run_fid.exact_match("The Shakespeare.", ["shakespeare"]) == 1.0 and run_fid.exact_match("paris", ["rome"]) == 0.0


@pytest.mark.parametrize("method", ["sam", "mesa"])
def test_fid_trains_and_reports_exact_match(tmp_path, tiny_t5, method):
    import run_fid

    for name, n in (("train", 8), ("dev", 4)):
        (tmp_path / f"{name}.json").write_text(json.dumps(fid_examples(n)))
    metrics = run_fid.main([
        "--model_name_or_path", tiny_t5, "--train_file", str(tmp_path / "train.json"), "--eval_file",
        str(tmp_path / "dev.json"), "--n_context", "2", "--text_maxlength", "12", "--answer_maxlength", "4",
        "--output_dir", str(tmp_path / "out"), "--flat_method", method, "--num_train_epochs", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--use_cpu", "true", "--mesa_start_epoch", "0",
    ])
    assert 0 <= metrics["eval_exact_match"] <= 1 and "eval_loss" in metrics
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_exact_match"] == metrics["eval_exact_match"]
