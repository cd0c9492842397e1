"""examples/pretrain/run_mlm.py end to end on a tiny corpus written here: it trains a tokenizer
and a masked LM, resumes exactly, and the saved folder is a model run_glue.py fine-tunes."""

import csv
import json
import os
import random
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "pretrain"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "glue"))
import run_mlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

NOUNS = ["dog", "cat", "horse", "river", "mountain", "teacher", "hammer", "violin", "garden", "storm"]
VERBS = ["runs", "sings", "falls", "grows", "shines", "waits", "breaks", "listens"]
ADJECTIVES = ["small", "quiet", "bright", "old", "heavy", "gentle", "cold", "green"]
TINY = ["--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--max_seq_length", "32", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--seed", "0", "--use_cpu", "true", "--report_to", "none"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    lines = [f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} near the {rng.choice(NOUNS)}"
             for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pretrain(corpus, output_dir, *extra):
    return run_mlm.main(["--train_file", corpus, "--output_dir", str(output_dir), "--max_steps", "6",
                         "--save_strategy", "steps", "--save_steps", "3", *TINY, *extra])


def test_pretraining_trains_and_resumes_exactly(tmp_path, corpus):
    metrics = pretrain(corpus, tmp_path / "full")
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    start = load_file(str(tmp_path / "full" / "checkpoint-3" / "model.safetensors"))
    assert metrics["train_loss"] > 0 and 1 < metrics["perplexity"] < 300  # (300 tokens: a uniform guess)
    assert any(not torch.equal(full[k], start[k]) for k in full)  # the last 3 steps moved the weights
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["vocab_size"] <= 300
    from transformers import AutoModelForMaskedLM  # the folder is a RoBERTa masked LM to any loader

    loaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "full"))
    assert type(loaded).__name__ == "RobertaForMaskedLM"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
    resumed_metrics = pretrain(corpus, tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
    assert resumed_metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    # the resumed run took the tokenizer its checkpoint holds, the one the first run trained
    assert (tmp_path / "resumed" / "tokenizer.json").read_text() == (tmp_path / "full" / "tokenizer.json").read_text()


def test_the_saved_folder_is_a_model_run_glue_fine_tunes(tmp_path, corpus):
    import run_glue

    pretrain(corpus, tmp_path / "mlm", "--eval_strategy", "no", "--validation_split_percentage", "0")
    rows = [[f"the {a} {n} {v}", "animal" if n in ("dog", "cat", "horse") else "other"]
            for a in ADJECTIVES[:3] for n in NOUNS for v in VERBS[:2]]
    with open(tmp_path / "task.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows])
    metrics = run_glue.main(["--model_name_or_path", str(tmp_path / "mlm"), "--train_file", str(tmp_path / "task.csv"),
                             "--validation_file", str(tmp_path / "task.csv"), "--text_column_names", "text",
                             "--output_dir", str(tmp_path / "glue"), "--max_steps", "2", "--use_cpu", "true",
                             "--report_to", "none", "--per_device_train_batch_size", "8", "--eval_strategy", "no"])
    assert "eval_accuracy" in metrics
    # the encoder is the pretrained one: fine-tuning started from its weights, not from new ones
    from transformers import AutoModelForSequenceClassification

    pretrained = load_file(str(tmp_path / "mlm" / "model.safetensors"))
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "mlm"), num_labels=2)
    key = next(k for k in pretrained if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.state_dict()[key], pretrained[key])

    # --from_scratch: the same architecture and tokenizer with new weights, seeded by --seed: the control
    common = ["--model_name_or_path", str(tmp_path / "mlm"), "--train_file", str(tmp_path / "task.csv"),
              "--validation_file", str(tmp_path / "task.csv"), "--text_column_names", "text", "--max_steps", "0",
              "--use_cpu", "true", "--report_to", "none", "--eval_strategy", "no", "--from_scratch", "true"]
    for name in ("scratch", "scratch-again"):
        run_glue.main([*common, "--output_dir", str(tmp_path / name), "--seed", "3"])
    scratch = load_file(str(tmp_path / "scratch" / "model.safetensors"))
    assert not torch.equal(scratch[key], pretrained[key]) and scratch[key].shape == pretrained[key].shape
    assert torch.equal(load_file(str(tmp_path / "scratch-again" / "model.safetensors"))[key], scratch[key])
    assert abs(scratch[key].std().item() - model.config.initializer_range) < 0.2 * model.config.initializer_range


