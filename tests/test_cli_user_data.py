"""`hf-flat` on a user's own data and models (issue 10): a tokenizer with a short model_max_length,
a single CSV file, string labels and misspelled columns, missing folders and unknown data names,
--max_train_samples in `sharpness`, the averaged weights of a checkpoint, and the plane's stars."""

import csv

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_flat.analysis import evaluate
from hf_flat.analysis.surface import grid_points
from hf_flat.cli import build_parser, main, run
from hf_flat.data import batches, load_splits, preprocess

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "very", "not", "plot"]
TEXTS = ["very good film", "not good", "bad plot", "good plot", "very bad film", "not bad", "good " * 100, "bad " * 90]
LABELS = [1, 0, 0, 1, 0, 1, 1, 0]


def save_tiny_bert(path, seed=0, num_labels=2):
    """A tiny BERT with 80 position embeddings whose tokenizer has model_max_length 64, and labels
    named neg / pos in its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", model_max_length=64).save_pretrained(path)
    torch.manual_seed(seed)
    names = ["neg", "pos", "mixed"][:num_labels]
    config = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=80, num_labels=num_labels,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    return model


def write_csv(path, labels, copies=1, column="label"):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", column])
        for _ in range(copies):
            writer.writerows(zip(TEXTS, labels))
    return str(path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    save_tiny_bert(path)
    return str(path)


def error_of(capsys, argv):
    """main(argv)'s exit status and its one-line message."""
    status = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("hf-flat")]  # not the progress bars
    assert len(lines) == 1, err
    return status, lines[0]


def test_sharpness_on_one_csv_with_a_short_model_max_length(bert, tmp_path, capsys):
    data = write_csv(tmp_path / "my.csv", LABELS, copies=3)  # 24 rows, two of 90-100 words
    out = run(["sharpness", bert, "--data", data, "--m", "4", "--n", "2", "--n_average", "2", "--directions", "2",
               "--hessian_iterations", "2", "--output_dir", str(tmp_path / "s")])
    assert out["max_length"] == 64  # the tokenizer's limit (80 positions), not 128
    assert out["adversarial"]["n"] == 2 and out["training_examples"] == 24

    capped = run(["plane", bert, "--data", data, "--steps", "2", "--max_length", "100", "--output_dir", str(tmp_path / "p")])
    assert capped["max_length"] == 64 and any("capped at 64" in note for note in capped["notes"])
    assert any("single file" in note for note in capped["notes"])  # the one file is train and test
    assert "note: --data" in capsys.readouterr().out
    short = run(["plane", bert, "--data", data, "--steps", "2", "--max_length", "5", "--output_dir", str(tmp_path / "q")])
    assert short["max_length"] == 5 and short["plane"]["grid"][0]["test"]["loss"] != capped["plane"]["grid"][0]["test"]["loss"]


def test_sharpness_honours_max_train_samples_and_reports_fewer_batches(bert, tmp_path, capsys):
    data = write_csv(tmp_path / "my.csv", LABELS, copies=3)
    out = run(["sharpness", bert, "--data", data, "--max_train_samples", "8", "--m", "4", "--n", "4", "--n_average", "1",
               "--directions", "1", "--hessian_iterations", "1", "--output_dir", str(tmp_path / "s")])
    assert out["training_examples"] == 8
    assert out["adversarial"]["n"] == 2 and out["adversarial"]["n_requested"] == 4  # 8 examples hold 2 batches of 4
    assert out["average"]["n"] == 1
    printed = capsys.readouterr().out
    assert "--n 4 batches of --m 4 need 16 training examples, 8 are available" in printed
    assert out["notes"] and "used 2 batches" in out["notes"][0]

    status, err = error_of(capsys, ["sharpness", bert, "--data", data, "--max_train_samples", "8", "--m", "16",
                                    "--output_dir", str(tmp_path / "t")])
    assert status == 2 and "--m 16 is larger than the 8 training examples" in err


