"""Averaged evaluation on top of other trainers (`Seq2SeqTrainer` generating, TRL's metrics),
`WeightAveraging` as a callback on trainers that are not flat, and model cards."""

import copy
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, T5ForConditionalGeneration, Trainer,
    TrainerCallback, TrainingArguments, default_data_collator,
)

from hf_flat import FlatSeq2SeqTrainer, FlatSeq2SeqTrainingArguments, FlatTrainer, WeightAveraging, flat_trainer_class
from helpers import LM_TEXTS, TinyData, TinyNet, save_tiny_t5, sgd_args, tiny_llama, tiny_lm_tokenizer


class Snapshots(TrainerCallback):
    """The trainable weights after each optimizer step, by name."""

    def __init__(self):
        self.after = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def mean_of(snapshots):
    return {n: torch.stack([s[n] for s in snapshots]).mean(0) for n in snapshots[0]}


def holding(model, weights):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    return model


# ---- Seq2Seq with generation ----------------------------------------------------------------------------------
PAIRS = [("who wrote hamlet", "shakespeare"), ("capital of france", "paris"), ("who wrote the play", "shakespeare"),
         ("the capital city of france", "paris")]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = save_tiny_t5(tmp_path_factory.mktemp("t5"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = [{"input_ids": tokenizer(q)["input_ids"], "labels": tokenizer(a)["input_ids"]} for q, a in PAIRS] * 2
    return path, tokenizer, data


def exact_match(tokenizer, lengths):
    def compute(prediction):
        predictions = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, tokenizer.pad_token_id, prediction.label_ids)
        lengths.append(predictions.shape[1])
        said = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        wanted = tokenizer.batch_decode(labels, skip_special_tokens=True)
        # (the tiny model rarely gets an answer right: the mean generated token id tells generations apart)
        return {"exact": float(np.mean([s.strip() == w.strip() for s, w in zip(said, wanted)])),
                "mean_token": float(predictions.mean())}
    return compute


def seq2seq_args(output_dir, cls, **overrides):
    values = dict(output_dir=str(output_dir), optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                  weight_decay=0.0, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
                  predict_with_generate=True, generation_max_length=3, eval_strategy="steps", eval_steps=2,
                  logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    values.update(overrides)
    return cls(**values)


def test_seq2seq_swa_generates_for_the_average_and_passes_generation_keywords(tmp_path, t5):
    path, tokenizer, data = t5
    model = T5ForConditionalGeneration.from_pretrained(path)
    lengths, snapshots = [], Snapshots()
    args = seq2seq_args(tmp_path, FlatSeq2SeqTrainingArguments, flat_method="swa", average_start=0.25, average_freq=1)
    trainer = FlatSeq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                                 compute_metrics=exact_match(tokenizer, lengths), callbacks=[snapshots])
    trainer.train()
    evaluations = [h for h in trainer.state.log_history if "eval_exact" in h]
    assert len(evaluations) == 2 and all("eval_avg_exact" in h and "eval_avg_loss" in h for h in evaluations)

    # eval_avg_* at step 2 is the plain Seq2SeqTrainer's evaluation of the mean of the snapshots after steps 1, 2
    reference = Seq2SeqTrainer(model=holding(model, mean_of(snapshots.after[:2])),
                               args=seq2seq_args(tmp_path / "r", Seq2SeqTrainingArguments),
                               eval_dataset=data[:4], data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                               processing_class=tokenizer, compute_metrics=exact_match(tokenizer, []))
    expected = reference.evaluate()
    assert evaluations[0]["eval_avg_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    assert evaluations[0]["eval_avg_exact"] == expected["eval_exact"]
    assert evaluations[0]["eval_avg_mean_token"] == pytest.approx(expected["eval_mean_token"], rel=1e-6)
    assert evaluations[0]["eval_avg_loss"] != pytest.approx(evaluations[0]["eval_loss"])  # (another model than the live one)

    # after training the model holds the average of the snapshots after steps 1-4
    for name, value in mean_of(snapshots.after).items():
        assert torch.allclose(dict(trainer.model.named_parameters())[name], value, atol=1e-6), name
    # generation keywords pass through evaluate and predict to the model's generate
    asked = spy_on_generate(trainer.model)
    trainer.evaluate(max_length=2, num_beams=2)
    assert asked[-1]["max_length"] == 2 and asked[-1]["num_beams"] == 2
    trainer.predict(data[:4], max_new_tokens=1)
    assert asked[-1]["max_new_tokens"] == 1


def spy_on_generate(model):
    asked, generate = [], model.generate

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return generate(*args, **kwargs)

    model.generate = spy
    return asked


def test_flat_trainer_over_seq2seq_accepts_evaluate_keywords_whichever_order(tmp_path, t5):
    path, tokenizer, data = t5

    class Mine(Seq2SeqTrainer, FlatTrainer):  # the flat methods still wrap Seq2SeqTrainer's evaluate
        pass

    model = T5ForConditionalGeneration.from_pretrained(path)
    lengths = []
    trainer = Mine(model=model, args=seq2seq_args(tmp_path, FlatSeq2SeqTrainingArguments, flat_method="sam",
                                                  eval_strategy="no"),
                   train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                   processing_class=tokenizer, compute_metrics=exact_match(tokenizer, lengths))
    asked = spy_on_generate(trainer.model)
    metrics = trainer.evaluate(data[:4], max_length=2, num_beams=2)
    assert "eval_exact" in metrics and asked[-1]["max_length"] == 2 and asked[-1]["num_beams"] == 2


# ---- TRL's metrics for the averaged weights ------------------------------------------------------------------
def test_sft_eval_avg_carries_trls_metrics_computed_on_the_average_only(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    FlatSFT, Config = flat_trainer_class(trl.SFTTrainer), __import__("hf_flat").flat_arguments_class(trl.SFTConfig)
    tokenizer, data = tiny_lm_tokenizer(), Dataset.from_dict({"text": LM_TEXTS})
    common = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    runs = {}
    for method in ("swa", "none"):
        snapshots = Snapshots()
        args = Config(str(tmp_path / method), flat_method=method, average_start=0.25, average_freq=1, **common)
        trainer = FlatSFT(model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data,
                          processing_class=tokenizer, callbacks=[snapshots])
        trainer.train()
        runs[method] = ([h for h in trainer.state.log_history if "eval_loss" in h], snapshots, trainer)
    averaged, live = runs["swa"][0], runs["none"][0]
    for name in ("entropy", "mean_token_accuracy", "loss"):
        # the live metrics are the live model's alone: those of the same run without averaging
        assert [h[f"eval_{name}"] for h in averaged] == pytest.approx([h[f"eval_{name}"] for h in live], rel=1e-6)
        assert all(f"eval_avg_{name}" in h for h in averaged)
    assert averaged[1]["eval_avg_entropy"] != pytest.approx(averaged[1]["eval_entropy"], rel=1e-6)

    # eval_avg_* at step 4 is the plain SFTTrainer's evaluation of a model holding the average
    snapshots = runs["swa"][1]
    reference = trl.SFTTrainer(model=holding(tiny_llama(), mean_of(snapshots.after)),
                               args=trl.SFTConfig(str(tmp_path / "r"), **common), train_dataset=data, eval_dataset=data,
                               processing_class=tokenizer)
    reference.evaluate()
    expected = reference.state.log_history[-1]  # (TRL adds its metrics to the logged record)
    for name in ("entropy", "mean_token_accuracy", "loss"):
        assert averaged[1][f"eval_avg_{name}"] == pytest.approx(expected[f"eval_{name}"], rel=1e-5), name


# ---- WeightAveraging as a callback on any trainer --------------------------------------------------------------
def plain_args(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  num_train_epochs=2, logging_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                  save_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def eval_loss(model, data):
    batch = default_data_collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        return F.cross_entropy(model.eval()(batch["x"])["logits"], batch["labels"]).item()


def callback_run(output_dir, resume=None, **overrides):
    snapshots = Snapshots()
    trainer = Trainer(model=TinyNet(), args=plain_args(output_dir, **overrides), train_dataset=TinyData(),
                      eval_dataset=TinyData(8, seed=5), data_collator=default_data_collator,
                      callbacks=[WeightAveraging("swa", start=0.5, freq=1), snapshots])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshots


def test_weight_averaging_callback_on_a_plain_trainer(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer, snapshots = callback_run(tmp_path, metric_for_best_model="eval_avg_loss", greater_is_better=False)
    assert any("runs as a plain callback" in r.getMessage() and "flat_trainer_class" in r.getMessage()
               for r in caplog.records)
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluations) == 4 and all("eval_avg_loss" in h for h in evaluations)
    assert evaluations[0]["eval_avg_loss"] == evaluations[0]["eval_loss"]  # step 2: no snapshot yet (they start at 4)
    # step 6: the loss of the mean of the snapshots after steps 4, 5, 6
    expected = eval_loss(holding(TinyNet(), mean_of(snapshots.after[3:6])), TinyData(8, seed=5))
    assert evaluations[2]["eval_avg_loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.state.best_metric == pytest.approx(min(h["eval_avg_loss"] for h in evaluations))
    # the model holds the average of steps 4-8; each checkpoint holds the average, loadable without code
    for name, value in mean_of(snapshots.after[3:]).items():
        assert torch.allclose(dict(trainer.model.named_parameters())[name], value, atol=1e-6)
    saved = load_file(os.path.join(tmp_path, "checkpoint-6", "hf_flat_averaging.safetensors"))
    for name, value in mean_of(snapshots.after[3:6]).items():
        assert torch.allclose(saved[f"averaging.{name}"], value, atol=1e-6)


def test_weight_averaging_callback_resumes_exactly(tmp_path):
    whole, _ = callback_run(tmp_path / "whole")
    resumed, _ = callback_run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-6"))
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    os.remove(tmp_path / "whole" / "checkpoint-4" / "hf_flat_averaging.safetensors")
    with pytest.raises(ValueError, match="checkpoint-4/hf_flat_averaging.safetensors does not exist"):
        callback_run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-4"))


def test_weight_averaging_callback_refusals_and_warnings(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"WeightAveraging\(start=1.5\) is not allowed: it must be a number in \[0, 1\)"):
        WeightAveraging("swa", start=1.5)
    with pytest.raises(ValueError, match="method='swag'"):
        WeightAveraging("swag")
    # no snapshot: a warning in the callback's own words, no crash (it used to read args.flat_method)
    with caplog.at_level(logging.WARNING):
        Trainer(model=TinyNet(), args=plain_args(tmp_path, eval_strategy="no", save_strategy="no", max_steps=2),
                train_dataset=TinyData(), callbacks=[WeightAveraging("swa", start=0.9, freq=5)]).train()
    assert any("WeightAveraging('swa')" in r.getMessage() and "Lower start or freq" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="BatchNorm.*flat_trainer_class"):
        Trainer(model=TinyNet(batchnorm=True), args=plain_args(tmp_path, eval_strategy="no", save_strategy="no"),
                train_dataset=TinyData(), callbacks=[WeightAveraging("ema")]).train()
    with pytest.raises(ValueError, match="already averages the weights"):
        FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="swa"), train_dataset=TinyData(),
                    callbacks=[WeightAveraging("ema")])


def test_weight_averaging_callback_on_sft(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    data, snapshots = Dataset.from_dict({"text": LM_TEXTS}), Snapshots()
    args = trl.SFTConfig(str(tmp_path), optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_steps=4,
                         per_device_train_batch_size=4, eval_strategy="steps", eval_steps=4, save_strategy="no",
                         report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data,
                             processing_class=tiny_lm_tokenizer(),
                             callbacks=[WeightAveraging("ema", start=0.25, decay=0.5), snapshots])
    trainer.train()
    assert "eval_avg_loss" in [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    average = dict(snapshots.after[0])  # EMA from step 1: v = w_1, then v = 0.5 v + 0.5 w_t
    for after in snapshots.after[1:]:
        average = {n: 0.5 * v + 0.5 * after[n] for n, v in average.items()}
    for name, value in average.items():
        assert torch.allclose(dict(trainer.model.named_parameters())[name], value, atol=1e-6), name


# ---- model cards -----------------------------------------------------------------------------------------------
def test_model_cards_name_the_flat_method_and_its_settings(tmp_path):
    trainer = FlatTrainer(model=tiny_llama(), args=sgd_args(tmp_path / "plain", flat_method="wasam", sam_rho=0.07))
    trainer.create_model_card(model_name="tiny")
    card = open(tmp_path / "plain" / "README.md").read()
    assert "hf-flat" in card and "- sam" in card and "- swa" in card  # tags in the card's metadata
    assert "Flat-minima training (hf-flat)" in card and "`sam_rho` | 0.07" in card and "arXiv 2010.01412" in card

    trl = pytest.importorskip("trl")
    from datasets import Dataset

    FlatSFT = flat_trainer_class(trl.SFTTrainer)
    args = __import__("hf_flat").flat_arguments_class(trl.SFTConfig)(
        str(tmp_path / "sft"), flat_method="mesa", report_to="none", use_cpu=True, bf16=False)
    trainer = FlatSFT(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": LM_TEXTS}),
                      processing_class=tiny_lm_tokenizer())
    trainer.create_model_card(model_name="tiny")
    card = open(tmp_path / "sft" / "README.md").read()
    assert "hf-flat" in card and "mesa" in card and "`mesa_decay` | 0.9995" in card and "arXiv 2205.14083" in card
    assert "sft" in card  # TRL's own tags stay
    assert {"hf-flat", "mesa"} <= set(trainer.model.model_tags)


def test_trl_trainers_without_trl_name_the_install_command():
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None\n"  # as if TRL were not installed
            "import hf_flat\n"
            "try:\n    hf_flat.FlatSFTTrainer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install trl" in out.stdout and "flat_trainer_class" in out.stdout, out.stdout + out.stderr
    assert "FlatSFTTrainer" in __import__("hf_flat").__all__


def test_a_trainer_with_its_own_training_loop_is_refused():
    class OwnLoop(Trainer):
        def _inner_training_loop(self, *args, **kwargs):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="OwnLoop replaces the Trainer's training loop"):
        flat_trainer_class(OwnLoop)


def test_a_base_taking_only_args_and_kwargs_gets_flat_arguments(tmp_path):
    class PassThrough(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    trainer = flat_trainer_class(PassThrough)(TinyNet(), sgd_args(tmp_path, flat_method="sam"), train_dataset=TinyData())
    assert trainer.args.flat_method == "sam" and trainer.perturbation is not None
