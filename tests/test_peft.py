"""PEFT / LoRA: only the adapters are perturbed and trained; frozen weights never change."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_flat import FlatTrainer
from helpers import RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_two_pass, sgd_args


class FrozenWatcher:
    """Forward pre-hook: the frozen weights must be the same at every forward, perturbed pass included."""

    def __init__(self, model):
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.model, self.checked = model, 0

    def __call__(self, module, args):
        for name, p in self.model.named_parameters():
            if name in self.frozen:
                assert torch.equal(p, self.frozen[name]), name
        self.checked += 1


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_lora_trains_the_adapters_only_and_matches_reference(tmp_path, method):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0, init_lora_weights=False)
    initial = get_peft_model(TinyNet(), config)
    model = copy.deepcopy(initial)
    watcher = FrozenWatcher(model)
    model.register_forward_pre_hook(watcher)
    collator = RecordingCollator()
    trainer = FlatTrainer(
        model=model,
        args=sgd_args(tmp_path, flat_method=method, sam_rho=0.5, gradient_accumulation_steps=2),
        train_dataset=TinyData(),
        data_collator=collator,
    )
    trainer.train()
    assert watcher.checked == 2 * 4  # two passes for each of the 4 micro-batches
    expected = reference_two_pass(initial, group_steps(collator.batches, 2, trainer.state.global_step), method, rho=0.5)
    assert_same_weights(trainer.model, expected)
    trained = dict(trainer.model.named_parameters())
    for name, p in initial.named_parameters():
        if p.requires_grad:
            assert "lora_" in name and not torch.equal(trained[name], p), name
        else:
            assert torch.equal(trained[name], p), name
