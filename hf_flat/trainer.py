"""`FlatTrainer`: the Hugging Face `Trainer` with flat-minima methods.

The trainer stays thin: it builds the method that `args.flat_method` names and delegates each
micro-batch to it (`hf_flat.methods`). Everything else (gradient accumulation, clipping, mixed
precision, DDP, checkpoints, evaluation) is the Trainer's own code.
"""

import dataclasses

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainingArguments

from .args import FlatTrainingArguments
from .methods import build_perturbation


def as_flat_args(args: TrainingArguments | None) -> FlatTrainingArguments:
    """`FlatTrainingArguments` from what the user passed: plain `TrainingArguments` keep every value
    and get `flat_method='none'`; `None` gives the Trainer's default output folder."""
    if args is None:
        return FlatTrainingArguments(output_dir="trainer_output")
    if isinstance(args, FlatTrainingArguments):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return FlatTrainingArguments(**values)
    raise TypeError(f"args must be a FlatTrainingArguments (hf_flat.TrainingArguments), not {type(args).__name__}.")


class FlatTrainer(Trainer):
    """A `transformers.Trainer` that trains with the method `args.flat_method` names.

    Example:
        >>> from hf_flat import FlatTrainer, TrainingArguments
        >>> args = TrainingArguments("out", flat_method="sam", sam_rho=0.05)
        >>> FlatTrainer(model=model, args=args, train_dataset=train).train()

    With a perturbation method (SAM, ASAM) every training log also carries ``perturbed_loss``,
    L(w + e), and ``sharpness`` = L(w + e) - L(w), averaged like ``loss``.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs):
        super().__init__(model, as_flat_args(args), *positional, **kwargs)
        self.perturbation = build_perturbation(self.args)
        self._perturbed_loss = None  # sum of L(w + e) since the last training log, on device
        self._perturbed_steps = 0  # optimizer steps in that sum

    # ---- training --------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        if self.perturbation is not None:
            self._refuse_unsupported_setup()
        self._perturbed_loss, self._perturbed_steps = None, 0
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.perturbation is None:
            return super().training_step(model, inputs, num_items_in_batch)
        loss, perturbed_loss = self.perturbation.step(self, model, inputs, num_items_in_batch)
        if self._perturbed_loss is None:
            self._perturbed_loss = torch.zeros((), device=perturbed_loss.device)
        self._perturbed_loss += perturbed_loss
        self._perturbed_steps += int(self.accelerator.sync_gradients)
        return loss

    def forward_backward(self, model, inputs, num_items_in_batch=None):
        """One forward and backward pass exactly as the plain Trainer runs it (loss scaling for
        gradient accumulation and mixed precision included); the methods call it once per pass."""
        return super().training_step(model, dict(inputs), num_items_in_batch)

    def _refuse_unsupported_setup(self):
        method = self.args.flat_method
        distributed = self.accelerator.distributed_type
        if self.is_deepspeed_enabled or distributed == DistributedType.DEEPSPEED:
            raise ValueError(
                f"flat_method={method!r} cannot run under DeepSpeed: its backward() steps the optimizer, "
                "so the first pass would already update the weights. Launch without a DeepSpeed config "
                "(DDP via `accelerate launch` or `torchrun`, PEFT/LoRA for large models)."
            )
        if (
            self.is_fsdp_enabled
            or distributed in (DistributedType.FSDP, DistributedType.MEGATRON_LM)
            or self.is_distributed_loading_by_transformers
        ):
            raise ValueError(
                f"flat_method={method!r} is not supported with sharded training (FSDP, Megatron-LM, or a "
                "model sharded at load time): the perturbation needs the gradient norm over all shards. "
                "Launch with DDP (`accelerate launch` / `torchrun`), using PEFT/LoRA for large models."
            )

    # ---- logging ---------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._perturbed_loss is not None and self._perturbed_steps > 0:
            total = self.accelerator.reduce(self._perturbed_loss.detach().clone(), reduction="mean").item()
            logs["perturbed_loss"] = total / self._perturbed_steps
            logs["sharpness"] = logs["perturbed_loss"] - logs["loss"]
            self._perturbed_loss.zero_()
            self._perturbed_steps = 0
        super().log(logs, start_time)