def test_bad_input_is_refused_with_a_clear_message(tmp_path, corpus):
    with pytest.raises(ValueError, match="give --train_file"):
        run_mlm.main(["--output_dir", str(tmp_path / "a"), *TINY])
    with pytest.raises(ValueError, match="mlm_probability 1.5"):
        run_mlm.main(["--train_file", corpus, "--output_dir", str(tmp_path / "b"), "--mlm_probability", "1.5", *TINY])
    with pytest.raises(ValueError, match="does not exist"):
        run_mlm.main(["--train_file", str(tmp_path / "none.txt"), "--output_dir", str(tmp_path / "c"), *TINY])


def test_masks_depend_on_the_block_and_the_epoch_only_and_follow_berts_rule():
    from transformers import TrainerState

    class Tokenizer:
        mask_token_id = 4

        def __len__(self):
            return 50

    def example(block, length=64):
        ids = [0] + [10 + (block * 7 + i) % 40 for i in range(length - 2)] + [2]
        return {"input_ids": ids, "special_tokens_mask": [1] + [0] * (length - 2) + [1], "block": block}

    collator = run_mlm.MaskPerBlock(Tokenizer(), mlm_probability=0.15, seed=0)
    batch = collator([example(b) for b in range(300)])
    reordered = collator([example(b) for b in (299, 3, 7)])
    for row, block in enumerate((299, 3, 7)):  # a block's mask does not depend on its batch
        assert torch.equal(reordered["input_ids"][row], batch["input_ids"][block])
        assert torch.equal(reordered["labels"][row], batch["labels"][block])
    original = torch.tensor([example(b)["input_ids"] for b in range(300)])
    chosen = batch["labels"] != -100
    assert torch.equal(batch["labels"][chosen], original[chosen])  # labels: the chosen tokens' ids
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # never a special token
    share = chosen.float().mean().item() * 64 / 62
    assert 0.13 < share < 0.17
    masked = (batch["input_ids"] == Tokenizer.mask_token_id) & chosen
    changed = (batch["input_ids"] != original) & chosen & ~masked
    assert 0.77 < masked.sum() / chosen.sum() < 0.83 and 0.07 < changed.sum() / chosen.sum() < 0.12
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    state = TrainerState()
    state.epoch = 1.0
    collator.on_epoch_begin(None, state, None)  # a new epoch draws new masks
    assert collator.epoch == 1 and not torch.equal(collator([example(3)])["labels"][0], batch["labels"][3])


def test_the_head_on_masked_tokens_only_gives_robertas_loss_and_gradients():
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=20, type_vocab_size=1, pad_token_id=1)
    torch.manual_seed(0)
    plain = RobertaForMaskedLM(config).eval()
    ours = run_mlm.RobertaForMaskedLMOnMasks(config).eval()
    ours.load_state_dict(plain.state_dict())
    input_ids = torch.randint(3, 50, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, input_ids, torch.full_like(input_ids, -100))
    labels[0, 0] = input_ids[0, 0]  # at least one label
    expected, got = plain(input_ids=input_ids, labels=labels), ours(input_ids=input_ids, labels=labels)
    chosen = labels != -100
    # the loss by hand: mean cross-entropy of the full model's logits at the labelled tokens
    by_hand = torch.nn.functional.cross_entropy(expected.logits[chosen], labels[chosen])
    torch.testing.assert_close(got.loss, by_hand)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.logits, expected.logits[chosen])
    expected.loss.backward()
    got.loss.backward()
    grads = dict(ours.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, msg=name)
    # without labels it is RoBERTa's masked LM, every position predicted
    torch.testing.assert_close(ours(input_ids=input_ids).logits, expected.logits.detach())
