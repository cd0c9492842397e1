"""hf-flat copies one rule from a private part of `Trainer.training_step`: whether the loss it
returns is already scaled for gradient accumulation (`FlatTrainer._loss_is_scaled_for_ga`, used to
scale SAF's / MESA's term and its logged value). This test runs the Trainer's own training_step and
fails loudly if the Trainer's rule and the copy ever disagree."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, default_data_collator

from hf_flat import FlatTrainer
from helpers import TinyData, TinyNet, sgd_args


class TokenCountNet(TinyNet):
    """Takes the Trainer's loss kwargs (`num_items_in_batch`) and normalises its summed loss by them,
    as transformers' causal LMs do."""

    def forward(self, x, labels=None, **kwargs):
        logits = super().forward(x)["logits"]
        items = kwargs.get("num_items_in_batch")
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels, reduction="sum") / items if items is not None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("model_cls", [TinyNet, TokenCountNet])
@pytest.mark.parametrize("num_items", [None, 8])
def test_the_copied_loss_scaling_rule_matches_the_trainers(tmp_path, model_cls, num_items):
    model = model_cls()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, gradient_accumulation_steps=2), train_dataset=TinyData())
    assert trainer.model_accepts_loss_kwargs == (model_cls is TokenCountNet)
    data = TinyData()
    batch = default_data_collator([data[i] for i in range(4)])
    items = None if num_items is None else torch.tensor(num_items)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    unscaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=items).detach()
    returned = Trainer.training_step(trainer, model, dict(batch), num_items_in_batch=items)
    divided = torch.allclose(returned, unscaled / 2) and not torch.allclose(returned, unscaled)
    assert divided != trainer._loss_is_scaled_for_ga(items)
    # and the rule really distinguishes the cases this test covers
    assert trainer._loss_is_scaled_for_ga(items) == (model_cls is TokenCountNet and num_items is not None)


def test_trajectory_term_is_scaled_alike_for_both_kinds_of_loss(tmp_path):
    """Under gradient accumulation 2, a model that normalises its summed loss by the step's
    `num_items_in_batch` (the Trainer then does not divide by 2) trains exactly like one that
    returns the mean (the Trainer divides by 2): MESA's term and its logged value must follow the
    same rule, or the two runs part."""
    runs = []
    for model_cls in (TinyNet, TokenCountNet):
        args = sgd_args(tmp_path / model_cls.__name__, flat_method="mesa", mesa_start_epoch=0, mesa_decay=0.5,
                        gradient_accumulation_steps=2, num_train_epochs=2)
        trainer = FlatTrainer(model=model_cls(), args=args, train_dataset=TinyData())
        trainer.train()
        terms = [h["trajectory_loss"] for h in trainer.state.log_history if "trajectory_loss" in h]
        runs.append((trainer.model.state_dict(), terms))
    (mean_weights, mean_terms), (summed_weights, summed_terms) = runs
    assert len(mean_terms) == 4 and all(t > 0 for t in mean_terms[1:])
    assert summed_terms == pytest.approx(mean_terms, rel=1e-5)
    for k, v in mean_weights.items():
        torch.testing.assert_close(summed_weights[k], v, atol=1e-6, rtol=0)
