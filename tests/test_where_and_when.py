"""Average SAM, m-sharpness (`sam_m`), n-SAM (`sam_scope="step"`) and SAM on a schedule
(`sam_start`, `sam_interval`), against references computed by hand (tests/helpers.py)."""

import copy
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from helpers import (
    RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_where_and_when, sgd_args,
)


def train_recorded(tmp_path, model, data=None, callbacks=(), **overrides):
    collator = RecordingCollator()
    trainer = FlatTrainer(
        model=model, args=sgd_args(tmp_path, **overrides), train_dataset=data if data is not None else TinyData(),
        data_collator=collator, callbacks=list(callbacks),
    )
    trainer.train()
    return trainer, collator.batches


def scheduled(total, start=0.0, interval=1):
    """The perturbed steps, written out from the definition: t >= s and (t - s) % interval == 0."""
    s = max(1, math.ceil(round(start * total, 9)))
    return {t for t in range(1, total + 1) if t >= s and (t - s) % interval == 0}


CASES = {
    "avg_sam": dict(flat_method="avg_sam", sam_rho=0.5),
    "avg_sam_m2": dict(flat_method="avg_sam", sam_rho=0.5, sam_m=2),
    "avg_sam_step": dict(flat_method="avg_sam", sam_rho=0.5, sam_scope="step"),
    "sam_m2": dict(flat_method="sam", sam_rho=0.5, sam_m=2),
    "asam_m1": dict(flat_method="asam", sam_rho=1.0, sam_m=1),
    "sam_step": dict(flat_method="sam", sam_rho=0.5, sam_scope="step"),
    "asam_step": dict(flat_method="asam", sam_rho=1.0, sam_scope="step"),
    "sam_interval3": dict(flat_method="sam", sam_rho=0.5, sam_interval=3),
    "sam_late": dict(flat_method="sam", sam_rho=0.5, sam_start=0.6),
    "asam_late_interval2_m2": dict(flat_method="asam", sam_rho=1.0, sam_start=0.3, sam_interval=2, sam_m=2),
    "sam_step_late": dict(flat_method="sam", sam_rho=0.5, sam_scope="step", sam_start=0.5, sam_interval=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_weights_after_training_match_the_hand_reference(tmp_path, case, grad_accum, max_grad_norm):
    flat = CASES[case]
    initial = TinyNet()
    trainer, batches = train_recorded(
        tmp_path, copy.deepcopy(initial), num_train_epochs=3, gradient_accumulation_steps=grad_accum,
        max_grad_norm=max_grad_norm, **flat,
    )
    total = trainer.state.global_step
    assert total == 3 * 16 // (4 * grad_accum)
    method = flat["flat_method"]
    steps = group_steps(batches, grad_accum, total)
    perturbed = scheduled(total, flat.get("sam_start", 0.0), flat.get("sam_interval", 1))
    reference = dict(rho=flat["sam_rho"], max_grad_norm=max_grad_norm, scope=flat.get("sam_scope", "micro"),
                     m=flat.get("sam_m"), perturbed_steps=perturbed)
    expected = reference_where_and_when(initial, steps, method, **reference)
    assert_same_weights(trainer.model, expected)
    # the setting matters: every step perturbed per micro-batch, or no step perturbed, ends elsewhere
    every_step = set(range(1, total + 1))
    for other in (dict(reference, scope="micro", m=None, perturbed_steps=every_step), dict(reference, perturbed_steps=set())):
        # (with one micro-batch per step on one process, SAM's n-SAM step is its m-SAM step)
        same_by_definition = grad_accum == 1 and reference["scope"] == "step" and method != "avg_sam" and other["m"] is None
        if other != reference and not (same_by_definition and other["perturbed_steps"]):
            elsewhere = reference_where_and_when(initial, steps, method, **other)
            assert not torch.allclose(elsewhere.fc1.weight, expected.fc1.weight, atol=1e-5)