def test_string_labels_map_through_label2id_and_bad_labels_are_named(bert, tmp_path, capsys):
    ids = run(["interpolate", bert, bert, "--points", "2", "--data", write_csv(tmp_path / "ids.csv", LABELS),
               "--output_dir", str(tmp_path / "a")])
    names = run(["interpolate", bert, bert, "--points", "2", "--output_dir", str(tmp_path / "b"),
                 "--data", write_csv(tmp_path / "names.csv", [["neg", "pos"][y] for y in LABELS])])
    assert names["interpolation"][0]["test"] == ids["interpolation"][0]["test"]

    status, err = error_of(capsys, ["plane", bert, "--data", str(tmp_path / "ids.csv"), "--label_column", "lable",
                                    "--output_dir", str(tmp_path / "c")])
    assert status == 2 and "--label_column 'lable' is not a column" in err and "sentence, label" in err
    unknown = write_csv(tmp_path / "unknown.csv", ["neg", "positive"] * 4)
    status, err = error_of(capsys, ["plane", bert, "--data", unknown, "--output_dir", str(tmp_path / "d")])
    assert status == 2 and "['positive']" in err and "label2id" in err
    status, err = error_of(capsys, ["plane", bert, "--data", str(tmp_path / "ids.csv"), "--text_column", "text",
                                    "--output_dir", str(tmp_path / "e")])
    assert status == 2 and "--text_column 'text'" in err


