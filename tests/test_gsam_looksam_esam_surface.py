"""GSAM, LookSAM and ESAM on the rest of the Trainer's surface: exact resume (LookSAM's g_v, ESAM's
random stream, GSAM's rho schedule), the resume rule, ESAM's per-sample losses on Hugging Face
heads (encoder classifier, causal LM, seq2seq) against the models' own losses, refusals, PEFT,
tuple outputs and combinations with averaging."""

import math

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from fsdp_train import TokenData, hf_models
from hf_flat import FlatTrainer
from hf_flat.methods import LookSAM
from hf_flat.methods.esam import per_sample_losses
from hf_flat.methods.trajectory import is_causal_lm
from helpers import TinyData, TinyNet, sgd_args

RESUMABLE = {
    "looksam": dict(looksam_k=3),  # SAM steps 1, 4, 7: checkpoint-4 holds the g_v of step 4
    "esam": dict(esam_beta=0.5, esam_gamma=0.5),
    "gsam": dict(gsam_rho_min=0.01, lr_scheduler_type="linear"),
    "looksam+ema": dict(looksam_k=3, average_start=0.25),
}


def run(folder, method, resume=None, **extra):
    args = sgd_args(folder, flat_method=method, sam_rho=0.5, num_train_epochs=2, save_strategy="steps", save_steps=2,
                    **{**RESUMABLE.get(method, {}), **extra})
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=16))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def same_weights(a, b, atol=1e-6):
    return all(torch.allclose(p, q, atol=atol, rtol=0) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("method", list(RESUMABLE))
def test_resuming_is_exact(tmp_path, method, monkeypatch):
    whole = run(tmp_path / "run", method)
    assert whole.state.global_step == 8
    resumed = run(tmp_path / "run", method, resume=str(tmp_path / "run" / "checkpoint-4"))
    assert same_weights(resumed.model, whole.model)
    # the saved state matters: resuming without it ends elsewhere
    if method.startswith("looksam"):
        with safe_open(tmp_path / "run" / "checkpoint-4" / "hf_flat_state.safetensors", framework="pt") as f:
            assert {"looksam.g_v.fc1.weight", "looksam.g_v.fc2.bias"} <= set(f.keys())
        monkeypatch.setattr(LookSAM, "load_state_dict", lambda self, tensors, meta: None)
    elif method == "esam":
        from hf_flat.methods import ESAM

        monkeypatch.setattr(ESAM, "load_state_dict", lambda self, tensors, meta: None)
    else:
        return  # GSAM keeps no state: its rho follows the restored learning rate schedule
    forgetful = run(tmp_path / "run", method, resume=str(tmp_path / "run" / "checkpoint-4"))
    assert not same_weights(forgetful.model, whole.model)


def test_resuming_looksam_from_a_sam_checkpoint_is_refused(tmp_path):
    run(tmp_path / "sam", "sam")
    with pytest.raises(ValueError, match=r"Cannot resume flat_method='looksam'.*no state for looksam"):
        run(tmp_path / "sam", "looksam", resume=str(tmp_path / "sam" / "checkpoint-4"))


# ---- ESAM's per-sample losses on Hugging Face heads -------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_esam_per_sample_losses_add_up_to_the_models_own_loss(name):
    """Weighted by their counted tokens, the per-sample losses average to the loss the model itself
    returns: the classifier's mean, the causal LM's shifted token mean, the seq2seq token mean."""
    _, build, sample = hf_models()[name]
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    samples = [sample(g) for _ in range(3)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    if batch["labels"].dim() == 2:
        batch["labels"][0, 2:] = -100  # padding: fewer counted tokens in the first sample
    with torch.no_grad():
        out = model(**batch)
    losses, counted = per_sample_losses(out["logits"], batch, is_causal_lm(model))
    assert losses.shape == counted.shape == (3,)
    torch.testing.assert_close((losses * counted).sum() / counted.sum(), out["loss"].float(), atol=1e-5, rtol=0)
    if name != "bert":
        assert counted[0] < counted[1]


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_esam_trains_hugging_face_heads_with_pass_2_on_the_selected_samples(tmp_path, name):
    _, build, sample = hf_models()[name]
    torch.manual_seed(0)
    model = build()
    sizes = []
    model.register_forward_pre_hook(lambda m, a, kw: sizes.append((torch.is_grad_enabled(), len(kw["input_ids"]))),
                                    with_kwargs=True)
    args = sgd_args(tmp_path, flat_method="esam", sam_rho=0.05, esam_gamma=0.5, esam_beta=1.0, max_steps=2)
    trainer = FlatTrainer(model=model, args=args, train_dataset=TokenData(sample, n=8))
    trainer.train()
    assert sizes == [(True, 4), (False, 4), (True, 2)] * 2  # pass 1, selection, pass 2 on ceil(0.5 * 4)
    assert all(math.isfinite(h["perturbed_loss"]) for h in trainer.state.log_history if "perturbed_loss" in h)


def test_esam_refuses_models_without_a_per_sample_cross_entropy(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=1))
    data = [{"input_ids": torch.arange(3, 9), "labels": torch.tensor(0.5)} for _ in range(8)]  # regression
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="esam", max_steps=1), train_dataset=data)
    with pytest.raises(ValueError, match=r"flat_method='esam' ranks the samples of a batch by their loss.*"
                                         r"logits of shape \(4, 1\).*Use flat_method='sam'"):
        trainer.train()


