"""SAM and ASAM inside the Trainer, against references computed by hand (tests/helpers.py)."""

import copy

import pytest
import torch
from transformers import Trainer

from hf_flat import FlatTrainer
from helpers import (
    RecordingCollator,
    TinyData,
    TinyNet,
    assert_same_weights,
    group_steps,
    reference_two_pass,
    sgd_args,
)


def train_recorded(tmp_path, model, trainer_cls=FlatTrainer, data=None, **overrides):
    collator = RecordingCollator()
    trainer = trainer_cls(
        model=model,
        args=sgd_args(tmp_path, **overrides),
        train_dataset=data if data is not None else TinyData(),
        data_collator=collator,
    )
    trainer.train()
    return trainer, collator.batches


@pytest.mark.parametrize("method", ["sam", "asam"])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_weights_after_training_match_hand_computed_reference(tmp_path, method, grad_accum, max_grad_norm):
    initial = TinyNet()
    rho = 0.5 if method == "asam" else 0.05
    trainer, batches = train_recorded(
        tmp_path,
        copy.deepcopy(initial),
        flat_method=method,
        sam_rho=rho,
        gradient_accumulation_steps=grad_accum,
        max_grad_norm=max_grad_norm,
    )
    n_steps = trainer.state.global_step
    assert n_steps == 16 // (4 * grad_accum)
    expected = reference_two_pass(
        initial, group_steps(batches, grad_accum, n_steps), method, rho=rho, max_grad_norm=max_grad_norm
    )
    assert_same_weights(trainer.model, expected)
    # and the method did something: plain SGD on the same batches ends elsewhere
    plain = reference_two_pass(initial, group_steps(batches, grad_accum, n_steps), "none", max_grad_norm=max_grad_norm)
    assert not torch.allclose(trainer.model.fc1.weight, plain.fc1.weight, atol=1e-5)


def test_clipping_was_active_in_the_clipped_case(tmp_path):
    trainer, _ = train_recorded(tmp_path, TinyNet(), flat_method="sam", max_grad_norm=0.05)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert norms and all(n > 0.05 for n in norms)  # the 0.05 cases above really clip


def test_none_is_exactly_the_plain_trainer(tmp_path):
    initial = TinyNet()
    flat, _ = train_recorded(tmp_path / "flat", copy.deepcopy(initial), flat_method="none", gradient_accumulation_steps=2)
    plain, _ = train_recorded(tmp_path / "plain", copy.deepcopy(initial), trainer_cls=Trainer, gradient_accumulation_steps=2)
    for (name, a), b in zip(flat.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name
    flat_losses = [h["loss"] for h in flat.state.log_history if "loss" in h]
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert flat_losses == plain_losses
    assert not any("perturbed_loss" in h for h in flat.state.log_history)


def test_plain_training_arguments_are_accepted_as_none(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.123, max_steps=1)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    assert trainer.args.flat_method == "none" and trainer.args.learning_rate == 0.123
    assert trainer.perturbation is None
    trainer.train()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_batchnorm_statistics_come_from_the_first_pass_only(tmp_path, grad_accum):
    initial = TinyNet(batchnorm=True)
    trainer, batches = train_recorded(
        tmp_path, copy.deepcopy(initial), flat_method="sam", sam_rho=0.5, gradient_accumulation_steps=grad_accum
    )
    n_steps = trainer.state.global_step
    micro = group_steps(batches, grad_accum, n_steps)
    expected = reference_two_pass(initial, micro, "sam", rho=0.5)  # weights and running stats
    assert_same_weights(trainer.model, expected)
    bn = trainer.model.bn
    assert bn.num_batches_tracked.item() == n_steps * grad_accum  # one update per micro-batch

    # the statistics are the ones of forward passes at the unperturbed weights: replay them
    by_hand = copy.deepcopy(initial).train()
    for step, weights in zip(micro, _weights_along(initial, micro)):
        for batch in step:
            by_hand.load_state_dict({**weights, **_bn_buffers(by_hand)})
            by_hand(**batch)
    torch.testing.assert_close(bn.running_mean, by_hand.bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, by_hand.bn.running_var, atol=1e-6, rtol=0)


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn.")}


def _weights_along(initial, micro):
    """Weights at the start of each optimizer step of the reference run."""
    out = []
    for t in range(len(micro)):
        model = reference_two_pass(initial, micro[:t], "sam", rho=0.5) if t else copy.deepcopy(initial)
        out.append({k: v for k, v in model.state_dict().items() if not k.startswith("bn.")})
    return out


def test_logs_carry_the_perturbed_loss(tmp_path):
    initial = TinyNet()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), flat_method="sam", sam_rho=0.5)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    # step 1 by hand: L(w) and L(w + e) on the first batch at the initial weights
    model, batch = copy.deepcopy(initial), batches[0]
    loss = model(**batch)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(0.5 * g / norm)
    perturbed = model(**batch)["loss"].item()
    assert logs[0]["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert logs[0]["perturbed_loss"] == pytest.approx(perturbed, abs=1e-6)
    assert logs[0]["sharpness"] == pytest.approx(perturbed - loss.item(), abs=1e-6)
    assert perturbed > loss.item()  # the perturbation climbs


def test_perturbed_loss_is_averaged_over_the_steps_of_a_logging_window(tmp_path):
    trainer, _ = train_recorded(tmp_path, TinyNet(), flat_method="sam", logging_steps=2, gradient_accumulation_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1  # 2 optimizer steps, one logging window
    assert 0.5 < logs[0]["perturbed_loss"] < 3.0  # a per-step mean of cross-entropies, not a sum
    assert logs[0]["perturbed_loss"] - logs[0]["loss"] == pytest.approx(logs[0]["sharpness"], abs=1e-6)


def test_weights_are_restored_exactly_between_steps(tmp_path):
    """With lr = 0 the optimizer does nothing: the weights must come back bit for bit."""
    initial = TinyNet()
    trainer, _ = train_recorded(tmp_path, copy.deepcopy(initial), flat_method="asam", sam_rho=1.0, learning_rate=0.0)
    for (name, a), b in zip(trainer.model.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(a, b), name


def test_unused_parameters_are_not_perturbed(tmp_path):
    class WithUnused(TinyNet):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(3, 3)

    model = WithUnused()
    before = copy.deepcopy(model.unused.state_dict())
    trainer, _ = train_recorded(tmp_path, model, flat_method="sam", learning_rate=0.0)
    for k, v in trainer.model.unused.state_dict().items():
        assert torch.equal(v, before[k])
        assert trainer.model.unused.weight.grad is None


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_bias_only_tuning_has_no_weight_to_scale(tmp_path, method):
    """No trainable parameter is named '*weight*' (bias-only tuning, PEFT IA3 vectors): ASAM's
    T = 1 everywhere, and the step still matches the hand reference."""
    initial = TinyNet()
    for name, p in initial.named_parameters():
        p.requires_grad_("bias" in name)
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), flat_method=method, sam_rho=0.5)
    expected = reference_two_pass(initial, group_steps(batches, 1, trainer.state.global_step), method, rho=0.5)
    assert_same_weights(trainer.model, expected)
    assert torch.equal(trainer.model.fc1.weight, initial.fc1.weight)
    assert not torch.equal(trainer.model.fc1.bias, initial.fc1.bias)
