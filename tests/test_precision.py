"""bf16 autocast and the fp16 GradScaler path, on CPU."""

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from hf_flat.methods import asam_perturbation, sam_perturbation
from helpers import RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_two_pass, sgd_args


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_bf16_autocast_on_cpu_matches_reference_under_the_same_autocast(tmp_path, method):
    initial = TinyNet()
    collator = RecordingCollator()
    trainer = FlatTrainer(
        model=copy.deepcopy(initial),
        args=sgd_args(tmp_path, flat_method=method, sam_rho=0.5, bf16=True),
        train_dataset=TinyData(),
        data_collator=collator,
    )
    trainer.train()
    steps = group_steps(collator.batches, 1, trainer.state.global_step)
    expected = reference_two_pass(initial, steps, method, rho=0.5, autocast=torch.bfloat16)
    assert_same_weights(trainer.model, expected, atol=1e-5)
    # the autocast really was on: a float32 reference ends elsewhere
    fp32 = reference_two_pass(initial, steps, method, rho=0.5)
    assert not torch.allclose(trainer.model.fc1.weight, fp32.fc1.weight, atol=1e-5)


def test_perturbation_functions_keep_non_finite_gradients_non_finite_on_the_device():
    """A non-finite g gives a non-finite e (read by no one on the host), so that pass 2's gradient
    and the step's are non-finite too and the GradScaler skips the step."""
    w = [torch.ones(3), torch.ones(2)]
    for bad in (float("inf"), float("nan")):
        e = sam_perturbation([torch.tensor([bad, 1.0, 2.0]), torch.ones(2)], rho=0.05)
        assert not all(torch.isfinite(t).all() for t in e)
        e = asam_perturbation(["a.weight", "a.bias"], w, [torch.tensor([bad, 1.0, 2.0]), torch.ones(2)], 0.5, 0.01)
        assert not all(torch.isfinite(t).all() for t in e)
    e = sam_perturbation([torch.tensor([3.0, 0.0]), torch.tensor([4.0])], rho=1.0)
    torch.testing.assert_close(torch.cat(e), torch.tensor([0.6, 0.0, 0.8]))


class Recorder(TrainerCallback):
    """Weights and loss scale after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.scales = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append({k: v.clone() for k, v in self.trainer.model.state_dict().items()})
        self.scales.append(self.trainer.accelerator.scaler.get_scale())


def scaler_trainer(tmp_path, model, init_scale, collator=None, **overrides):
    trainer = FlatTrainer(
        model=model,
        args=sgd_args(tmp_path, **overrides),
        train_dataset=TinyData(),
        data_collator=collator or RecordingCollator(),
    )
    # What accelerate builds for fp16 on a GPU, on the CPU: backward scales the loss, the
    # AcceleratedOptimizer steps through the scaler, clipping unscales first.
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
    trainer.accelerator.scaler = scaler
    trainer.accelerator.unscale_gradients = lambda optimizer=None: scaler.unscale_(trainer.optimizer.optimizer)
    return trainer


@pytest.mark.parametrize("method", ["sam", "asam"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_scaled_gradients_give_the_unscaled_result(tmp_path, method, max_grad_norm):
    """e is computed from gradients multiplied by the loss scale: the scale cancels out."""
    initial = TinyNet()
    collator = RecordingCollator()
    trainer = scaler_trainer(
        tmp_path, copy.deepcopy(initial), 2.0**14, collator,
        flat_method=method, sam_rho=0.5, gradient_accumulation_steps=2, max_grad_norm=max_grad_norm,
    )
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**14  # no overflow happened
    steps = group_steps(collator.batches, 2, trainer.state.global_step)
    expected = reference_two_pass(initial, steps, method, rho=0.5, max_grad_norm=max_grad_norm)
    assert_same_weights(trainer.model, expected, atol=1e-6)


class LargeLossNet(TinyNet):
    """Loss x 1000: times a loss scale of 2^127 it overflows float32."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return {**out, "loss": out["loss"] * 1000}


def test_overflow_skips_the_perturbation_and_the_step(tmp_path):
    """A huge loss scale makes pass-1 gradients inf: a non-finite perturbation and pass-2 gradient,
    the scaler skips the step, backs off, and training goes on with no NaN in the weights; the
    skipped steps' perturbed values stay out of the logged averages."""
    initial = LargeLossNet()
    trainer = scaler_trainer(
        tmp_path, copy.deepcopy(initial), 2.0**127,
        flat_method="sam", sam_rho=0.5, num_train_epochs=20, learning_rate=1e-4, gradient_accumulation_steps=2,
    )
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    before = initial.state_dict()
    skipped = taken = 0
    for i, (weights, scale) in enumerate(zip(recorder.weights, recorder.scales)):
        previous_scale = recorder.scales[i - 1] if i else 2.0**127
        assert all(torch.isfinite(v).all() for v in weights.values())
        changed = any(not torch.equal(weights[k], before[k]) for k in weights)
        if scale < previous_scale:  # the scaler found inf: step skipped, no perturbation
            skipped += 1
            assert not changed
            assert "perturbed_loss" not in logs[i] and "sharpness" not in logs[i]
        else:
            taken += 1
            assert changed
            assert logs[i]["perturbed_loss"] > logs[i]["loss"]
        before = weights
    assert skipped >= 5 and taken >= 5, (skipped, taken)


class FirstPassOverflows(TinyNet):
    """Only pass 1 of one micro-batch overflows (as dropout can make one pass overflow and not
    the other): forward call 1 is pass 1 of micro-batch 1, call 3 pass 1 of micro-batch 2."""

    calls = 0
    overflowing_call = 1

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.calls += 1
        return {**out, "loss": out["loss"] * 1e36} if self.calls == self.overflowing_call else out


@pytest.mark.parametrize("overflowing_call", [1, 3])
def test_overflow_in_the_first_pass_alone_still_skips_the_step(tmp_path, overflowing_call):
    """Pass 2 is finite here; the non-finite pass-1 gradient must still reach the scaler."""
    initial = FirstPassOverflows()
    initial.overflowing_call = overflowing_call
    trainer = scaler_trainer(tmp_path, copy.deepcopy(initial), 2.0**14, flat_method="asam", gradient_accumulation_steps=2)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.scales == [2.0**13, 2.0**13]
    for k, v in initial.state_dict().items():
        assert torch.equal(recorder.weights[0][k], v), k  # step 1 skipped
    assert any(not torch.equal(recorder.weights[1][k], v) for k, v in initial.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