def test_one_line_errors_for_folders_data_names_and_shapes(bert, tmp_path, capsys):
    data = write_csv(tmp_path / "my.csv", LABELS)
    status, err = error_of(capsys, ["plane", str(tmp_path / "no_model"), "--data", data, "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "no such model folder" in err and "Repo id" not in err
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    status, err = error_of(capsys, ["plane", str(tmp_path / "run"), "--data", data, "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "no config.json" in err and "checkpoint-5" in err
    status, err = error_of(capsys, ["plane", bert, "--data", "digitz", "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "did you mean 'digits'" in err
    status, err = error_of(capsys, ["plane", bert, "--data", str(tmp_path / "missing.csv"), "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "no such file or folder" in err
    (tmp_path / "folder").mkdir()
    write_csv(tmp_path / "folder" / "data.csv", LABELS)
    status, err = error_of(capsys, ["plane", bert, "--data", str(tmp_path / "folder"), "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "after their split" in err and "data.csv" in err

    BertForSequenceClassification.from_pretrained(bert).save_pretrained(tmp_path / "no_tokenizer")
    status, err = error_of(capsys, ["plane", str(tmp_path / "no_tokenizer"), "--data", data, "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "holds no tokenizer" in err  # not an empty tokenizer's numbers

    save_tiny_bert(tmp_path / "three", num_labels=3)
    status, err = error_of(capsys, ["interpolate", bert, str(tmp_path / "three"), "--data", data, "--points", "2",
                                    "--output_dir", str(tmp_path / "o")])
    assert status == 1 and "classifier.weight has shape (2, 8) in the first model and (3, 8)" in err


def test_averaged_weights_of_a_checkpoint(bert, tmp_path, capsys):
    from hf_flat import FlatTrainer, TrainingArguments

    tokenizer_dir, model = bert, BertForSequenceClassification.from_pretrained(bert)
    data = write_csv(tmp_path / "my.csv", LABELS)
    train = preprocess(load_splits(data)["train"], tokenizer_dir, max_length=16)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), flat_method="swa", average_start=0.25, optim="sgd",
                             learning_rate=0.5, per_device_train_batch_size=4, num_train_epochs=3, save_strategy="epoch",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = FlatTrainer(model=model, args=args, train_dataset=train)
    trainer.train()  # the final model holds the average, as checkpoint-6's hf_flat_state does
    checkpoint = str(tmp_path / "run" / "checkpoint-6")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(checkpoint)
    live = BertForSequenceClassification.from_pretrained(checkpoint)

    out = run(["interpolate", checkpoint, checkpoint, "--weights", "live", "averaged", "--points", "2", "--alpha_min", "0",
               "--alpha_max", "1", "--data", data, "--max_length", "16", "--output_dir", str(tmp_path / "i")])
    test = batches(train, 128)
    assert out["interpolation"][0]["test"]["loss"] == pytest.approx(evaluate(live, test)["loss"], rel=1e-5)
    assert out["interpolation"][1]["test"]["loss"] == pytest.approx(evaluate(trainer.model, test)["loss"], rel=1e-5)
    assert out["interpolation"][0]["test"]["loss"] != pytest.approx(out["interpolation"][1]["test"]["loss"], rel=1e-4)
    assert out["weights"][checkpoint].startswith("averaged (swa, 3 snapshots")
    assert "averaged (swa" in capsys.readouterr().out

    status, err = error_of(capsys, ["plane", bert, "--weights", "averaged", "--data", data, "--output_dir", str(tmp_path / "o")])
    assert status == 2 and "has no hf_flat_state.safetensors" in err


def test_each_plane_plot_stars_the_best_point_of_its_own_data(bert, tmp_path, monkeypatch, capsys):
    import hf_flat.analysis.plots as plots

    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "train.csv", LABELS)
    write_csv(folder / "test.csv", [1 - y for y in LABELS])  # the best train point is the worst test point
    stars = {}
    monkeypatch.setattr(plots, "plot_plane", lambda result, path, quantity, eval_set, best, name, what:
                        stars.setdefault(f"{eval_set}_{quantity}", (best, name, what)))
    out = run(["plane", bert, "--steps", "5", "--span", "2", "--data", str(folder), "--output_dir", str(tmp_path / "p")])
    grid = out["plane"]["grid"]
    for eval_set in ("train", "test"):
        best = min(grid, key=lambda g: (-g[eval_set]["metric"], g["alpha"] ** 2 + g["beta"] ** 2))  # ties: nearest
        assert stars[f"{eval_set}_loss"] == ((best["alpha"], best["beta"]), bert.rstrip("/").split("/")[-1],
                                             f"best {eval_set} metric")
    assert stars["train_loss"][0] != stars["test_loss"][0]
    assert stars["test_metric"][0] == stars["test_loss"][0]
    printed = capsys.readouterr().out
    assert "plane around" in printed and "best train metric" in printed and "model at (0, 0)" in printed


def test_help_defaults_and_the_centre_of_the_default_plane(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "compare" in capsys.readouterr().out
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("interpolate", "plane", "sharpness"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        text = commands[name].format_help()
        assert "(default: 128)" in text  # --batch_size's default is shown
    args = parser.parse_args(["plane", "m", "--data", "d", "--output_dir", "o"])
    assert 0.0 in grid_points(-args.span, args.span, args.steps)
    assert parser.parse_args(["sharpness", "m", "--data", "d", "--output_dir", "o"]).mu == 1.0


def test_integer_labels_by_name_regression_heads_and_the_interpolation_ends(tmp_path, capsys):
    """A model trained on integer labels 3 / 7 (run_glue.py saves them as label2id {"3": 0, "7": 1})
    reads them through label2id; a regression head gets no accuracy; `interpolate` always evaluates
    the two models themselves, whatever --points says."""
    model = save_tiny_bert(tmp_path / "stars")
    model.config.label2id, model.config.id2label = {"3": 0, "7": 1}, {0: "3", 1: "7"}
    model.save_pretrained(tmp_path / "stars")
    by_name = run(["interpolate", str(tmp_path / "stars"), str(tmp_path / "stars"), "--points", "10",
                   "--data", write_csv(tmp_path / "stars.csv", [[3, 7][y] for y in LABELS]),
                   "--output_dir", str(tmp_path / "a")])
    alphas = [row["alpha"] for row in by_name["interpolation"]]
    assert 0.0 in alphas and 1.0 in alphas and len(alphas) == 12
    save_tiny_bert(tmp_path / "ids")  # the same weights, its classes named neg / pos: labels are class ids
    ids = run(["interpolate", str(tmp_path / "ids"), str(tmp_path / "ids"), "--points", "2",
               "--data", write_csv(tmp_path / "ids.csv", LABELS), "--output_dir", str(tmp_path / "b")])
    assert by_name["interpolation"][alphas.index(0.0)]["test"] == ids["interpolation"][0]["test"]
    status, err = error_of(capsys, ["plane", str(tmp_path / "stars"), "--data", write_csv(tmp_path / "bad.csv", [5] * 8),
                                    "--output_dir", str(tmp_path / "c")])
    assert status == 2 and "labels [5] are not in the model config's label2id" in err

    regression = BertForSequenceClassification(BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=8, num_labels=1))
    batch = {"input_ids": torch.tensor([[2, 4, 3], [2, 5, 3]]), "labels": torch.tensor([0.0, 1.0])}
    assert "metric" not in evaluate(regression, lambda: [batch])