# ---- PEFT, tuple outputs, averaging ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gsam", "looksam", "esam"])
def test_lora_trains_only_the_adapters_and_keeps_the_base_frozen(tmp_path, method):
    from peft import LoraConfig, get_peft_model

    _, build, sample = hf_models()["bert"]
    torch.manual_seed(0)
    model = get_peft_model(build(), LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    args = sgd_args(tmp_path, flat_method=method, sam_rho=0.5, max_steps=4, looksam_k=2, esam_beta=0.5)
    FlatTrainer(model=model, args=args, train_dataset=TokenData(sample, n=16)).train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # ESAM gave requires_grad back
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trainable)


class TupleNet(TinyNet):
    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)


@pytest.mark.parametrize("method", ["gsam", "looksam", "esam"])
def test_tuple_outputs_train_as_dict_outputs(tmp_path, method):
    trained = []
    for cls in (TinyNet, TupleNet):
        args = sgd_args(tmp_path / cls.__name__, flat_method=method, sam_rho=0.5, num_train_epochs=2, looksam_k=2)
        trainer = FlatTrainer(model=cls(), args=args, train_dataset=TinyData(n=16))
        trainer.train()
        trained.append(trainer.model)
    assert same_weights(*trained, atol=0)


class Recorder(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["gsam+swa", "looksam+ema", "esam+swa"])
def test_combinations_with_averaging_average_the_methods_own_trajectory(tmp_path, method):
    """The live trajectory is the method's own (equal to the run without averaging) and the final
    model is the SWA mean / EMA of it."""
    base = method.split("+")[0]
    plain = run(tmp_path / "plain", base)
    recorder = Recorder()
    args = sgd_args(tmp_path / "avg", flat_method=method, sam_rho=0.5, num_train_epochs=2, average_start=0.5,
                    average_freq=1, ema_decay=0.9, **{k: v for k, v in RESUMABLE.get(base, {}).items()})
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=16), callbacks=[recorder])
    trainer.train()
    live = recorder.weights
    assert all(torch.equal(live[8][k], v) for k, v in plain.model.state_dict().items())
    if method.endswith("swa"):
        expected = {k: torch.stack([live[t][k] for t in range(4, 9)]).mean(0) for k in live[8]}
    else:
        expected = {k: v.clone() for k, v in live[4].items()}
        for t in range(5, 9):
            expected = {k: 0.9 * v + 0.1 * live[t][k] for k, v in expected.items()}
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)


def test_gsam_rho_schedule_needs_a_lambda_lr_scheduler(tmp_path):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    args = sgd_args(tmp_path, flat_method="gsam", sam_rho=0.5, gsam_rho_min=0.1, max_steps=2)
    trainer = FlatTrainer(model=model, args=args, train_dataset=TinyData(n=16), optimizers=(optimizer, scheduler))
    with pytest.raises(ValueError, match=r"gsam_rho_min=0.1 makes rho follow the learning rate.*StepLR.*"
                                         r"Set gsam_rho_min=None"):
        trainer.train()
