"""SAF and MESA on the model families the Trainer supports: per-token encoders and causal LMs (which
positions are compared), multi-label heads (a per-label Bernoulli KL), tuple outputs, question
answering (refused), `BatchEncoding` examples, and runs too short for the term to ever start."""

import logging
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BatchEncoding, BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
    BertForTokenClassification, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration, TrainerCallback,
)

import hf_flat.methods.mesa as mesa_module
from hf_flat import FlatTrainer
from hf_flat.methods.trajectory import (
    BERNOULLI, SQUARED_ERROR, head_kind, is_causal_lm, trajectory_loss, valid_positions,
)
from helpers import TinyData, TinyNet, assert_same_weights, sgd_args


def bert_config(**overrides):
    return BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))


def peft_gpt2():
    return get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))


# ---- 1. which positions MESA compares ----------------------------------------------------------------
def test_only_causal_lms_shift_their_labels():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2))
    assert is_causal_lm(gpt2()) and is_causal_lm(peft_gpt2())

    class MyCausalLM(GPT2LMHeadModel):  # a user's subclass: its own name is in no mapping
        pass

    assert is_causal_lm(MyCausalLM(gpt2().config))
    for model in (BertForTokenClassification(bert_config()), BertForMaskedLM(bert_config()), t5, TinyNet()):
        assert not is_causal_lm(model), type(model).__name__


def test_pre_shifted_labels_are_not_shifted_again():
    logits, shift_labels = torch.zeros(1, 4, 5), torch.tensor([[2, 3, -100, -100]])
    inputs = {"labels": torch.tensor([[1, 2, 3, -100]]), "shift_labels": shift_labels}
    assert valid_positions(inputs, logits, causal=True).tolist() == [[True, True, False, False]]


LABELS = [-100, 1, 3, 4, -100, -100]


@pytest.mark.parametrize("make_model, labels, expected", [
    (lambda: BertForTokenClassification(bert_config(num_labels=5)), LABELS, [0, 1, 1, 1, 0, 0]),
    (lambda: BertForMaskedLM(bert_config()), [-100, -100, -100, 7, -100, -100], [0, 0, 0, 1, 0, 0]),
    (gpt2, [2, 5, 7, 9, -100, -100], [1, 1, 1, 0, 0, 0]),  # position t predicts label t + 1
    (peft_gpt2, [2, 5, 7, 9, -100, -100], [1, 1, 1, 0, 0, 0]),
], ids=["token-classification", "masked-lm", "causal-lm", "peft-causal-lm"])
def test_mesa_compares_the_labelled_positions(tmp_path, monkeypatch, make_model, labels, expected):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["valid"])
        return trajectory_loss(*args, **kwargs)

    monkeypatch.setattr(mesa_module, "trajectory_loss", spy)
    examples = [{"input_ids": torch.tensor([1, 4, 5, 6, 7, 8]), "labels": torch.tensor(labels)}] * 2
    FlatTrainer(model=make_model(), train_dataset=examples, args=sgd_args(
        tmp_path, flat_method="mesa", mesa_start_epoch=0, max_steps=1, per_device_train_batch_size=2)).train()
    assert len(seen) == 1 and seen[0].tolist() == [[bool(v) for v in expected]] * 2


