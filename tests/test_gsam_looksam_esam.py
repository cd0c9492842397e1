"""GSAM, LookSAM and ESAM (notes/issue14_spec.md), single process, against the hand-written
reference `reference_flat_family` (tests/helpers.py)."""

import copy
import math
import random
import re

import pytest
import torch
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from helpers import (
    RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_flat_family,
    reference_where_and_when, sgd_args,
)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def train_recorded(tmp_path, model, n=16, callbacks=(), **overrides):
    collator = RecordingCollator()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, **overrides), train_dataset=TinyData(n=n),
                          data_collator=collator, callbacks=list(callbacks))
    trainer.train()
    return trainer, collator.batches


def scheduled(total, start=0.0, interval=1):
    """SAM's perturbed steps, written out: t >= s and (t - s) % interval == 0, s = max(1, ceil(start T))."""
    s = max(1, math.ceil(round(start * total, 9)))
    return {t for t in range(1, total + 1) if t >= s and (t - s) % interval == 0}


def assert_elsewhere(a, b):
    assert not torch.allclose(a.fc1.weight, b.fc1.weight, atol=ATOL), "the reference does not tell the two apart"


def assert_logs(trainer, losses, perturbed):
    """Each step's log (logging_steps=1): `loss` = L(w); `perturbed_loss` and `sharpness` on the
    steps with a perturbation only (not LookSAM's one-pass steps)."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == trainer.state.global_step == len(losses)
    assert [h["loss"] for h in logs] == pytest.approx(losses, abs=ATOL)
    for log, at_w, at_e in zip(logs, losses, perturbed):
        if at_e is None:
            assert "perturbed_loss" not in log and "sharpness" not in log
        else:
            assert log["perturbed_loss"] == pytest.approx(at_e, abs=ATOL)
            assert log["sharpness"] == pytest.approx(at_e - at_w, abs=ATOL)


def run_and_compare(tmp_path, method, grad_accum=1, max_grad_norm=0.0, epochs=3, n=16, flat=(), reference=()):
    """Train with `flat_method=method`, `sam_rho=0.5` and `flat`; compare with the reference
    given `reference`; return (trainer, steps, reference kwargs, expected model, initial model)."""
    initial = TinyNet()
    trainer, batches = train_recorded(
        tmp_path, copy.deepcopy(initial), n=n, num_train_epochs=epochs, gradient_accumulation_steps=grad_accum,
        max_grad_norm=max_grad_norm, flat_method=method, sam_rho=0.5, **dict(flat),
    )
    total = trainer.state.global_step
    assert total == epochs * n // (4 * grad_accum)
    steps = group_steps(batches, grad_accum, total)
    kwargs = dict(rho=0.5, max_grad_norm=max_grad_norm, **dict(reference))
    losses, perturbed = [], []
    expected = reference_flat_family(initial, steps, method, losses=losses, perturbed_losses=perturbed, **kwargs)
    assert_same_weights(trainer.model, expected, atol=ATOL)
    assert_logs(trainer, losses, perturbed)
    # the method is not SAM: SAM's reference on the same batches ends elsewhere
    sam = reference_where_and_when(initial, steps, "sam", rho=0.5, max_grad_norm=max_grad_norm)
    assert_elsewhere(sam, expected)
    return trainer, steps, kwargs, expected, initial


# ---- the three methods with their defaults, under accumulation and clipping ---------------------
MAIN = {
    "gsam": (dict(), dict()),  # gsam_alpha 0.4
    "looksam": (dict(), dict()),  # looksam_k 5, looksam_alpha 0.7: SAM steps 1, 6, 11 (GA 1) or 1, 6 (GA 2)
    "esam": (dict(esam_beta=1.0, esam_gamma=0.5), dict(beta=1.0, gamma=0.5)),
}


@pytest.mark.parametrize("method", list(MAIN))
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_weights_after_training_match_the_hand_reference(tmp_path, method, grad_accum, max_grad_norm):
    flat, reference = MAIN[method]
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, method, grad_accum, max_grad_norm, flat=flat, reference=reference)
    if max_grad_norm > 0:  # the clip does clip: without it the weights end elsewhere
        assert_elsewhere(reference_flat_family(initial, steps, method, **dict(kwargs, max_grad_norm=0.0)), expected)
    if method == "looksam":  # the one-pass steps use g_v: with alpha = 0 (SAM every k-th step, else plain) elsewhere
        assert_elsewhere(reference_flat_family(initial, steps, method, **dict(kwargs, alpha=0.0)), expected)
        assert trainer.perturbation.g_v is not None and len(trainer.perturbation.g_v) == 4
    if method == "esam":  # gamma = 1 (every sample) is SAM itself here; gamma = 0.5 ends elsewhere
        assert_elsewhere(reference_flat_family(initial, steps, method, **dict(kwargs, gamma=1.0)), expected)


# ---- GSAM: scope, rho schedule, SAM schedule ------------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_gsam_step_scope(tmp_path, max_grad_norm):
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "gsam", grad_accum=2, max_grad_norm=max_grad_norm, flat=dict(sam_scope="step", gsam_alpha=0.6),
        reference=dict(scope="step", alpha=0.6))
    # one decomposition of the step's gradient is not the sum of the micro-batches' decompositions
    assert_elsewhere(reference_flat_family(initial, steps, "gsam", **dict(kwargs, scope="micro")), expected)


@pytest.mark.parametrize("rho_min", [0.01, 0.0])  # 0: no perturbation at the smallest rate (the direction is g_p)
@pytest.mark.parametrize("scope", ["micro", "step"])
def test_gsam_rho_follows_the_learning_rate(tmp_path, rho_min, scope):
    initial = TinyNet()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), num_train_epochs=3, flat_method="gsam",
                                      sam_rho=0.5, gsam_rho_min=rho_min, lr_scheduler_type="linear", sam_scope=scope)
    total = trainer.state.global_step
    lrs = [0.1 * (total - t + 1) / total for t in range(1, total + 1)]  # linear decay, no warmup: step t's lr
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx(lrs, abs=1e-9)
    steps = group_steps(batches, 1, total)
    losses, perturbed = [], []
    expected = reference_flat_family(initial, steps, "gsam", rho=0.5, rho_min=rho_min, lrs=lrs, losses=losses,
                                     perturbed_losses=perturbed, scope=scope)
    assert_same_weights(trainer.model, expected, atol=ATOL)
    assert_logs(trainer, losses, perturbed)
    # rho does vary: a constant rho (same learning rates) ends elsewhere
    assert_elsewhere(reference_flat_family(initial, steps, "gsam", rho=0.5, lrs=lrs), expected)


def test_gsam_rho_min_with_a_constant_schedule_is_constant_rho(tmp_path):
    initial = TinyNet()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), num_train_epochs=2, flat_method="gsam",
                                      sam_rho=0.5, gsam_rho_min=0.01)
    steps = group_steps(batches, 1, trainer.state.global_step)
    expected = reference_flat_family(initial, steps, "gsam", rho=0.5)
    assert_same_weights(trainer.model, expected, atol=ATOL)
    assert_elsewhere(reference_flat_family(initial, steps, "gsam", rho=0.01), expected)


def test_gsam_on_a_schedule(tmp_path):
    flat = dict(sam_start=0.5, sam_interval=2)
    perturbed = scheduled(6, 0.5, 2)
    assert perturbed == {3, 5}
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "gsam", grad_accum=2, flat=flat, reference=dict(perturbed_steps=perturbed))
    assert_elsewhere(reference_flat_family(initial, steps, "gsam", **dict(kwargs, perturbed_steps=None)), expected)


# ---- LookSAM: k and sam_start ---------------------------------------------------------------------
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_looksam_k_and_start(tmp_path, grad_accum):
    flat = dict(looksam_k=3, sam_start=0.3, looksam_alpha=0.5)
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "looksam", grad_accum=grad_accum, max_grad_norm=0.05, flat=flat,
        reference=dict(k=3, start=0.3, alpha=0.5))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    sam_steps = {4, 7, 10} if grad_accum == 1 else {2, 5}  # s = ceil(0.3 T), T = 12 or 6
    assert {t for t, h in enumerate(logs, start=1) if "perturbed_loss" in h} == sam_steps
    # the steps before s are plain: starting at step 1 ends elsewhere; so does k = 5
    assert_elsewhere(reference_flat_family(initial, steps, "looksam", **dict(kwargs, start=0.0)), expected)
    assert_elsewhere(reference_flat_family(initial, steps, "looksam", **dict(kwargs, k=5)), expected)


# ---- ESAM: the parameter subset and the sample selection -----------------------------------------
@pytest.mark.parametrize("grad_accum, gamma", [(1, 1.0), (2, 0.5)])
def test_esam_parameter_subset(tmp_path, monkeypatch, grad_accum, gamma):
    from hf_flat.methods.esam import esam_subset

    flat = dict(esam_beta=0.5, esam_gamma=gamma)
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "esam", grad_accum=grad_accum, max_grad_norm=0.05, flat=flat, reference=dict(beta=0.5, gamma=gamma))
    subsets = [esam_subset(0, "0", i, 4, 0.5) for i in range(12)]  # the run's 12 micro-batches
    assert any(not all(s) for s in subsets)  # the subset is a real one on some micro-batch
    # with every tensor perturbed (and rho / beta) the weights end elsewhere
    from hf_flat.methods import esam as esam_module

    monkeypatch.setattr(esam_module, "esam_subset", lambda seed, stream, index, n, beta: [True] * n)
    assert_elsewhere(reference_flat_family(initial, steps, "esam", **kwargs), expected)


def test_esam_empty_draws_perturb_every_tensor_with_rho_unscaled(tmp_path):
    """beta 0.1 on 4 tensors: most draws are empty ((0.9)^4 = 66%); those perturb every tensor with
    rho itself (as beta = 1 would), the others their subset with rho / beta."""
    from hf_flat.methods.esam import esam_subset

    draws = [esam_subset(0, "0", i, 4, 0.1) for i in range(12)]
    assert any(not any(d) for d in draws) and any(any(d) for d in draws)
    run_and_compare(tmp_path, "esam", flat=dict(esam_beta=0.1, esam_gamma=0.5), reference=dict(beta=0.1, gamma=0.5))


def test_esam_on_a_schedule(tmp_path, monkeypatch):
    perturbed = scheduled(12, 0.5, 2)
    assert perturbed == {6, 8, 10, 12}
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "esam", flat=dict(esam_beta=0.5, sam_start=0.5, sam_interval=2),
        reference=dict(beta=0.5, perturbed_steps=perturbed))
    assert_elsewhere(reference_flat_family(initial, steps, "esam", **dict(kwargs, perturbed_steps=None)), expected)
    # the subsets are numbered by perturbation (0-3), not by micro-batch (5, 7, 9, 11): that ends elsewhere
    from hf_flat.methods import esam as esam_module

    drawn = esam_module.esam_subset
    by_micro_batch = {0: 5, 1: 7, 2: 9, 3: 11}
    assert any(drawn(0, "0", i, 4, 0.5) != drawn(0, "0", j, 4, 0.5) for i, j in by_micro_batch.items())
    monkeypatch.setattr(esam_module, "esam_subset",
                        lambda seed, stream, index, n, beta: drawn(seed, stream, by_micro_batch[index], n, beta))
    assert_elsewhere(reference_flat_family(initial, steps, "esam", **kwargs), expected)


def test_esam_subset_is_a_deterministic_draw_from_a_dedicated_generator():
    from hf_flat.methods.esam import esam_subset

    torch_state, python_state = torch.get_rng_state(), random.getstate()
    draws = [esam_subset(0, "0", i, 10, 0.3) for i in range(100)]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(len(d) == 10 and all(isinstance(x, bool) for x in d) for d in draws)
    assert draws == [esam_subset(0, "0", i, 10, 0.3) for i in range(100)]
    share = sum(map(sum, draws)) / 1000
    assert 0.24 < share < 0.36  # probability beta per tensor
    assert draws != [esam_subset(1, "0", i, 10, 0.3) for i in range(100)]
    assert draws != [esam_subset(0, "1", i, 10, 0.3) for i in range(100)]
    assert all(all(esam_subset(0, "0", i, 10, 1.0)) for i in range(20))


def test_esam_gamma_selects_the_samples_whose_loss_rises_most(tmp_path, monkeypatch):
    trainer, steps, kwargs, expected, initial = run_and_compare(
        tmp_path, "esam", grad_accum=1, flat=dict(esam_beta=1.0, esam_gamma=0.75), reference=dict(beta=1.0, gamma=0.75))
    # the samples with the smallest rise instead: the reference ends elsewhere
    largest = torch.topk
    monkeypatch.setattr(torch, "topk", lambda values, n: largest(-values, n))
    assert_elsewhere(reference_flat_family(initial, steps, "esam", **kwargs), expected)


# ---- forward calls --------------------------------------------------------------------------------
class CountingNet(TinyNet):
    """Records every forward call while training: (optimizer step, batch size, grad enabled)."""

    def __init__(self):
        super().__init__()
        self.step, self.calls = 1, []

    def forward(self, x, labels=None):
        self.calls.append((self.step, x.shape[0], torch.is_grad_enabled()))
        return super().forward(x, labels)


class StepCounter(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.step = state.global_step + 1


def counted(tmp_path, **settings):
    model = CountingNet()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, num_train_epochs=3, gradient_accumulation_steps=2,
                                                     sam_rho=0.5, **settings),
                          train_dataset=TinyData(), callbacks=[StepCounter()])
    trainer.train()
    per_step = {}
    for step, size, grad in model.calls:
        per_step.setdefault(step, []).append((size, grad))
    return trainer.state.global_step, per_step


def test_looksam_forward_calls(tmp_path):
    total, per_step = counted(tmp_path, flat_method="looksam", looksam_k=3, sam_start=0.3)
    assert total == 6  # s = ceil(0.3 * 6) = 2: SAM steps 2 and 5; step 1 plain; 3, 4 and 6 one pass
    sam_steps = {2, 5}
    assert {t: len(calls) for t, calls in per_step.items()} == {t: 2 * (2 if t in sam_steps else 1)
                                                               for t in range(1, total + 1)}
    assert all(size == 4 and grad for calls in per_step.values() for size, grad in calls)


@pytest.mark.parametrize("gamma, selected", [(0.5, 2), (0.75, 3)])
def test_esam_forward_calls(tmp_path, gamma, selected):
    total, per_step = counted(tmp_path, flat_method="esam", esam_gamma=gamma)
    assert total == 6
    # per micro-batch: pass 1 (4 samples, with grad), the selection (4, without), pass 2 (the selected, with)
    assert per_step == {t: [(4, True), (4, False), (selected, True)] * 2 for t in range(1, total + 1)}


# ---- bad values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, settings, name", [
    ("gsam", dict(gsam_alpha=-0.1), "gsam_alpha=-0.1"),
    ("gsam", dict(gsam_rho_min=-0.01), "gsam_rho_min=-0.01"),
    ("gsam", dict(sam_rho=0.5, gsam_rho_min=0.6), "gsam_rho_min=0.6"),
    ("looksam", dict(looksam_k=0), "looksam_k=0"),
    ("looksam", dict(looksam_alpha=-0.5), "looksam_alpha=-0.5"),
    ("esam", dict(esam_beta=0.0), "esam_beta=0.0"),
    ("esam", dict(esam_beta=1.5), "esam_beta=1.5"),
    ("esam", dict(esam_gamma=0.0), "esam_gamma=0.0"),
    ("esam", dict(esam_gamma=1.5), "esam_gamma=1.5"),
    ("esam", dict(sam_scope="step"), "sam_scope='step'"),
    ("esam", dict(sam_m=2), "sam_m=2"),
])
def test_bad_values_are_refused_at_construction(tmp_path, method, settings, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        sgd_args(tmp_path, flat_method=method, **settings)
