"""`FlatTrainer`: the Hugging Face `Trainer` with flat-minima methods.

The trainer stays thin: it builds the methods that `args.flat_method` names and delegates to
them: two-pass steps (`hf_flat.methods.sam`), trajectory losses (`hf_flat.methods.saf` /
`mesa`) and weight averaging (`hf_flat.averaging`, a callback). Everything else (gradient
accumulation, clipping, mixed precision, DDP, checkpoints, evaluation) is the Trainer's own code.
"""

import dataclasses
import os
import time

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, speed_metrics
from transformers.utils import logging

from .args import FlatTrainingArguments
from .averaging import WeightAveraging, load_flat_state, save_flat_state
from .methods import MESA, SAF, build_perturbation, build_trajectory
from .methods.saf import INDEX_KEY, IndexedCollator, IndexedDataset

logger = logging.get_logger(__name__)

#: The file in each checkpoint folder that holds hf-flat's own state (safetensors: loads without code).
FLAT_STATE_NAME = "hf_flat_state.safetensors"


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

    With SAF or MESA the loss gains the trajectory term, logged as ``trajectory_loss`` beside
    ``task_loss``.

    With an averaging method (SWA, EMA) each evaluation during training also evaluates the averaged
    weights (metrics prefixed ``eval_avg_``), and at the end of training the model holds them.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs):
        super().__init__(model, as_flat_args(args), *positional, **kwargs)
        self.perturbation = build_perturbation(self.args)
        self.trajectory = build_trajectory(self.args)
        if isinstance(self.trajectory, MESA):
            self.add_callback(self.trajectory)
        self._log_sums = {}  # name -> sum since the last training log (on device), e.g. perturbed_loss
        self._log_steps = 0  # optimizer steps in those sums
        self._sample_indices = None  # SAF: the current micro-batch's indices in train_dataset
        self._training_micro_batch = False
        self.averaging = None
        if self.args.flat_averaging is not None:
            self.averaging = WeightAveraging(
                self.args.flat_averaging,
                start=self.args.average_start,
                freq=self.args.average_freq,
                decay=self.args.ema_decay,
                on_cpu=self.args.average_on_cpu,
                batchnorm_batches=self._batchnorm_batches,
            )
            self.add_callback(self.averaging)

    # ---- training --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.perturbation is not None:
            self._refuse_unsupported_setup()
        self._log_sums, self._log_steps = {}, 0
        if isinstance(self.trajectory, SAF) and isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "flat_method='saf' keys its memory by the sample's index in train_dataset, which an "
                "IterableDataset does not have. Use flat_method='mesa' (no per-sample memory) instead."
            )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if self.averaging is not None:
            self.averaging.reset()
        if resume_from_checkpoint:
            self._load_flat_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(self.trajectory, SAF):  # the sample indices never reach the model
            inputs = dict(inputs)
            self._sample_indices = inputs.pop(INDEX_KEY, None)
        self._training_micro_batch = True
        try:
            if self.perturbation is None:
                loss = super().training_step(model, inputs, num_items_in_batch)
            else:
                loss, perturbed_loss = self.perturbation.step(self, model, inputs, num_items_in_batch)
                self._add_to_log("perturbed_loss", perturbed_loss)
        finally:
            self._training_micro_batch = False
        if self._log_sums:
            self._log_steps += int(self.accelerator.sync_gradients)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss`, plus SAF's or MESA's trajectory loss on training micro-batches."""
        if self.trajectory is None or not self._training_micro_batch:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        teacher_inputs = dict(inputs)  # compute_loss may pop the labels
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        term = self.trajectory.term(self, logits, teacher_inputs)
        if term is not None:
            accumulation = self.current_gradient_accumulation_steps
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                term = term / accumulation  # the Trainer will not divide this loss by the accumulation steps
                self._add_to_log("trajectory_loss", term)
            else:
                self._add_to_log("trajectory_loss", term / accumulation)
            loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def get_train_dataloader(self):
        """SAF: the data loader also yields each example's index in `train_dataset`."""
        if not isinstance(self.trajectory, SAF):
            return super().get_train_dataloader()
        self._set_signature_columns_if_needed()
        saved = self.train_dataset, self.data_collator, self._signature_columns
        self.train_dataset = IndexedDataset(self.train_dataset)
        self.data_collator = IndexedCollator(self.data_collator)
        self._signature_columns = [*self._signature_columns, INDEX_KEY]  # kept by column removal
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator, self._signature_columns = saved

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

    # ---- averaged weights -------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluate`; during training, once averaging has begun, the averaged weights are
        evaluated too and their metrics logged and returned with the prefix ``eval_avg_``."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.averaging is None or not self.is_in_train or not self.averaging.count or isinstance(dataset, dict):
            return metrics  # (a dict of data sets comes back here once per data set)
        prefix = metric_key_prefix.replace("eval", "eval_avg", 1) if metric_key_prefix.startswith("eval") else (
            f"{metric_key_prefix}_avg"
        )
        start = time.time()
        with self.averaging.swapped_in(self.model):
            output = self.evaluation_loop(
                self.get_eval_dataloader(eval_dataset),
                description="Evaluation of the averaged weights",
                prediction_loss_only=True if self.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=prefix,
            )
        output.metrics.update(speed_metrics(prefix, start, num_samples=output.num_samples))
        self.log(output.metrics)
        return {**metrics, **output.metrics}

    def _batchnorm_batches(self):
        """The training data in order, batched and collated as for training, on this process's
        device. Every process reads all of it, so all get the same BatchNorm statistics."""
        dataset, collator = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names"):  # a datasets.Dataset
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(dataset, batch_size=self._train_batch_size, collate_fn=collator)
        for batch in loader:
            yield self._prepare_inputs(batch)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        parts = self._stateful_parts()
        if parts and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_flat_state(os.path.join(folder, FLAT_STATE_NAME), [part.state_dict() for part in parts])

    def _stateful_parts(self):
        """The flat components whose state must survive a resume (SAF memory, MESA teacher, average)."""
        return [part for part in (self.trajectory, self.averaging) if part is not None]

    def _load_flat_state(self, checkpoint):
        parts = self._stateful_parts()
        if not parts:
            return
        path = os.path.join(checkpoint, FLAT_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"{checkpoint} has no {FLAT_STATE_NAME}: it was not written by a FlatTrainer with "
                f"flat_method={self.args.flat_method!r}, whose state (average, SAF memory, MESA teacher) "
                "therefore starts afresh."
            )
            return
        tensors, meta = load_flat_state(path)
        for part in parts:
            part.load_state_dict(tensors, meta)

    # ---- logging ---------------------------------------------------------------------------
    def _add_to_log(self, name, value):
        """Sum a per-micro-batch value (scaled like the Trainer's loss) until the next training log."""
        if name not in self._log_sums:
            self._log_sums[name] = torch.zeros((), device=value.device)
        self._log_sums[name] += value.detach().float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_steps > 0:
            for name, total in self._log_sums.items():
                logs[name] = self.accelerator.reduce(total.clone(), reduction="mean").item() / self._log_steps
                total.zero_()
            self._log_steps = 0
            if "perturbed_loss" in logs:
                logs["sharpness"] = logs["perturbed_loss"] - logs["loss"]
            if "trajectory_loss" in logs:
                logs["task_loss"] = logs["loss"] - logs["trajectory_loss"]
        super().log(logs, start_time)
