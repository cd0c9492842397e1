"""examples/glue/run_glue.py on a user's own CSV, as Hugging Face's run_glue.py trains on one:
labels from the training data (string labels, 6 classes, regression for float labels), text
columns by name, one-line errors that name a missing column or an unknown label, and the
sequence length capped by the model's limit. Tiny local models and files, written here."""

import csv
import json
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "glue"))

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "good", "bad", "film", "very", "not", "a", "plot", "sad", "fun", "scary"]
COMMON = ["--use_cpu", "true", "--report_to", "none", "--seed", "0", "--per_device_train_batch_size", "4",
          "--learning_rate", "0.01", "--num_train_epochs", "1"]
EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # 6 classes, not in sorted order


def _save(path, model_class, max_positions=40, model_max_length=None, **config):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", **extra).save_pretrained(path)
    torch.manual_seed(0)
    model_class(RobertaConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, max_position_embeddings=max_positions, pad_token_id=0,
                              **config)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base: no head (as roberta-base); two: a 2-class head; short: model_max_length 64, 80 positions."""
    from transformers import RobertaForSequenceClassification, RobertaModel

    root = tmp_path_factory.mktemp("models")
    return {"base": _save(root / "base", RobertaModel), "two": _save(root / "two", RobertaForSequenceClassification),
            "short": _save(root / "short", RobertaModel, max_positions=80, model_max_length=64)}


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def emotions_csv(path, labels=EMOTIONS, n=2):
    """Columns id (int), text, label (strings): the text column is the only text column."""
    texts = ["very sad film", "fun plot", "a good film", "bad scary plot", "very scary", "not good plot"]
    return write_csv(path, ["id", "text", "label"], [[i, texts[i % 6], labels[i % len(labels)]] for i in range(6 * n)])


def glue(*args):
    import run_glue

    return run_glue.main([*args, *COMMON])


def test_six_string_labels_train_a_six_class_head_and_a_saved_head_is_refused_or_replaced(tmp_path, models):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_flat.scripts import ScriptError

    train, dev = emotions_csv(tmp_path / "train.csv"), emotions_csv(tmp_path / "dev.csv", n=1)
    data = ["--train_file", train, "--validation_file", dev]
    # a model folder whose head has 2 labels is not silently replaced ...
    with pytest.raises(ScriptError, match=r"head for 2 label\(s\).*6 labels \(anger, fear, joy, love, sadness, "
                                          r"surprise\): pass --ignore_mismatched_sizes true"):
        glue("--model_name_or_path", models["two"], "--output_dir", str(tmp_path / "refused"), *data)
    # ... but replaced on request by a 6-class head, with the sorted labels in its config
    out = tmp_path / "out"
    metrics = glue("--model_name_or_path", models["two"], "--ignore_mismatched_sizes", "true", "--output_dir", str(out), *data)
    assert 0 <= metrics["eval_accuracy"] <= 1
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 6 and config.id2label == dict(enumerate(sorted(EMOTIONS)))
    assert config.label2id == {name: i for i, name in enumerate(sorted(EMOTIONS))}
    assert AutoModelForSequenceClassification.from_pretrained(out).classifier.out_proj.out_features == 6
    # a trained 6-class head keeps its own label order (here the reverse of sorted)
    reverse = {name: 5 - i for i, name in enumerate(sorted(EMOTIONS))}
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "label2id": reverse, "id2label": {i: n for n, i in reverse.items()}}))
    again = tmp_path / "again"
    glue("--model_name_or_path", str(out), "--output_dir", str(again), "--max_steps", "1", *data)
    assert AutoConfig.from_pretrained(again).label2id == reverse


def test_float_labels_train_a_regression_on_named_text_columns(tmp_path, models):
    from transformers import AutoConfig

    rows = [["very good film", "fun plot", 4.5, "x"], ["bad plot", "scary film", 1.25, "y"], ["not good", "sad", 0.5, "z"],
            ["a fun film", "good plot", 3.75, "w"]] * 3
    header = ["premise", "hypothesis", "score", "source"]
    train, dev = write_csv(tmp_path / "train.csv", header, rows), write_csv(tmp_path / "dev.csv", header, rows[:4])
    out = tmp_path / "out"
    metrics = glue("--model_name_or_path", models["base"], "--train_file", train, "--validation_file", dev,
                   "--text_column_names", "premise, hypothesis", "--label_column_name", "score", "--output_dir", str(out))
    assert {"eval_pearson", "eval_mse"} <= set(metrics)
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.problem_type == "regression"


def test_missing_columns_and_unknown_labels_are_one_line_errors_that_name_them(tmp_path, models, monkeypatch, capsys):
    import run_glue

    from hf_flat.scripts import ScriptError, run

    train = emotions_csv(tmp_path / "train.csv")
    base = ["--model_name_or_path", models["base"], "--train_file", train, "--output_dir", str(tmp_path / "out"),
            "--eval_strategy", "no"]
    with pytest.raises(ScriptError, match=r"column 'review' is not in --train_file .*\(its columns: id, text, label\): "
                                          "name the text column"):
        glue(*base, "--text_column_names", "review")
    with pytest.raises(ScriptError, match="column 'sentiment' is not in --train_file .*--label_column_name"):
        glue(*base, "--label_column_name", "sentiment")
    with pytest.raises(ScriptError, match="column 'sentence' is not in .*--task_name sst2 reads these columns"):
        glue(*base, "--task_name", "sst2")
    dev = emotions_csv(tmp_path / "dev.csv", labels=["joy", "boredom"], n=1)
    with pytest.raises(ScriptError, match="--validation_file .*: column 'label' holds 'boredom', label\\(s\\) the training "
                                          "data lacks \\(its labels: anger, fear, joy, love, sadness, surprise\\)"):
        glue(*base, "--validation_file", dev)
    # through the script's entry point: one line on stderr, status 2, no traceback
    monkeypatch.setattr(sys, "argv", ["run_glue.py", *base, "--text_column_names", "review"])
    with pytest.raises(SystemExit) as exit:
        run(run_glue.main)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("run_glue.py: error: column 'review' is not in --train_file")


def test_sequence_length_is_capped_by_the_tokenizer_and_the_position_embeddings(tmp_path, models, caplog):
    import run_glue
    from transformers import AutoConfig, AutoTokenizer

    def limit(name, requested=None):
        path = models[name]
        return run_glue.sequence_length(requested, AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path))

    assert limit("short") == 64  # model_max_length 64 < 80 positions - 1 (RoBERTa's padding offset)
    assert limit("base") == 39 and limit("base", 16) == 16  # no tokenizer limit: 40 positions - 1
    long = ["very good film " * 40, "bad scary plot " * 40] * 4  # 120 tokens each
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [[t, int("good" in t)] for t in long])
    with caplog.at_level(logging.WARNING):
        metrics = glue("--model_name_or_path", models["short"], "--train_file", train, "--validation_file", train,
                       "--max_seq_length", "200", "--output_dir", str(tmp_path / "out"))
    assert "eval_accuracy" in metrics
    assert "--max_seq_length 200 is capped at 64, this model's limit (tokenizer model_max_length 64" in caplog.text
