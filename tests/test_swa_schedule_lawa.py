"""SWA's learning-rate schedule (anneal, cycles) and LAWA, against the formulas and hand references:
the learning rate at every step, the snapshots, the averaged weights, exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from helpers import TinyData, TinyNet, sgd_args

LR = 0.1


class Recorder(TrainerCallback):
    """The learning rate each optimizer step used, the live weights after it, and the steps after
    which the averaging took a snapshot."""

    def __init__(self, trainer=None):
        self.lrs, self.weights, self.snapshots, self.trainer, self.count = {}, {}, [], trainer, 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.named_parameters()}
        count = self.trainer.averaging.count  # (the averaging callback runs first)
        if count != self.count:
            self.snapshots.append(state.global_step)
            self.count = count


def train(folder, method="swa", resume=None, n=32, epochs=2, **extra):
    """TinyNet, batch 4, SGD with lr 0.1: 8 steps per epoch."""
    args = sgd_args(folder, flat_method=method, num_train_epochs=epochs, save_strategy="steps", save_steps=2, **extra)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=n))
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def user_lr(t, total, schedule):
    """The Trainer's own schedule at optimizer step t (1-based): constant, or linear decay to 0."""
    return LR if schedule == "constant" else LR * (total - (t - 1)) / total


def swa_lr_at(t, s, lr_s, swa_lr, anneal=0, strategy="cos", cycle=0):
    """The formulas of hf_flat/swa_schedule.py, written out."""
    k = t - s
    if cycle:
        tau = (k % cycle + 1) / cycle
        return (1 - tau) * lr_s + tau * swa_lr
    if anneal == 0:
        return swa_lr
    x = min(1.0, k / anneal)
    f = (1 - math.cos(math.pi * x)) / 2 if strategy == "cos" else x
    return swa_lr * f + lr_s * (1 - f)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("anneal, strategy, cycle", [(3, "cos", 0), (3, "linear", 0), (0, "cos", 0), (0, "cos", 3)])
def test_learning_rate_at_every_step(tmp_path, schedule, anneal, strategy, cycle):
    trainer, rec = train(tmp_path, lr_scheduler_type=schedule, average_start=0.3, swa_lr=0.02,
                         swa_anneal_steps=anneal, swa_anneal_strategy=strategy, swa_cycle_steps=cycle)
    total = trainer.state.global_step
    s = math.ceil(0.3 * total)  # 5 of 16
    assert (total, s) == (16, 5)
    expected = {t: user_lr(t, total, schedule) if t < s else
                swa_lr_at(t, s, user_lr(s, total, schedule), 0.02, anneal, strategy, cycle) for t in range(1, total + 1)}
    assert rec.lrs == pytest.approx(expected, abs=1e-12)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged) == total  # the logged rate is the schedule's
    if cycle:  # snapshots at each cycle's end: steps s + 2, s + 5, ...
        assert rec.snapshots == [t for t in range(s, total + 1) if (t - s + 1) % cycle == 0] == [7, 10, 13, 16]
        assert all(rec.lrs[t] == pytest.approx(0.02) for t in rec.snapshots)


