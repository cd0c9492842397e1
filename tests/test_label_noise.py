"""`--label_noise p` in examples/vit/run_vit.py and examples/glue/run_glue.py (symmetric label noise,
as in SAM's noisy-label experiments, Foret et al., ICLR 2021, section 3.3): exactly round(p * N)
training labels replaced, each by another valid class, the same seed giving the same flips; the
evaluation and held-out labels that reach the Trainer untouched; the realised fraction in
all_results.json; bad values and regression labels refused. Tiny local data and models, offline."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features

from hf_flat import FlatTrainer
from hf_flat.data import UsageError, apply_label_noise

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "examples", "vit"))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "glue"))

FAST = ["--use_cpu", "true", "--report_to", "none", "--max_steps", "1", "--seed", "0"]


def labels_of(dataset):
    return np.asarray(dataset.with_format(None)["labels"])


# ---- the function --------------------------------------------------------------------------------------


def test_exactly_round_p_n_labels_change_each_to_another_valid_class():
    clean = np.arange(1000) % 7
    data = Dataset.from_dict({"x": list(range(1000)), "labels": clean}).with_format("torch")
    noisy, record = apply_label_noise(data, 0.25, 7, seed=3)
    new = labels_of(noisy)
    flipped = new != clean
    assert flipped.sum() == 250 and record["label_noise_flipped"] == 250
    assert record["label_noise_fraction"] == 0.25 and record["label_noise"] == 0.25 and record["label_noise_seed"] == 3
    assert ((0 <= new) & (new < 7)).all() and new.dtype.kind == "i"
    assert noisy.format["type"] == "torch" and isinstance(noisy[0]["labels"], torch.Tensor)  # format kept
    assert labels_of(noisy.select(range(5))).tolist() == new[:5].tolist() and noisy["x"][:5].tolist() == [0, 1, 2, 3, 4]
    # symmetric: the new label is uniform over the 6 other classes (offsets 1..6 each about 1/6 of 250)
    offsets = np.bincount((new[flipped] - clean[flipped]) % 7, minlength=7)
    assert offsets[0] == 0 and offsets[1:].min() > 20
    # rounding to the nearest whole example
    assert apply_label_noise(data.select(range(30)), 0.1, 7, seed=0)[1]["label_noise_flipped"] == 3
    assert apply_label_noise(data.select(range(7)), 0.2, 7, seed=0)[1]["label_noise_flipped"] == 1  # 1.4 -> 1


def test_the_same_seed_gives_the_same_flips_and_another_seed_others():
    data = Dataset.from_dict({"labels": np.arange(500) % 3})
    first, _ = apply_label_noise(data, 0.3, 3, seed=11)
    again, _ = apply_label_noise(data, 0.3, 3, seed=11)
    other, _ = apply_label_noise(data, 0.3, 3, seed=12)
    assert labels_of(first).tolist() == labels_of(again).tolist()
    assert labels_of(first).tolist() != labels_of(other).tolist()


def test_class_label_features_are_kept_and_zero_noise_changes_nothing():
    features = Features({"labels": ClassLabel(names=["a", "b"])})
    data = Dataset.from_dict({"labels": [0, 1] * 10}, features=features)
    noisy, record = apply_label_noise(data, 0.5, 2, seed=0)
    assert noisy.features["labels"] == ClassLabel(names=["a", "b"]) and (labels_of(noisy) != labels_of(data)).sum() == 10
    same, record = apply_label_noise(data, 0.0, 2, seed=0)
    assert same is data and record["label_noise_flipped"] == 0 and record["label_noise_fraction"] == 0.0


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_fractions_outside_zero_to_one_are_refused(bad):
    data = Dataset.from_dict({"labels": [0, 1, 2]})
    with pytest.raises(UsageError, match=r"--label_noise .*must lie in \[0, 1\)"):
        apply_label_noise(data, bad, 3, seed=0)


def test_regression_labels_and_a_single_class_are_refused():
    with pytest.raises(UsageError, match="regression target .* cannot be flipped"):
        apply_label_noise(Dataset.from_dict({"labels": [0.1, 2.5, 4.0]}), 0.5, 3, seed=0)
    with pytest.raises(UsageError, match="two or more"):
        apply_label_noise(Dataset.from_dict({"labels": [0, 0]}), 0.5, 1, seed=0)


# ---- the scripts, end to end: what reached the Trainer ------------------------------------------------------


@pytest.fixture
def trainers(monkeypatch):
    """Every Trainer the scripts build, kept to read the data it was given."""
    import run_glue
    import run_vit

    seen = []

    class Recording(FlatTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(run_vit, "FlatTrainer", Recording)
    monkeypatch.setattr(run_glue, "FlatTrainer", Recording)
    return seen


def _vit(out, *flags):
    import run_vit

    run_vit.main(["--output_dir", str(out), "--flat_method", "none", "--holdout_fraction", "0.2",
                  "--max_train_samples", "300", *FAST, *flags])
    return json.loads((out / "all_results.json").read_text())


def test_vit_noise_reaches_training_only_and_is_recorded(tmp_path, trainers):
    clean = _vit(tmp_path / "clean")
    noisy = _vit(tmp_path / "noisy", "--label_noise", "0.3")
    _vit(tmp_path / "again", "--label_noise", "0.3")
    other = _vit(tmp_path / "other", "--label_noise", "0.3", "--label_noise_seed", "5")
    (c, n, a, o) = trainers
    train = labels_of(c.train_dataset)
    assert len(train) == 300 and len(labels_of(c.eval_dataset)) == 288  # held out: ceil(0.2 * 1437)
    changed = labels_of(n.train_dataset) != train
    assert changed.sum() == 90 and ((0 <= labels_of(n.train_dataset)) & (labels_of(n.train_dataset) < 10)).all()
    # the held-out split that --holdout_fraction evaluates on (and compare --grid selects on) is clean
    for t in (n, a, o):
        assert labels_of(t.eval_dataset).tolist() == labels_of(c.eval_dataset).tolist()
    # same command, same flips; --label_noise_seed draws others
    assert labels_of(a.train_dataset).tolist() == labels_of(n.train_dataset).tolist()
    assert labels_of(o.train_dataset).tolist() != labels_of(n.train_dataset).tolist()
    assert (labels_of(o.train_dataset) != train).sum() == 90
    assert clean["label_noise"] == 0.0 and clean["label_noise_fraction"] == 0.0
    assert noisy["label_noise"] == 0.3 and noisy["label_noise_flipped"] == 90 and noisy["label_noise_fraction"] == 0.3
    assert noisy["label_noise_seed"] == 0 and other["label_noise_seed"] == 5


def test_vit_evaluation_split_is_untouched(tmp_path, trainers):
    import run_vit

    for name, flags in (("clean", []), ("noisy", ["--label_noise", "0.5"])):
        run_vit.main(["--output_dir", str(tmp_path / name), "--flat_method", "none", "--max_train_samples", "100",
                      "--max_eval_samples", "50", *FAST, *flags])
    clean, noisy = trainers
    assert labels_of(noisy.eval_dataset).tolist() == labels_of(clean.eval_dataset).tolist()
    assert (labels_of(noisy.train_dataset) != labels_of(clean.train_dataset)).sum() == 50


WORDS = ["<pad>", "<unk>", "<s>", "</s>", "good", "bad", "film", "very", "not", "a", "plot", "sad", "fun"]


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    path = tmp_path_factory.mktemp("roberta")
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=40, pad_token_id=0)).save_pretrained(path)
    return str(path)


def _csv(path, labels):
    texts = ["very sad film", "fun plot", "a good film", "bad plot", "not good"]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *[[texts[i % 5], label] for i, label in enumerate(labels)]])
    return str(path)


def test_glue_noise_on_training_labels_only(tmp_path, trainers, tiny_roberta):
    import run_glue

    train = _csv(tmp_path / "train.csv", [["neg", "neu", "pos"][i % 3] for i in range(40)])
    dev = _csv(tmp_path / "dev.csv", ["neg", "neu", "pos"] * 3)
    data = ["--model_name_or_path", tiny_roberta, "--train_file", train, "--validation_file", dev, *FAST]
    run_glue.main([*data, "--output_dir", str(tmp_path / "clean"), "--holdout_fraction", "0.25"])
    run_glue.main([*data, "--output_dir", str(tmp_path / "noisy"), "--holdout_fraction", "0.25", "--label_noise", "0.2"])
    run_glue.main([*data, "--output_dir", str(tmp_path / "eval"), "--label_noise", "0.2"])
    clean, noisy, on_dev = trainers
    assert len(labels_of(noisy.train_dataset)) == 30
    changed = labels_of(noisy.train_dataset) != labels_of(clean.train_dataset)
    assert changed.sum() == 6 and set(labels_of(noisy.train_dataset)) <= {0, 1, 2}
    assert labels_of(noisy.eval_dataset).tolist() == labels_of(clean.eval_dataset).tolist()  # held out: clean
    assert labels_of(on_dev.eval_dataset).tolist() == [0, 1, 2] * 3  # the validation file: clean
    assert (labels_of(on_dev.train_dataset) != np.arange(40) % 3).sum() == 8
    saved = json.loads((tmp_path / "noisy" / "all_results.json").read_text())
    assert saved["label_noise_flipped"] == 6 and saved["label_noise_fraction"] == pytest.approx(0.2)


def test_glue_refuses_noise_on_regression_labels(tmp_path, trainers, tiny_roberta):
    import run_glue

    from hf_flat.scripts import ScriptError

    train = _csv(tmp_path / "train.csv", [0.5 * (i % 5) for i in range(20)])
    with pytest.raises(ScriptError, match=r"--label_noise 0.1: .*regression target.*cannot be flipped"):
        run_glue.main(["--model_name_or_path", tiny_roberta, "--train_file", train, "--output_dir", str(tmp_path / "o"),
                       "--eval_strategy", "no", "--label_noise", "0.1", *FAST])
    with pytest.raises(ScriptError, match=r"--label_noise 0.1: STS-B.*cannot be flipped"):  # before any download
        run_glue.main(["--task_name", "stsb", "--output_dir", str(tmp_path / "o"), "--label_noise", "0.1", *FAST])
    assert trainers == []


def test_bad_values_are_refused_with_one_line_before_any_data_is_read(tmp_path):
    import run_glue
    import run_vit

    with pytest.raises(UsageError, match=r"--label_noise 1.0: the share of training labels to replace must lie in \[0, 1\)"):
        run_vit.main(["--output_dir", str(tmp_path), "--label_noise", "1.0", *FAST])
    with pytest.raises(UsageError, match=r"--label_noise -0.2: .*\[0, 1\)"):
        run_glue.main(["--task_name", "rte", "--output_dir", str(tmp_path), "--label_noise", "-0.2", *FAST])
    done = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "vit", "run_vit.py"),
                           "--output_dir", str(tmp_path), "--label_noise", "1.5"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "run_vit.py: error: --label_noise 1.5: the share of training labels to replace must lie in [0, 1) "
        "(0 = clean labels, 0.2 = 20% of them replaced)")