# ---- 2. a start epoch the run never reaches ----------------------------------------------------------
@pytest.mark.parametrize("method, overrides, epochs, named", [
    ("mesa", {}, 3, "mesa_start_epoch=5"),  # the defaults: start epoch 5, 3 epochs
    ("saf", {}, 3, "saf_start_epoch=5"),
    ("saf", {"saf_start_epoch": 0, "saf_past_epochs": 3}, 3, "saf_past_epochs=3"),  # no target before epoch 3
])
def test_a_term_that_never_starts_warns_and_keeps_nothing(tmp_path, caplog, method, overrides, epochs, named):
    trainer = FlatTrainer(model=TinyNet(), train_dataset=TinyData(n=4),  # one step per epoch
                          args=sgd_args(tmp_path, flat_method=method, num_train_epochs=epochs, **overrides))
    with caplog.at_level(logging.WARNING, logger="hf_flat"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "would never be used" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{named}, but training runs {epochs} epoch(s), numbered 0 to {epochs - 1}" in warnings[0]
    assert "num_train_epochs" in warnings[0] and f"Lower {named.split('=')[0]}" in warnings[0]
    if method == "mesa":
        assert trainer.trajectory.teacher is None
    else:
        assert trainer.trajectory.logits is None and trainer.trajectory.nbytes == 0
    assert not any("trajectory_loss" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_a_term_that_starts_before_the_last_epoch_is_kept(tmp_path, caplog, method):
    trainer = FlatTrainer(model=TinyNet(), train_dataset=TinyData(n=4), args=sgd_args(
        tmp_path, flat_method=method, num_train_epochs=2, saf_start_epoch=1, saf_past_epochs=1, mesa_start_epoch=1))
    with caplog.at_level(logging.WARNING, logger="hf_flat"):
        trainer.train()
    assert not [r for r in caplog.records if "would never be used" in r.getMessage()]
    assert (trainer.trajectory.teacher if method == "mesa" else trainer.trajectory.logits) is not None
    assert any("trajectory_loss" in h for h in trainer.state.log_history)


# ---- 3. multi-label heads --------------------------------------------------------------------------
def bernoulli_kl_by_hand(target, logits, tau):
    """sum over labels of KL(Bern(p) || Bern(q)), p = sigmoid(target / tau), q = sigmoid(logits / tau)."""
    p, q = torch.sigmoid(target.double() / tau), torch.sigmoid(logits.double() / tau)
    return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)


def test_multi_label_term_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(4, 5, generator=g), 3 * torch.randn(4, 5, generator=g)
    has = torch.tensor([True, False, True, True])
    expected = 0.3 * 2.0**2 * (bernoulli_kl_by_hand(target, logits, 2.0) * has).sum() / 4
    term = trajectory_loss(logits, target, 0.3, 2.0, has_target=has, kind=BERNOULLI)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    model = BertForSequenceClassification(bert_config(num_labels=5))
    model(input_ids=torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 5))  # sets config.problem_type
    assert head_kind(model, logits) == BERNOULLI
    # regression with several outputs: squared error summed over the outputs, not a softmax KL
    model = BertForSequenceClassification(bert_config(num_labels=5, problem_type="regression"))
    assert head_kind(model, logits) == SQUARED_ERROR
    expected = 0.3 * ((logits - target) ** 2).sum(-1).mean()
    assert trajectory_loss(logits, target, 0.3, 2.0, kind=SQUARED_ERROR).item() == pytest.approx(expected.item())


class LogitsRecorder(TrainerCallback):
    """Training forwards of the model (epoch, input_ids, logits) and of the MESA teacher (logits)."""

    def __init__(self, trainer):
        self.trainer, self.student, self.teacher, self.hooked = trainer, [], [], False
        trainer.model.register_forward_hook(self.record_student, with_kwargs=True)
        trainer.add_callback(self)

    def record_student(self, module, args, kwargs, output):
        if module.training:
            self.student.append((int(self.trainer.state.epoch), kwargs["input_ids"], output["logits"].detach()))

    def on_step_begin(self, args, state, control, **kwargs):
        teacher = getattr(self.trainer.trajectory, "teacher", None)
        if teacher is not None and not self.hooked:
            teacher.register_forward_hook(lambda m, a, out: self.teacher.append(out["logits"]))
            self.hooked = True


def multi_label_data(n=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (n, 5), generator=g)
    labels = torch.randint(0, 2, (n, 3), generator=g).float()  # float multi-hot: multi-label problem type
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


@pytest.mark.parametrize("method", ["mesa", "saf"])
def test_multi_label_bert_logs_the_bernoulli_term(tmp_path, method):
    torch.manual_seed(0)
    data = multi_label_data()
    args = sgd_args(tmp_path, flat_method=method, num_train_epochs=2, per_device_train_batch_size=4, mesa_tau=2.0,
                    mesa_lambda=0.5, mesa_decay=0.5, mesa_start_epoch=0, saf_tau=2.0, saf_start_epoch=1,
                    saf_past_epochs=1, learning_rate=1.0)
    model = BertForSequenceClassification(bert_config(num_labels=3, initializer_range=0.5))  # logits far from 0
    trainer = FlatTrainer(model=model, args=args, train_dataset=data)
    rec = LogitsRecorder(trainer)
    trainer.train()
    assert trainer.model.config.problem_type == "multi_label_classification"
    logged = [h.get("trajectory_loss") for h in trainer.state.log_history if "loss" in h]
    if method == "mesa":
        expected = [0.5 * 4 * bernoulli_kl_by_hand(t, s, 2.0).mean() for t, (_, _, s) in zip(rec.teacher, rec.student)]
    else:  # the target: the logits of the same sample one epoch earlier, stored in float16
        index = {tuple(d["input_ids"].tolist()): i for i, d in enumerate(data)}
        past = {(e, index[tuple(row.tolist())]): out for e, ids, s in rec.student for row, out in zip(ids, s)}
        expected = [
            0.3 * 4 * bernoulli_kl_by_hand(torch.stack([past[(e - 1, index[tuple(r.tolist())])].half().float()
                                                         for r in ids]), s, 2.0).mean()
            for e, ids, s in rec.student if e >= 1
        ]
        logged = logged[2:]  # epoch 0: no term
    assert len(logged) == len(expected) == (4 if method == "mesa" else 2) and max(logged) > 1e-2
    assert logged == pytest.approx([e.item() for e in expected], rel=1e-4, abs=1e-8)


