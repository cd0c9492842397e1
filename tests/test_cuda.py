"""The CUDA paths, against the same hand references as on the CPU. Skipped without a GPU;
`benchmarks/gpu_check.sh` runs them on one.

- fp16 with accelerate's real `torch.amp.GradScaler("cuda")`: SAM / ASAM equal the reference under
  the same fp16 autocast; an overflow in pass 1 alone makes the scaler skip the step.
- bf16 autocast on CUDA against the reference under the same autocast.
- SWA, EMA, SAF and MESA on CUDA (fp32) end where the same run on the CPU ends.
- Peak GPU memory: SAM needs about one extra copy of the trainable weights.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_flat import FlatTrainer
from helpers import RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_two_pass, sgd_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


def cuda_args(tmp_path, **overrides):
    return sgd_args(tmp_path, **{"use_cpu": False, **overrides})


def train(tmp_path, model, **overrides):
    collator = RecordingCollator()
    trainer = FlatTrainer(model=model, args=cuda_args(tmp_path, **overrides), train_dataset=TinyData(),
                          data_collator=collator)
    trainer.train()
    return trainer, collator.batches


@pytest.mark.parametrize("method", ["sam", "asam"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_matches_the_reference_under_the_same_autocast(tmp_path, method, precision):
    initial = TinyNet()
    trainer, batches = train(tmp_path, copy.deepcopy(initial), flat_method=method, sam_rho=0.5,
                             gradient_accumulation_steps=2, max_grad_norm=1.0, **{precision: True})
    assert trainer.model.fc1.weight.is_cuda
    if precision == "fp16":  # the real scaler was there, and never overflowed
        assert trainer.accelerator.scaler is not None and trainer.accelerator.scaler.get_scale() == 2.0**16
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    steps = group_steps(batches, 2, trainer.state.global_step)
    expected = reference_two_pass(initial.cuda(), steps, method, rho=0.5, max_grad_norm=1.0, autocast=dtype)
    assert_same_weights(trainer.model, expected, atol=2e-3)
    fp32 = reference_two_pass(initial, steps, "none", max_grad_norm=1.0)
    assert not torch.allclose(trainer.model.fc1.weight, fp32.fc1.weight, atol=1e-3)  # SAM did something


class FirstPassOverflows(TinyNet):
    """Pass 1 of micro-batch 1 overflows in fp16 (its loss times the scale is not finite)."""

    calls = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.calls += 1
        return {**out, "loss": out["loss"] * 1e36} if self.calls == 1 else out


class Weights(TrainerCallback):
    def __init__(self):
        self.after = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_fp16_overflow_in_the_first_pass_alone_skips_the_step(tmp_path):
    initial = FirstPassOverflows()
    weights = Weights()
    trainer = FlatTrainer(
        model=copy.deepcopy(initial),
        args=cuda_args(tmp_path, flat_method="sam", fp16=True, gradient_accumulation_steps=2),
        train_dataset=TinyData(), callbacks=[weights],
    )
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**15  # backed off once
    for k, v in initial.state_dict().items():
        assert torch.equal(weights.after[0][k].cpu(), v), k  # step 1 skipped
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(weights.after[1][k].cpu(), v) for k, v in initial.state_dict().items())


@pytest.mark.parametrize(
    "flat_method, extra",
    [
        ("wasam", dict(average_start=0.5, average_freq=1)),
        ("ema", dict(average_start=0.25, ema_decay=0.5)),
        ("saf", dict(saf_start_epoch=1, saf_past_epochs=1)),
        ("mesa", dict(mesa_start_epoch=1, mesa_decay=0.5)),
    ],
)
def test_methods_on_cuda_end_where_the_cpu_run_ends(tmp_path, flat_method, extra):
    torch.backends.cuda.matmul.allow_tf32 = False
    common = dict(flat_method=flat_method, num_train_epochs=3, **extra)
    on_gpu, _ = train(tmp_path / "gpu", TinyNet(batchnorm=True), **common)
    on_cpu = FlatTrainer(model=TinyNet(batchnorm=True), args=sgd_args(tmp_path / "cpu", **common),
                         train_dataset=TinyData())
    on_cpu.train()
    assert on_gpu.model.fc1.weight.is_cuda
    assert_same_weights(on_gpu.model.cpu(), on_cpu.model, atol=1e-5)


class Wide(nn.Module):
    """An MLP with 8 x 1024^2 weights (32 MB in float32) and small activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
        self.head = nn.Linear(1024, 2)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.layers(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class WideData(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(1024, generator=g), "labels": i % 2}


def peak_training_memory(tmp_path, flat_method):
    """Peak GPU memory of 4 SGD steps: the plain `transformers.Trainer` for `flat_method=None`."""
    from transformers import TrainingArguments

    model = Wide()
    common = dict(max_steps=4, per_device_train_batch_size=8, optim="sgd", report_to="none", save_strategy="no",
                  disable_tqdm=True)
    if flat_method is None:
        trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), **common), train_dataset=WideData())
    else:
        trainer = FlatTrainer(model=model, args=cuda_args(tmp_path, flat_method=flat_method, **common),
                              train_dataset=WideData())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return torch.cuda.max_memory_allocated(), sum(p.numel() * p.element_size() for p in model.parameters())


def test_sam_needs_one_extra_copy_of_the_trainable_weights(tmp_path, record_property):
    plain, weight_bytes = peak_training_memory(tmp_path / "plain", None)
    sam, _ = peak_training_memory(tmp_path / "sam", "sam")
    copies = (sam - plain) / weight_bytes
    record_property("sam_extra_copies", copies)
    print(f"SAM peak GPU memory over the plain Trainer: {(sam - plain) / 2**20:+.1f} MB = {copies:+.2f} copies "
          f"of the {weight_bytes / 2**20:.1f} MB of trainable weights")
    assert 0.8 < copies < 1.3