def test_swa_with_the_schedule_is_the_mean_of_sgd_iterates_under_that_schedule(tmp_path):
    """Hand reference: plain SGD on the recorded batches with the formula's rates; the final model
    is the mean of the weights at the snapshot steps (epoch ends)."""
    from helpers import RecordingCollator

    collator = RecordingCollator()
    args = sgd_args(tmp_path, flat_method="swa", num_train_epochs=4, average_start=0.5, swa_lr=0.03,
                    swa_anneal_steps=2, swa_anneal_strategy="linear")
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=16), data_collator=collator)
    trainer.train()
    model = TinyNet()
    total, s = 16, 8
    snapshots = []
    for t, batch in enumerate(collator.batches, start=1):
        lr = LR if t < s else swa_lr_at(t, s, LR, 0.03, 2, "linear")
        loss = F.cross_entropy(model(batch["x"])["logits"], batch["labels"])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(lr * g)
        if t >= s and t % 4 == 0:  # epoch ends (4 steps per epoch) from step s on
            snapshots.append({k: v.clone() for k, v in model.named_parameters()})
    assert len(collator.batches) == total and len(snapshots) == 3
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), torch.stack([w[name] for w in snapshots]).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, extra", [
    ("swa", dict(swa_lr=0.02, swa_cycle_steps=3, average_start=0.3)),
    ("ema", dict(swa_lr=0.02, swa_anneal_steps=4, average_start=0.3, lr_scheduler_type="linear")),
    ("lawa", dict(lawa_k=6, average_freq=2, average_start=0.25)),  # the final window holds step 6, from before the resume
    ("sam+lawa", dict(lawa_k=2, average_start=0.25, swa_lr=0.05, swa_anneal_steps=2)),
])
def test_a_resumed_run_continues_the_schedule_and_the_average_exactly(tmp_path, method, extra):
    whole, rec = train(tmp_path / "run", method, **extra)
    resumed, rec2 = train(tmp_path / "run", method, resume=str(tmp_path / "run" / "checkpoint-6"), **extra)
    assert resumed.state.global_step == whole.state.global_step == 16
    assert {t: rec2.lrs[t] for t in range(7, 17)} == pytest.approx({t: rec.lrs[t] for t in range(7, 17)}, abs=1e-12)
    for (name, p), (_, q) in zip(resumed.model.named_parameters(), whole.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("freq", [1, 3, 0])
def test_lawa_is_the_mean_of_the_latest_k_snapshots(tmp_path, freq):
    trainer, rec = train(tmp_path, "lawa", lawa_k=3, average_freq=freq, average_start=0.25, epochs=4)
    total = trainer.state.global_step
    s = math.ceil(0.25 * total)
    taken = [t for t in range(s, total + 1) if (t % freq == 0 if freq else t % 8 == 0)]
    assert rec.snapshots == taken and len(taken) > 3  # the window slid
    window = trainer.averaging.window
    assert len(window) == 3  # the latest 3, oldest first
    for snapshot, t in zip(window, taken[-3:]):
        for name, w in snapshot.items():
            assert torch.equal(w, rec.weights[t][name])
    for name, p in trainer.model.named_parameters():
        expected = torch.stack([rec.weights[t][name] for t in taken[-3:]]).mean(0)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    # memory: exactly k float32 copies of the trainable weights
    trainable = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    assert sum(w.nbytes for snapshot in window for w in snapshot.values()) == 3 * trainable


def test_lawa_evaluates_the_window_mean_during_training(tmp_path):
    args = sgd_args(tmp_path, flat_method="lawa", lawa_k=2, average_freq=1, average_start=0.0, max_steps=5,
                    eval_strategy="steps", eval_steps=5)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=32), eval_dataset=TinyData(n=8, seed=3))
    rec = Recorder(trainer)
    trainer.add_callback(rec)
    trainer.train()
    model = TinyNet()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((rec.weights[4][name] + rec.weights[5][name]) / 2)
        data = TinyData(n=8, seed=3)
        loss = F.cross_entropy(model(data.x)["logits"], data.y).item()
    avg = [h["eval_avg_loss"] for h in trainer.state.log_history if "eval_avg_loss" in h]
    assert avg == [pytest.approx(loss, abs=1e-6)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(flat_method="swa", swa_lr=0.0), r"swa_lr=0.0 is not allowed: it must be None or a finite number > 0"),
        (dict(flat_method="swa", swa_lr=0.1, swa_anneal_strategy="exp"), r"swa_anneal_strategy='exp' is not allowed"),
        (dict(flat_method="swa", swa_cycle_steps=3), r"swa_cycle_steps=3 needs swa_lr"),
        (dict(flat_method="swa", swa_lr=0.1, swa_cycle_steps=3, swa_anneal_steps=2),
         r"swa_anneal_steps=2 is not allowed with swa_cycle_steps=3"),
        (dict(flat_method="swa", swa_lr=0.1, swa_cycle_steps=3, average_freq=2),
         r"average_freq=2 is not allowed with swa_cycle_steps=3: .* Set average_freq to 0 or 3"),
        (dict(flat_method="sam", swa_lr=0.1), r"swa_lr=0.1 is not allowed with flat_method='sam'"),
        (dict(flat_method="lawa", lawa_k=0), r"lawa_k=0 is not allowed: it must be an integer >= 1"),
        (dict(flat_method="swa", swa_anneal_steps=-1), r"swa_anneal_steps=-1 is not allowed"),
    ],
)
def test_bad_schedule_and_lawa_values_are_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        sgd_args(tmp_path, **extra)


def test_resuming_lawa_with_a_smaller_window_is_refused(tmp_path):
    train(tmp_path / "run", "lawa", lawa_k=3, average_freq=1, average_start=0.0)
    with pytest.raises(ValueError, match=r"LAWA window holds 3 snapshots but lawa_k=2"):
        train(tmp_path / "run", "lawa", lawa_k=2, average_freq=1, average_start=0.0,
              resume=str(tmp_path / "run" / "checkpoint-6"))


def test_gsam_rho_follows_swa_s_schedule_too(tmp_path):
    """With gsam_rho_min, GSAM's rho follows the learning rate between its extremes over the run,
    SWA's schedule included: at the cycle's end (swa_lr, the smallest rate) rho is gsam_rho_min."""
    rhos = {}

    class Rho(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rhos[state.global_step + 1] = trainer.perturbation.rho

    args = sgd_args(tmp_path, flat_method="gsam+swa", num_train_epochs=2, sam_rho=0.5, gsam_rho_min=0.1,
                    average_start=0.5, swa_lr=0.02, swa_cycle_steps=4)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData(n=16), callbacks=[Rho()])
    rec = Recorder(trainer)
    trainer.add_callback(rec)
    trainer.train()
    lr_min, lr_max = 0.02, LR
    for t, lr in rec.lrs.items():
        assert rhos[t] == pytest.approx(0.1 + (0.5 - 0.1) * (lr - lr_min) / (lr_max - lr_min)), t
    assert rhos[3] == pytest.approx(0.5) and rhos[7] == pytest.approx(0.1)  # before SWA; a cycle's end (s + 3)
