"""No method adds a host-device synchronisation inside an optimizer step (issue 25).

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``if t:``,
``.tolist()``, ``.cpu()``) makes the CPU wait for every kernel queued so far, so the next pass's
kernel launches are exposed instead of overlapped with the GPU's work. This guard counts such
calls on the CPU, per optimizer step that does not log, for every method in the registry (and
``sam_scope="step"``, ``sam_m``, a schedule), against the plain Trainer in the same run: a method
may not make one more than the plain Trainer does.
"""

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_flat import FlatTrainer
from helpers import TinyData, TinyNet, sgd_args

pytestmark = pytest.mark.usefixtures("one_thread")

#: The tensor methods that read a value on the host: each one synchronises with the device.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads(TrainerCallback):
    """Counts calls of `SYNCING` from the first micro-batch of each optimizer step after the first
    to the end of that step (after the optimizer step), and the steps it counted."""

    def __init__(self):
        self.count, self.steps, self.counting = 0, 0, False
        self.originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

        def counted(name):
            original = self.originals[name]

            def call(tensor, *args, **kwargs):
                if self.counting:
                    self.count += 1
                return original(tensor, *args, **kwargs)

            return call

        self.patched = {name: counted(name) for name in SYNCING}

    def __enter__(self):
        for name, function in self.patched.items():
            setattr(torch.Tensor, name, function)
        return self

    def __exit__(self, *exc):
        for name, function in self.originals.items():
            setattr(torch.Tensor, name, function)

    def on_step_begin(self, args, state, control, **kwargs):
        self.counting = state.global_step >= 1  # (the first step builds teachers, learns, allocates)

    def on_step_end(self, args, state, control, **kwargs):
        if self.counting:
            self.steps += 1
        self.counting = False


METHODS = {
    "sam": dict(flat_method="sam"),
    "asam": dict(flat_method="asam"),
    "sam step scope": dict(flat_method="sam", sam_scope="step"),
    "sam_m": dict(flat_method="sam", sam_m=2),
    "sam schedule": dict(flat_method="sam", sam_start=0.3, sam_interval=2),
    "avg_sam": dict(flat_method="avg_sam"),
    "avg_sam step scope": dict(flat_method="avg_sam", sam_scope="step"),
    "gsam": dict(flat_method="gsam", gsam_rho_min=0.01, lr_scheduler_type="linear"),
    "gsam step scope": dict(flat_method="gsam", sam_scope="step"),
    "looksam": dict(flat_method="looksam", looksam_k=2),
    "esam": dict(flat_method="esam"),
    "saf": dict(flat_method="saf", saf_start_epoch=1, saf_past_epochs=1),
    "mesa": dict(flat_method="mesa", mesa_start_epoch=0),
    "swa": dict(flat_method="swa", average_start=0.0, average_freq=1),
    "swa_lr": dict(flat_method="swa", average_start=0.0, swa_lr=0.05, swa_anneal_steps=2),
    "ema": dict(flat_method="ema", average_start=0.0),
    "lawa": dict(flat_method="lawa", average_start=0.0, average_freq=1, lawa_k=2),
    "wasam": dict(flat_method="wasam", average_start=0.0, average_freq=1),
}
COMMON = dict(gradient_accumulation_steps=2, num_train_epochs=3, logging_steps=1000, max_grad_norm=1.0)


def host_reads_per_step(tmp_path, trainer_class, **settings):
    trainer = trainer_class(model=TinyNet(), args=sgd_args(tmp_path, **COMMON, **settings), train_dataset=TinyData())
    with HostReads() as reads:
        trainer.add_callback(reads)
        trainer.train()
    assert reads.steps == trainer.state.global_step - 1 > 0
    return reads.count / reads.steps


@pytest.fixture(scope="module")
def plain_reads(tmp_path_factory):
    """The plain Trainer's host reads per optimizer step, under each learning-rate schedule used."""
    folder = tmp_path_factory.mktemp("plain")
    return {schedule: host_reads_per_step(folder / schedule, Trainer, lr_scheduler_type=schedule)
            for schedule in ("constant", "linear")}


@pytest.mark.parametrize("name", list(METHODS))
def test_no_method_reads_the_device_inside_a_step(tmp_path, plain_reads, name):
    settings = dict(METHODS[name])
    baseline = plain_reads[settings.get("lr_scheduler_type", "constant")]
    assert host_reads_per_step(tmp_path, FlatTrainer, **settings) == baseline


def test_the_counter_sees_a_host_read(tmp_path, plain_reads):
    """The guard can fail: a method that reads one value per step is caught."""

    class Reading(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.fc1.weight.sum().item()

    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="sam", **COMMON),
                          train_dataset=TinyData(), callbacks=[Reading()])
    with HostReads() as reads:
        trainer.add_callback(reads)
        trainer.train()
    assert reads.count / reads.steps == plain_reads["constant"] + 1