# ---- 4. tuple outputs, and outputs without logits ----------------------------------------------------
class TupleNet(TinyNet):
    """TinyNet returning tuples, like a Hugging Face model with ``return_dict=False``: (loss, logits)
    when given labels, else (logits,)."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)


@pytest.mark.parametrize("method, smoothing", [("saf", 0.0), ("mesa", 0.0), ("saf", 0.1), ("mesa", 0.1)],
                         ids=["saf", "mesa", "saf-labels-popped", "mesa-labels-popped"])  # smoothing pops the labels
def test_tuple_outputs_train_like_dict_outputs(tmp_path, method, smoothing):
    results = []
    for model in (TinyNet(), TupleNet()):  # same seed: same initial weights
        model.config = SimpleNamespace()  # label smoothing reads model.config.problem_type
        args = sgd_args(tmp_path / type(model).__name__, flat_method=method, num_train_epochs=2,
                        label_smoothing_factor=smoothing, saf_start_epoch=1, saf_past_epochs=1, mesa_start_epoch=1,
                        mesa_decay=0.5)
        trainer = FlatTrainer(model=model, args=args, train_dataset=TinyData(n=8))
        trainer.train()
        results.append(trainer)
    assert_same_weights(results[0].model, results[1].model)
    terms = [[h.get("trajectory_loss") for h in t.state.log_history if "loss" in h] for t in results]
    assert terms[0] == pytest.approx(terms[1]) and any(v and v > 0 for v in terms[0])


@pytest.mark.parametrize("method, return_dict", [("saf", True), ("mesa", False)])
def test_question_answering_is_refused_clearly(tmp_path, method, return_dict):
    model = BertForQuestionAnswering(bert_config(return_dict=return_dict))
    examples = [{"input_ids": torch.tensor([1, 4, 5, 6]), "start_positions": torch.tensor(1),
                 "end_positions": torch.tensor(2)}] * 2
    trainer = FlatTrainer(model=model, train_dataset=examples, args=sgd_args(
        tmp_path, flat_method=method, saf_start_epoch=1, saf_past_epochs=1, mesa_start_epoch=0, num_train_epochs=2))
    with pytest.raises(ValueError, match=r"BertForQuestionAnswering returned .*start.*no `logits`.*flat_method='sam'"):
        trainer.train()


# ---- 5. BatchEncoding examples ---------------------------------------------------------------------
class EncodedData(TinyData):
    def __getitem__(self, i):
        return BatchEncoding(super().__getitem__(i))


def test_saf_takes_batch_encoding_examples(tmp_path):
    runs = []
    for data in (TinyData(n=8), EncodedData(n=8)):
        args = sgd_args(tmp_path / type(data).__name__, flat_method="saf", num_train_epochs=2, saf_start_epoch=1,
                        saf_past_epochs=1)
        runs.append(FlatTrainer(model=TinyNet(), args=args, train_dataset=data))
        runs[-1].train()
    assert_same_weights(runs[0].model, runs[1].model)
    assert (runs[1].trajectory.epochs == 1).all() and runs[1].state.log_history[-2]["trajectory_loss"] > 0


def test_saf_is_refused_for_language_models_only():
    from transformers import (
        BartConfig, BartForConditionalGeneration, BartForSequenceClassification, GPT2Config, GPT2LMHeadModel,
    )

    from hf_flat.methods.trajectory import is_language_model

    bart = dict(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=16)
    assert is_language_model(GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)))
    assert is_language_model(BartForConditionalGeneration(BartConfig(**bart)))
    # an encoder-decoder classifier has one row of logits per sample: SAF's memory fits it
    assert not is_language_model(BartForSequenceClassification(BartConfig(num_labels=3, **bart)))
    assert not is_language_model(TinyNet())
