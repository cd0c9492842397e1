"""The flat trainers: the Hugging Face `Trainer`, or any subclass of it, with flat-minima methods.

`FlatTrainerMixin` holds the flat behaviour; `flat_trainer_class(Base)` puts it on top of any
`Trainer` subclass (TRL's `SFTTrainer` and `DPOTrainer`, `Seq2SeqTrainer`, a user's own), and
`FlatTrainer` / `FlatSeq2SeqTrainer` are it over `Trainer` / `Seq2SeqTrainer`. The mixin stays thin:
it builds the methods that `args.flat_method` names and delegates to them: two-pass steps
(`hf_flat.methods.sam`, ...), trajectory losses (`hf_flat.methods.saf` / `mesa`) and weight
averaging (`hf_flat.averaging`, a callback). Everything else (gradient accumulation, clipping,
mixed precision, DDP, FSDP, checkpoints, evaluation, and all the base trainer's own work: its loss,
its metrics, generation) is the base trainer's code. Under FSDP2 the methods work on each process's
rows of the sharded parameters (`hf_flat.sharding`) and checkpoints hold the flat state in shard
files (`hf_flat.state_file`).

**On top of another trainer.** The base trainer's `compute_loss` is the loss in every pass; its
running metrics (TRL's ``num_tokens``, ``mean_token_accuracy``, DPO's ``rewards/*``) count pass 1
only (`hf_flat.base_trainers.metrics_unchanged`), and at evaluation the averaged weights get an
``eval_avg_`` copy of each. The flat methods come first in the MRO whichever order a user lists the
bases (`FlatFirst`), and constructor arguments pass through as the base class defines them.

Private `Trainer` members it still relies on, because no public hook does the same job, and the
tests that fail if their behaviour changes:

- `_save_checkpoint` (write the flat state into the folder before the Trainer pushes it; `on_save`
  runs after the push) and `_get_output_dir` (that folder's name): the Hub-push, resume and
  crash-safety tests in tests/test_trainer_surface.py, test_averaging.py, test_crash_safety.py.
- `_hp_search_setup` (the point where a trial's values are on `args`): the optuna test in
  tests/test_trainer_surface.py.
- `_inner_training_loop` (an ``auto_find_batch_size`` retry starts new flat state),
  `_load_from_checkpoint` and `_load_best_model` (repaired for checkpoints that name weights
  differently, ViT's): tests/test_retries_and_edges.py.
- the rule behind `loss_is_scaled_for_ga` (copied in `_loss_is_scaled_for_ga`, read with a fallback
  where the attribute is missing): tests/test_private_members.py.
- `_remove_unused_columns`, `_get_collator_with_removed_columns`, `_train_batch_size` (after
  `auto_find_batch_size`) and `_prepare_inputs`, to batch the training data exactly as for training
  when BatchNorm is recomputed: the BatchNorm tests in tests/test_averaging.py compare with a hand pass.
- `_set_signature_columns_if_needed` / `_signature_columns`, so that SAF's sample index survives
  column removal: the SAF tests with a `datasets.Dataset` and extra columns.
- TRL's ``_metrics`` / ``_total_train_tokens`` (`hf_flat.base_trainers.METRIC_STATE`): the step-1
  metric tests in tests/test_trl.py.
"""

import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import os
import time

import torch
from accelerate.utils import DistributedType
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR, default_compute_objective, get_last_checkpoint, speed_metrics,
)
from transformers.utils import logging

from . import base_trainers
from .args import (
    FlatArgumentsMixin, FlatTrainingArguments, deepspeed_refusal, flat_arguments_class, fsdp1_refusal,
    sharded_scope_refusal,
)
from .averaging import WeightAveraging, averaged_prefix, build_averaging
from .model_card import FLAT_CARD_HEADING, flat_card_section, flat_tags
from .methods import ESAM, MESA, SAF, build_perturbation, build_trajectory
from .methods.outputs import captured_forward
from .methods.saf import HOST_INDEX_KEY, INDEX_KEY, IndexedCollator, IndexedDataset
from .methods.trajectory import is_language_model
from .methods.two_pass import normalises_over_samples, start_step
from .state_file import is_sharded_state, load_flat_state, save_flat_state, save_shard_file
from .swa_schedule import SWASchedule

logger = logging.get_logger(__name__)

#: The logs of a perturbed step, averaged over the perturbed micro-batches whose value is finite.
PERTURBED_LOGS = ("perturbed_loss", "sharpness")
#: The file in each checkpoint folder that holds hf-flat's own state (safetensors: loads without code).
FLAT_STATE_NAME = "hf_flat_state.safetensors"


def as_flat_args(args: TrainingArguments | None, warn: bool = False) -> FlatArgumentsMixin:
    """Flat arguments from what the user passed: flat arguments as they are; a plain
    `TrainingArguments` or any subclass (e.g. `Seq2SeqTrainingArguments`, TRL's `SFTConfig`) becomes
    an instance of `flat_arguments_class(type(args))` that keeps every value and has
    ``flat_method='none'`` (logged as a warning if `warn`); `None` gives the Trainer's default output folder."""
    if args is None:
        return FlatTrainingArguments(output_dir="trainer_output")
    if isinstance(args, FlatArgumentsMixin):
        return args
    if isinstance(args, TrainingArguments):
        name = type(args).__name__
        if warn:
            logger.warning(
                f"args is a {name}, which has no hf-flat fields: this trainer converts it and trains with "
                f"flat_method='none' (the plain {name} behaviour). For a flat method, build the arguments with "
                f"hf_flat.flat_arguments_class({name})(..., flat_method='sam')."
            )
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return flat_arguments_class(type(args))(**values)
    raise TypeError(f"args must be a FlatTrainingArguments (hf_flat.TrainingArguments), not {type(args).__name__}.")


class FlatFirst(type):
    """The metaclass of the flat trainers: in every class built from them, the flat classes come
    right after the class itself in the MRO, before any other `Trainer` subclass among its bases.

    So ``class X(DPOTrainer, FlatTrainer)`` behaves as ``class X(FlatTrainer, DPOTrainer)`` and as
    ``flat_trainer_class(DPOTrainer)``: the flat methods wrap DPO's training step, loss and
    evaluation, whichever order the bases are written in. The class's own methods stay first.
    """

    def mro(cls):
        order = super().mro()
        flat = [c for c in order[1:] if isinstance(c, FlatFirst)]
        return [order[0], *flat, *(c for c in order[1:] if not isinstance(c, FlatFirst))]


class FlatTrainerMixin(metaclass=FlatFirst):
    """The flat-minima methods for a `transformers.Trainer` subclass; see `flat_trainer_class`.

    With SAM or ASAM every training log also carries ``perturbed_loss``, L(w + e), and
    ``sharpness`` = L(w + e) - L(w), averaged like ``loss`` but over the perturbed optimizer steps
    only (every step unless ``sam_start`` / ``sam_interval`` set a schedule; a log whose window
    has no perturbed step has neither). With average SAM, ``loss`` is L(w + e) on perturbed steps,
    its only pass.

    With SAF or MESA the loss gains the trajectory term, logged as ``trajectory_loss`` beside
    ``task_loss``.

    With an averaging method (SWA, EMA, LAWA) each evaluation during training also evaluates the
    averaged weights (every metric the base trainer computes, prefixed ``eval_avg_``), and at the
    end of training the model holds them.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        why = base_trainers.refusal(cls)
        if why:
            raise TypeError(f"{cls.__name__}: {why}")

    def __init__(self, *args, **kwargs):
        # `args` passes through as the base class's own signature places it (DPOTrainer's is third)
        init = super().__init__
        signature = inspect.signature(init)
        if base_trainers.parameter_named(signature, "args") is None:  # a base taking *args, **kwargs
            signature = inspect.signature(Trainer.__init__.__get__(self))  # passes them on to Trainer's
        bound = signature.bind_partial(*args, **kwargs)
        if bound.arguments.get("args") is not None:
            bound.arguments["args"] = as_flat_args(bound.arguments["args"], warn=True)
        init(*bound.args, **bound.kwargs)
        if not isinstance(self.args, FlatArgumentsMixin):  # none given: the base built its default config
            self.args = as_flat_args(self.args)
        self._flat_callbacks = []  # the method objects that are callbacks, registered with the Trainer
        self._flat_checkpoint = None  # the checkpoint whose flat state the methods restore
        self._attempts = 0  # attempts of the current train() (auto_find_batch_size retries after running out of memory)
        self._log_sums = {}  # name -> sum since the last training log (on device), e.g. perturbed_loss
        self._log_values = {}  # name -> values added since the last training log (PERTURBED_LOGS)
        self._log_steps = 0  # optimizer steps since the last training log
        self._log_perturbed_steps = 0  # ... of which perturbed steps (perturbed_loss, sharpness average over those)
        self._perturbed_step = False  # the current optimizer step is a perturbed one
        self._sample_indices = None  # SAF: the current micro-batch's indices in train_dataset
        self._sample_host_indices = None  # ... the same in host memory (`HostIndices`)
        self._training_micro_batch = False
        self._reached_compute_loss = False  # this micro-batch's loss went through this class's compute_loss
        self._loss_share, self._loss_share_applied = 1, False  # sam_m: the current chunk's share of its micro-batch
        self._evaluating = False  # inside evaluate(): evaluation loops also evaluate the average
        self._averaged_eval_seconds = {}  # metric prefix -> seconds its averaged evaluation took
        self._set_up_flat_methods()

    # ---- the methods -----------------------------------------------------------------------
    def _set_up_flat_methods(self):
        """Build the methods that `self.args` names, register those that are callbacks, and restore
        their state from `self._flat_checkpoint`.

        This runs at construction and again at the start of every `train()` and after a
        hyperparameter trial has set its values on `self.args`: each training run gets new methods
        (no average, SAF memory or MESA teacher carries over from an earlier run) built from the
        arguments as they are then.
        """
        self.args.check_flat_arguments()
        for callback in self._flat_callbacks:
            self.remove_callback(callback)
        self.perturbation = build_perturbation(self.args, sharded=self.is_fsdp_enabled)
        self.trajectory = build_trajectory(self.args)
        self.averaging = build_averaging(self.args, self._batchnorm_batches)
        if self.averaging is not None:
            self.averaging.managed = True  # this trainer evaluates and checkpoints it, not the callback itself
            added = [type(c).__name__ for c in self.callback_handler.callbacks if isinstance(c, WeightAveraging)]
            if added:
                raise ValueError(
                    f"flat_method={self.args.flat_method!r} already averages the weights, and a {added[0]} callback was "
                    "added too: two averages would both write the final weights. Remove the callback, or train with "
                    "a flat_method without averaging and keep the callback."
                )
        self._flat_callbacks = [m for m in (self.trajectory, self.averaging) if isinstance(m, TrainerCallback)]
        # First in line, so every other callback sees their work: at on_train_end the model already
        # holds the averaged weights (reporting integrations, a callback that saves the model).
        self.callback_handler.callbacks[:0] = self._flat_callbacks
        if self._flat_checkpoint:
            self._load_flat_state(self._flat_checkpoint)
        tags = flat_tags(self.args)
        if tags and hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(tags)

    # ---- training --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            refuse_incomplete_checkpoint(str(resume_from_checkpoint))
        self._flat_checkpoint = resume_from_checkpoint or None
        self._start_flat_run()
        self._attempts = 0
        return super().train(resume_from_checkpoint or None, trial, ignore_keys_for_eval, **kwargs)

    def _start_flat_run(self):
        """New flat state for a training run: new method objects (restored from `_flat_checkpoint`
        when resuming) and empty log sums, then the checks that refuse an unsupported set-up."""
        self._log_sums, self._log_steps, self._log_perturbed_steps, self._perturbed_step = {}, 0, 0, False
        self._log_values = {}
        self._set_up_flat_methods()
        self._check_training_setup()

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                             ignore_keys_for_eval=None):
        """`Trainer.train` runs this loop once, and with ``auto_find_batch_size`` again with a smaller
        batch after each out-of-memory error (accelerate's `find_executable_batch_size`). Every
        attempt after the first starts new flat state, as a new `train()` would: nothing of the
        abandoned attempt (an n-SAM window, GSAM's learning-rate range, an average's snapshots,
        average SAM's and ESAM's draw counts, a MESA teacher, SAF's memory) reaches the retry.

        (A private member of `Trainer`; tests/test_retries_and_edges.py fails if a retry stops
        coming through here.)"""
        self._attempts += 1
        if self._attempts > 1:
            self._start_flat_run()
        return super()._inner_training_loop(batch_size, args, resume_from_checkpoint, trial, ignore_keys_for_eval)

    def hyperparameter_search(self, hp_space=None, compute_objective=None, *args, **kwargs):
        """`Trainer.hyperparameter_search`. The default objective is the Trainer's, computed on the
        live weights' metrics: to optimise an averaged metric, pass e.g.
        ``compute_objective=lambda metrics: metrics["eval_avg_loss"]``."""
        objective = compute_objective or objective_of_live_metrics
        return super().hyperparameter_search(hp_space, objective, *args, **kwargs)

    def _hp_search_setup(self, trial):
        """The Trainer puts a hyperparameter trial's values on `self.args` here (a private member of
        `Trainer`; tests/test_trainer_surface.py fails if it stops being called before training).
        The flat methods are then built again from those values."""
        super()._hp_search_setup(trial)
        if trial is not None:
            self._start_flat_run()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(self.trajectory, SAF):  # the sample indices never reach the model
            inputs = dict(inputs)
            self._sample_indices = inputs.pop(INDEX_KEY, None)
            self._sample_host_indices = inputs.pop(HOST_INDEX_KEY, None)
        self._training_micro_batch, self._reached_compute_loss = True, False
        try:
            if self.perturbation is None:
                loss = super().training_step(model, inputs, num_items_in_batch)
            else:
                loss, perturbed_loss, sharpness = self.perturbation.training_step(self, model, inputs, num_items_in_batch)
                if perturbed_loss is not None:
                    self._add_to_log("perturbed_loss", perturbed_loss)
                    self._add_to_log("sharpness", sharpness)
                    self._perturbed_step = True
        finally:
            self._training_micro_batch = False
        if self.trajectory is not None and not self._reached_compute_loss:
            raise RuntimeError(self._bypass_message())
        if self.accelerator.sync_gradients:
            self._log_steps += 1
            self._log_perturbed_steps += int(self._perturbed_step)
            self._perturbed_step = False
        return loss

    def _bypass_message(self) -> str:
        owner = next(c for c in type(self).__mro__ if "compute_loss" in vars(c))
        return (
            f"flat_method={self.args.flat_method!r} adds its trajectory term to the loss in hf-flat's compute_loss, but "
            f"{owner.__qualname__}.compute_loss (in {owner.__module__}) computed this micro-batch's loss without calling "
            "super().compute_loss(...), so the term would silently never be added. Call "
            "super().compute_loss(model, inputs, return_outputs, num_items_in_batch) from it and build your loss on "
            "what it returns, or use a two-pass or averaging method, which work with any compute_loss."
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The base trainer's `compute_loss`, plus SAF's or MESA's trajectory term on training
        micro-batches, or times a ``sam_m`` chunk's share of its micro-batch (see `forward_backward`)."""
        self._reached_compute_loss = True
        if self._loss_share != 1:
            self._loss_share_applied = True
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (result[0] * self._loss_share, *result[1:]) if return_outputs else result * self._loss_share
        if self.trajectory is None or not self._training_micro_batch:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = dict(inputs)  # compute_loss may pop the labels
        target = self.trajectory.before_forward(self, batch)
        with captured_forward(self.model) as seen:  # the outputs the base's loss was computed from
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        term = self.trajectory.term(self, seen, batch, target)
        if term is not None:
            self.trajectory.used = True
            accumulation = self.current_gradient_accumulation_steps
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                term = term / accumulation  # the Trainer will not divide this loss by the accumulation steps
                self._add_to_log("trajectory_loss", term)
            else:
                self._add_to_log("trajectory_loss", term / accumulation)
            loss = loss + term
        return (loss, *result[1:]) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.2x sets it; earlier 5.x has the rule below
        if scaled is not None:
            return scaled
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def get_train_dataloader(self):
        """SAF: the data loader also yields each example's index in `train_dataset`."""
        if not isinstance(self.trajectory, SAF):
            return super().get_train_dataloader()
        self._set_signature_columns_if_needed()
        saved = self.train_dataset, self.data_collator, self._signature_columns
        self.train_dataset = IndexedDataset(self.train_dataset)
        self.data_collator = IndexedCollator(self.data_collator)
        self._signature_columns = [*self._signature_columns, INDEX_KEY, HOST_INDEX_KEY]  # kept by column removal
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator, self._signature_columns = saved

    def forward_backward(self, model, inputs, num_items_in_batch=None, share=1, counted=True):
        """One forward and backward pass exactly as the base trainer's `training_step` runs it (loss
        scaling for gradient accumulation and mixed precision included); the methods call it once
        per pass.

        `counted=False`: a pass that is not the step's own (SAM's pass 2 at ``w + e``): the base
        trainer's running metrics (TRL's ``num_tokens``, ``mean_token_accuracy``, ...) are left as
        they were, so they count the step's pass 1 only, as in the plain trainer.

        `share` < 1: `inputs` is that share of the micro-batch (a chunk of ``sam_m`` samples), and
        its loss counts that much of the micro-batch's: `compute_loss` multiplies it by `share`, and
        the model gets ``num_items_in_batch * share``. A mean loss thus becomes ``share`` times the
        chunk's mean, and a loss normalised by `num_items_in_batch` (a sum over the chunk's tokens
        divided by it) stays that sum divided by `num_items_in_batch`, whether or not the Trainer
        believes the model normalises (it takes any model whose forward has ``**kwargs`` for one).
        """
        with contextlib.nullcontext() if counted else base_trainers.metrics_unchanged(self):
            if share == 1:
                return super().training_step(model, dict(inputs), num_items_in_batch)
            self._loss_share, self._loss_share_applied = share, False
            items = None if num_items_in_batch is None else num_items_in_batch * share
            try:
                loss = super().training_step(model, dict(inputs), items)
            finally:
                self._loss_share = 1
        if not self._loss_share_applied:
            raise RuntimeError(
                "sam_m weights each chunk's loss in hf-flat's compute_loss, which this trainer's compute_loss "
                "override did not call: call super().compute_loss(...) from it, or set sam_m=None."
            )
        return loss

    def forward_backward_with_outputs(self, model, inputs, num_items_in_batch=None):
        """`forward_backward`, also returning what the model returned in that pass
        (`hf_flat.methods.outputs.CapturedForward`; ESAM reads each sample's loss from it)."""
        with captured_forward(self.model) as seen:
            loss = self.forward_backward(model, inputs, num_items_in_batch)
        return loss, seen

    def loss_and_outputs(self, model, inputs, num_items_in_batch=None):
        """A training forward pass without backward (call it under `torch.no_grad`) that does not
        count in the base trainer's metrics: the loss, scaled as the Trainer scales the loss it logs,
        and what the model returned (`CapturedForward`)."""
        with self.compute_loss_context_manager(), base_trainers.metrics_unchanged(self):
            with captured_forward(self.model) as seen:
                loss = self.compute_loss(model, dict(inputs), False, num_items_in_batch)
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return loss.detach(), seen

    def _check_training_setup(self):
        """Refuse, before any step, what the chosen methods cannot do with this trainer's set-up."""
        self._check_sharded_setup()
        self._check_base_trainer()
        streamed = isinstance(self.train_dataset, torch.utils.data.IterableDataset)
        if self.args.sam_m == 1 and self.perturbation is not None and normalises_over_samples(self.model):
            raise ValueError(
                f"sam_m=1 perturbs each sample on its own, but {type(self.model).__name__} has BatchNorm layers, which "
                "cannot normalise a single sample in training mode. Use sam_m >= 2 (a divisor of the batch size), or "
                "sam_m=None."
            )
        if isinstance(self.trajectory, SAF) and streamed:
            raise ValueError(
                "flat_method='saf' keys its memory by the sample's index in train_dataset, which an "
                "IterableDataset does not have. Use flat_method='mesa' (no per-sample memory) instead."
            )
        if (
            self.averaging is not None
            and streamed
            and self.args.average_bn_batches is None
            and any(isinstance(m, _BatchNorm) for m in self.model.modules())
        ):
            raise ValueError(
                f"flat_method={self.args.flat_method!r} recomputes the BatchNorm statistics of the averaged "
                "weights from the training data, by default one pass over all of it, which never ends for an "
                "IterableDataset. Set average_bn_batches to the number of training batches to use (for "
                "example as many as one epoch has)."
            )

    def _check_base_trainer(self):
        """Refuse what the chosen method cannot do on this base trainer's batches and outputs."""
        method = self.args.flat_method
        preference = base_trainers.is_a(self, base_trainers.PREFERENCE_TRAINERS)
        if preference and self.trajectory is not None:
            raise ValueError(
                f"flat_method={method!r} is not supported with {preference}: SAF and MESA compare the distribution a "
                "model's forward gives for a batch of its inputs (classes, or next tokens) with a target, but a "
                f"{preference} batch holds pairs of completions whose loss compares the policy with a reference model, "
                "which already anchors it, and hf-flat defines no trajectory term for that. Use a two-pass method "
                "('sam', 'asam', 'gsam', 'looksam', 'avg_sam') or averaging ('swa', 'ema', 'lawa', 'wasam') with it."
            )
        if preference and (isinstance(self.perturbation, ESAM) or self.args.sam_m is not None):
            setting = f"flat_method={method!r}" if isinstance(self.perturbation, ESAM) else f"sam_m={self.args.sam_m!r}"
            raise ValueError(
                f"{setting} is not supported with {preference}: it cuts each batch into groups of samples, and a "
                f"{preference} batch's rows are chosen / rejected completions that its loss takes in pairs. Use "
                "flat_method='sam' (or 'asam', 'gsam', 'looksam', 'avg_sam') with sam_m=None."
            )
        if isinstance(self.trajectory, SAF) and is_language_model(self.model):
            raise ValueError(
                "flat_method='saf' keeps one row of logits per training sample from earlier epochs, but this model "
                "predicts one distribution per token: the memory would need samples x tokens x vocabulary entries. "
                "Use flat_method='mesa', whose EMA teacher gives per-token targets without a memory."
            )

    def _check_sharded_setup(self):
        """Refuse what DeepSpeed, FSDP or Megatron-LM (however launched: arguments or an accelerate
        config) cannot run with the chosen methods. SAF reads only the model's outputs: it runs anywhere."""
        if self.perturbation is None and self.averaging is None and not isinstance(self.trajectory, MESA):
            return
        method, distributed = self.args.flat_method, self.accelerator.distributed_type
        if self.is_deepspeed_enabled or distributed == DistributedType.DEEPSPEED:
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            raise ValueError(deepspeed_refusal(method, getattr(plugin, "zero_stage", None)))
        if distributed == DistributedType.MEGATRON_LM:
            raise ValueError(
                f"flat_method={method!r} is not supported with Megatron-LM, whose tensor parallelism splits the "
                "weights in its own layout. Use FSDP (fsdp_config={'version': 2}) or DDP."
            )
        if self.is_fsdp_enabled:
            version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)
            if version != 2:
                raise ValueError(fsdp1_refusal(method, version))
            refusal = self.perturbation and sharded_scope_refusal(method, self.args.sam_scope, self.args.sam_m)
            if refusal:
                raise ValueError(refusal)
        elif self.perturbation is not None and getattr(self, "is_distributed_loading_by_transformers", False):
            raise ValueError(  # (the attribute is not in every transformers 5.x)
                f"flat_method={method!r} does not support a model sharded at load time (from_pretrained's "
                "distributed loading), which the Trainer runs without Accelerate's FSDP: load the model whole and "
                "pass fsdp='full_shard' with fsdp_config={'version': 2} to the training arguments."
            )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler; with ``swa_lr``, wrapped in SWA's schedule from averaging's
        first step on (`hf_flat.swa_schedule`)."""
        if isinstance(self.lr_scheduler, SWASchedule):  # a later train(): wrap the Trainer's own anew
            self.lr_scheduler = self.lr_scheduler.scheduler
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.args.swa_lr is None or self.averaging is None:
            return scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # one passed in `optimizers=`
            raise ValueError(
                f"swa_lr={self.args.swa_lr!r} is not supported with a ReduceLROnPlateau scheduler: SWA's schedule sets "
                "the rate at every optimizer step from averaging's start on, and ReduceLROnPlateau steps only on "
                "evaluation metrics. Pass a step-wise scheduler, or leave swa_lr=None."
            )
        self.lr_scheduler = SWASchedule(
            scheduler, start_step(self.args.average_start, num_training_steps), self.args.swa_lr,
            self.args.swa_anneal_steps, self.args.swa_anneal_strategy, self.args.swa_cycle_steps,
        )
        return self.lr_scheduler

    # ---- averaged weights -------------------------------------------------------------------
    def evaluate(self, *args, **kwargs):
        """The base trainer's `evaluate`, with every argument it takes (`Seq2SeqTrainer`'s generation
        keywords too). During training with an averaging method, the averaged weights are evaluated
        in the same call: their metrics, prefixed ``eval_avg_``, are logged together with the live
        ones, passed to the callbacks' ``on_evaluate`` (early stopping), used for best-checkpoint
        selection (``metric_for_best_model="eval_avg_loss"``) and returned. Before the first
        snapshot the average is the live model, so ``eval_avg_*`` equals ``eval_*``."""
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluation_loop`; inside `evaluate()` during training with an averaging method,
        the averaged weights' metrics are added to the live ones: those the loop computes (loss,
        ``compute_metrics`` on generated or predicted outputs) and those a TRL-style trainer records
        in its ``_metrics["eval"]`` (``entropy``, ``mean_token_accuracy``, ``rewards/*``), each
        from the averaged weights' passes only."""
        averaging = self._evaluating and self.is_in_train and self.averaging is not None
        before = self._recorded_eval_metrics() if averaging else None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if not averaging:
            return output
        prefix = averaged_prefix(metric_key_prefix)
        live_recorded = self._recorded_eval_metrics()
        if not self.averaging.count:  # no snapshot yet: the average is the live model
            live = f"{metric_key_prefix}_"
            averaged = {f"{prefix}_{k[len(live):]}": v for k, v in output.metrics.items() if k.startswith(live)}
            recorded = base_trainers.new_eval_metrics(before, live_recorded) if before is not None else {}
        else:
            start = time.time()
            with self.averaging.swapped_in(self.model):
                result = super().evaluation_loop(
                    dataloader, "Evaluation of the averaged weights", prediction_loss_only, ignore_keys, prefix
                )
            steps = math.ceil(result.num_samples / (self.args.eval_batch_size * self.args.world_size))
            averaged = {**result.metrics, **speed_metrics(prefix, start, result.num_samples, steps)}
            recorded = {}
            if live_recorded is not None:  # the averaged passes' records leave the live ones as they were
                recorded = base_trainers.new_eval_metrics(live_recorded, self._recorded_eval_metrics())
                self._metrics["eval"].clear()  # (in place: TRL's is a defaultdict)
                self._metrics["eval"].update(live_recorded)
            # `evaluate` times both passes together: `log` takes this one out of the live speed metrics
            self._averaged_eval_seconds[metric_key_prefix] = time.time() - start
        averaged.update({f"{prefix}_{name}": value for name, value in recorded.items()})
        output.metrics.update(averaged)
        return output

    def _recorded_eval_metrics(self) -> dict | None:
        """A copy of a TRL-style trainer's evaluation records (``_metrics["eval"]``), or None."""
        records = getattr(self, "_metrics", None)
        if isinstance(records, dict) and isinstance(records.get("eval"), dict):
            return {name: list(values) for name, values in records["eval"].items()}
        return None

    def _batchnorm_batches(self):
        """The training data in order, batched and collated as for training, on this process's
        device: all of it, or its first `average_bn_batches` batches. Every process reads the same
        batches, so all get the same BatchNorm statistics."""
        dataset, collator = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names"):  # a datasets.Dataset
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(dataset, batch_size=self._train_batch_size, collate_fn=collator)
        for batch in itertools.islice(loader, self.args.average_bn_batches):
            yield self._prepare_inputs(batch)

    # ---- model card ------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs):
        """The base trainer's model card (the Trainer's, or TRL's), tagged ``hf-flat`` and with the
        flat method's names, and with a section that names the method, its paper and its settings."""
        tags = flat_tags(self.args)
        if not tags:
            return super().create_model_card(*args, **kwargs)
        signature = inspect.signature(super().create_model_card)
        bound = signature.bind_partial(*args, **kwargs)
        if base_trainers.parameter_named(signature, "tags") is not None:
            given = bound.arguments.get("tags")
            given = [] if given is None else [given] if isinstance(given, str) else list(given)
            bound.arguments["tags"] = given + [t for t in tags if t not in given]
        result = super().create_model_card(*bound.args, **bound.kwargs)
        card = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                text = f.read()
            if FLAT_CARD_HEADING not in text:
                with open(card, "a", encoding="utf-8") as f:
                    f.write("\n" + flat_card_section(self.args))
        return result

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, with `FLAT_STATE_NAME` written into the folder first: the
        Trainer pushes the folder to the Hub (``hub_strategy="checkpoint"``) before it returns.
        Under FSDP2 each process also writes its rows of the average / teacher there
        (`hf_flat.state_file`)."""
        parts = self._stateful_parts()
        if parts:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            path, states = os.path.join(folder, FLAT_STATE_NAME), [part.state_dict() for part in parts]
            shards = self.args.world_size if is_sharded_state(states) else None
            if shards:  # FSDP2: every process writes its rows, then the main process the file that lists them
                os.makedirs(folder, exist_ok=True)
                save_shard_file(path, states, self.args.process_index, shards)
                self.accelerator.wait_for_everyone()
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                save_flat_state(path, states, self.args.flat_method, shards)
        super()._save_checkpoint(model, trial)

    def _stateful_parts(self):
        """The flat components whose state must survive a resume (SAF memory, MESA teacher, average,
        average SAM's count of random directions)."""
        parts = (self.perturbation, self.trajectory, self.averaging)
        return [part for part in parts if part is not None and hasattr(part, "state_dict")]

    def _load_flat_state(self, checkpoint):
        """Restore the state of every stateful method from `checkpoint`.

        The rule: a checkpoint must hold exactly the state this run keeps. Changing a stateless
        setting (``sam`` <-> ``asam`` <-> ``none``, ``sam_rho``, ...) is fine; resuming with a method
        whose state the checkpoint lacks (``sam`` -> ``sam+swa``, ``saf`` -> ``saf+swa``) or that
        would drop state the checkpoint holds (``wasam`` -> ``sam``) is refused, since it would
        silently restart or lose an average, a SAF memory or a MESA teacher.
        """
        path = os.path.join(checkpoint, FLAT_STATE_NAME)
        tensors, meta = load_flat_state(path) if os.path.isfile(path) else ({}, {})
        saved, needed = state_kinds(meta), {kind for part in self._stateful_parts() for kind in part_kinds(part)}
        if saved != needed:
            if not meta:
                written = f"a run without flat state: it has no {FLAT_STATE_NAME}"
            else:
                written = f"flat_method={meta['flat_method']!r}" if "flat_method" in meta else "an earlier hf-flat"
            problems = []
            if needed - saved:
                problems.append(f"it holds no state for {', '.join(sorted(needed - saved))}, which would start from nothing")
            if saved - needed:
                problems.append(f"its state for {', '.join(sorted(saved - needed))} would be dropped")
            raise ValueError(
                f"Cannot resume flat_method={self.args.flat_method!r} from {checkpoint} (written by {written}): "
                f"{' and '.join(problems)}. Resume with the flat_method that wrote the checkpoint, or start a new "
                f"run from its weights: load the model from {checkpoint} and train without resume_from_checkpoint."
            )
        self._check_resumed_schedule(checkpoint)
        for part in self._stateful_parts():
            part.load_state_dict(tensors, meta)
        saf_rows = getattr(self.trajectory, "logits", None)
        if isinstance(self.trajectory, SAF) and saf_rows is not None:
            if saf_rows.shape[1] != len(self.train_dataset):
                raise ValueError(
                    f"Cannot resume from {checkpoint}: its SAF memory has rows for {saf_rows.shape[1]} samples but "
                    f"train_dataset has {len(self.train_dataset)}. Resume with the training data that wrote the checkpoint."
                )
            if saf_rows.shape[0] != self.trajectory.past_epochs:
                raise ValueError(
                    f"Cannot resume saf_past_epochs={self.trajectory.past_epochs!r} from {checkpoint}: its SAF memory "
                    f"keeps {saf_rows.shape[0]} past epoch(s), in slots by epoch modulo that number. Resume with "
                    f"saf_past_epochs={saf_rows.shape[0]}."
                )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's loading of a checkpoint's weights on resume, repaired where transformers'
        own is wrong (`_load_renamed_weights`)."""
        model = self.model if model is None else model
        if not self._load_renamed_weights(resume_from_checkpoint, model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        """The Trainer's loading of the best checkpoint (``load_best_model_at_end``), repaired as on
        resume (`_load_renamed_weights`)."""
        if not self._load_renamed_weights(self.state.best_model_checkpoint, self.model):
            return super()._load_best_model()

    def _load_renamed_weights(self, checkpoint, model) -> bool:
        """Load `checkpoint`'s weights into `model` through `from_pretrained` when the checkpoint
        names weights the model does not have; False (nothing done) otherwise.

        transformers 5.2x's Trainer loads ``model.safetensors`` as a raw state dict with
        ``strict=False`` (on resume and for ``load_best_model_at_end``), but `save_pretrained` writes
        some models' weights under their older names (ViT: ``vit.encoder.layer.0.attention.attention.query.weight``
        for ``vit.layers.0.attention.q_proj.weight``): the Trainer then leaves the encoder as it was,
        with only a warning, under the plain `Trainer` too. `from_pretrained` renames them.
        (`_load_from_checkpoint` and `_load_best_model` are private members of `Trainer`;
        tests/test_retries_and_edges.py resumes a ViT and loads its best checkpoint, and fails if
        this stops running.)"""
        saved = saved_weight_names(checkpoint) if checkpoint else None
        if (
            saved is None or saved <= set(model.state_dict()) or not hasattr(type(model), "from_pretrained")
            or self.is_fsdp_enabled or self.is_deepspeed_enabled
        ):
            return False
        logger.info(f"{checkpoint} names the weights differently from the model: loading them with from_pretrained.")
        model.load_state_dict(type(model).from_pretrained(checkpoint).state_dict())
        return True

    def _check_resumed_schedule(self, checkpoint):
        """SWA's schedule (``swa_lr``) and the Trainer's own keep different state in the checkpoint's
        ``scheduler.pt``: refuse a resume that switches ``swa_lr`` on or off."""
        path = os.path.join(checkpoint, "scheduler.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # no file, or a scheduler of the user's own: the Trainer loads it as it can
            return
        saved = isinstance(state, dict) and {"done", "start_lrs", "scheduler"} <= set(state)
        wanted = self.args.swa_lr is not None and self.averaging is not None
        if saved != wanted:
            written = "SWA's schedule (it was written with swa_lr set)" if saved else "the Trainer's own schedule (it was written with swa_lr=None)"
            instead = "the swa_lr it was written with" if saved else "swa_lr=None"
            raise ValueError(
                f"Cannot resume with swa_lr={self.args.swa_lr!r} from {checkpoint}: its scheduler.pt holds {written}, "
                f"which this run's schedule cannot continue. Resume with {instead}, or start a new run from its "
                f"weights: load the model from {checkpoint} and train without resume_from_checkpoint."
            )

    # ---- logging ---------------------------------------------------------------------------
    def _add_to_log(self, name, value):
        """Sum a per-micro-batch value (scaled like the Trainer's loss) until the next training log,
        on the device. ``perturbed_loss`` and ``sharpness`` also count the micro-batches whose value
        is finite, and sum only those: a step whose perturbation overflowed (fp16; the GradScaler
        skips it) leaves their averages as they were, without a value being read on the host."""
        value = value.detach().float()
        if name in PERTURBED_LOGS:
            self._log_values[name] = self._log_values.get(name, 0) + 1
            finite = torch.isfinite(value)
            value = torch.where(finite, value, torch.zeros_like(value))
            self._add_to_log(f"{name}_count", finite.float())
        if name not in self._log_sums:
            self._log_sums[name] = torch.zeros((), device=value.device)
        self._log_sums[name] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for prefix, seconds in self._averaged_eval_seconds.items():
            _exclude_from_speed_metrics(logs, prefix, seconds)
        self._averaged_eval_seconds = {}
        if "loss" in logs and self._log_steps > 0:  # averages over the whole logging window
            counts = {name: self._log_sums.pop(f"{name}_count") for name in PERTURBED_LOGS if f"{name}_count" in self._log_sums}
            for name, total in self._log_sums.items():
                # perturbed_loss and sharpness: over the perturbed steps only (all of them unless on a schedule),
                # and of those over the micro-batches with a finite value (as a share of the perturbed ones)
                steps = self._log_perturbed_steps if name in PERTURBED_LOGS else self._log_steps
                if steps:  # the same on every process, so every process takes part in the reduce
                    processes = self.accelerator.num_processes
                    value = self.accelerator.reduce(total.clone(), reduction="sum").item() / (steps * processes)
                    if name in counts:  # scaled up from the finite values to all the perturbed ones
                        finite = self.accelerator.reduce(counts[name].clone(), reduction="sum").item()
                        added = self._log_values.get(name, 0) * processes
                        value = value * added / finite if finite else None
                    if value is not None:
                        logs[name] = value
                total.zero_()
            self._log_values = {}
            self._log_steps = self._log_perturbed_steps = 0
            if "trajectory_loss" in logs:
                logs["task_loss"] = logs["loss"] - logs["trajectory_loss"]
        super().log(logs, start_time)




class FlatTrainer(FlatTrainerMixin, Trainer):
    """A `transformers.Trainer` that trains with the method `args.flat_method` names.

    Example:
        >>> from hf_flat import FlatTrainer, TrainingArguments
        >>> args = TrainingArguments("out", flat_method="sam", sam_rho=0.05)
        >>> FlatTrainer(model=model, args=args, train_dataset=train).train()

    What the logs and evaluations carry is `FlatTrainerMixin`'s. For another trainer class (TRL's
    `SFTTrainer`, `DPOTrainer`, your own subclass) use `flat_trainer_class`.
    """


class FlatSeq2SeqTrainer(FlatTrainerMixin, Seq2SeqTrainer):
    """A `transformers.Seq2SeqTrainer` that trains with the method `args.flat_method` names; with
    ``predict_with_generate=True`` it evaluates by generating, the averaged weights too, and
    `evaluate` / `predict` take the generation keywords (``max_length``, ``num_beams``, ...).

    Example:
        >>> from hf_flat import FlatSeq2SeqTrainer, FlatSeq2SeqTrainingArguments
        >>> args = FlatSeq2SeqTrainingArguments("out", flat_method="wasam", predict_with_generate=True)
        >>> FlatSeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev).train()
    """


#: Trainer class -> its flat class (`flat_trainer_class`).
_FLAT_TRAINERS: dict[type, type] = {Trainer: FlatTrainer, Seq2SeqTrainer: FlatSeq2SeqTrainer}


def flat_trainer_class(base: type) -> type:
    """The trainer class with every flat method on top of the `Trainer` subclass `base`: the
    trainer twin of `flat_arguments_class`.

    `base` itself when it already is a flat trainer; `FlatTrainer` for `Trainer` and
    `FlatSeq2SeqTrainer` for `Seq2SeqTrainer`; otherwise a class made once and cached,
    ``Flat<base.__name__>(FlatTrainerMixin, base)``. It takes the constructor arguments exactly as
    `base` defines them (DPO's ``ref_model`` stays second), keeps every override of `base` (its
    loss, metrics, `prediction_step`, `evaluate` keywords, model card), and takes its arguments from
    ``flat_arguments_class(type(args))`` instances. A base whose training step cannot be wrapped
    exactly (TRL's on-policy trainers, which generate inside it) raises a `TypeError` that says why.

    Example:
        >>> from trl import SFTConfig, SFTTrainer
        >>> FlatSFTTrainer = flat_trainer_class(SFTTrainer)
        >>> args = flat_arguments_class(SFTConfig)("out", flat_method="sam", sam_rho=0.05)
        >>> FlatSFTTrainer(model=model, args=args, train_dataset=train).train()

    Writing ``class MyTrainer(FlatTrainer, SFTTrainer)`` (or the bases the other way round) gives
    the same behaviour (see `FlatFirst`).
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"flat_trainer_class() takes a transformers.Trainer subclass, not {base!r}.")
    if isinstance(base, FlatFirst):
        return base
    if base not in _FLAT_TRAINERS:
        doc = f"`{base.__module__}.{base.__qualname__}` with the flat-minima methods (`hf_flat.flat_trainer_class`)."
        _FLAT_TRAINERS[base] = FlatFirst(f"Flat{base.__name__}", (FlatTrainerMixin, base), {"__module__": __name__, "__doc__": doc})
    return _FLAT_TRAINERS[base]


def saved_weight_names(folder: str) -> set[str] | None:
    """The names of the weights in `folder`'s ``model.safetensors`` (or its sharded index), or None."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None


def checkpoint_is_complete(folder: str) -> bool:
    """Whether the Trainer finished writing `folder`: `trainer_state.json`, the last file it writes
    into a checkpoint, is there and readable. (The flat state file is written first, atomically.)"""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def refuse_incomplete_checkpoint(folder: str):
    """A run stopped while writing `folder` (a `kill -9`, a lost machine) leaves it incomplete:
    resuming from it would fail half-way or restore a mix of states. Refuse, and name the newest
    complete checkpoint beside it."""
    if checkpoint_is_complete(folder):
        return
    parent = os.path.dirname(os.path.abspath(folder))
    steps = sorted(
        (int(name.rsplit("-", 1)[1]), os.path.join(parent, name))
        for name in os.listdir(parent)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.rsplit("-", 1)[1].isdigit()
    )
    usable = [path for _, path in steps if path != os.path.abspath(folder) and checkpoint_is_complete(path)]
    instead = (
        f"Resume from {usable[-1]} instead (the newest complete one), or delete {folder}."
        if usable
        else "No complete checkpoint is left beside it: delete it and train from the start."
    )
    raise ValueError(
        f"Checkpoint {folder} is incomplete: its {TRAINER_STATE_NAME} is missing or unreadable, so the run was "
        f"stopped while writing it. {instead}"
    )


def _exclude_from_speed_metrics(logs: dict, prefix: str, seconds: float):
    """Take `seconds` out of the speed metrics `Trainer.evaluate` computed for `prefix` (in place)."""
    runtime = logs.get(f"{prefix}_runtime")
    if runtime is None:
        return
    live = max(runtime - seconds, 1e-4)
    logs[f"{prefix}_runtime"] = round(live, 4)
    for key in (f"{prefix}_samples_per_second", f"{prefix}_steps_per_second"):
        if key in logs:
            logs[key] = round(logs[key] * runtime / live, 3)


def objective_of_live_metrics(metrics: dict[str, float]) -> float:
    """`default_compute_objective` on the live weights' metrics only (without ``*_avg_*``), so that
    averaging does not change what a hyperparameter search optimises by default."""
    return default_compute_objective({k: v for k, v in metrics.items() if not k.startswith("eval_avg_")})


def part_kinds(part) -> set[str]:
    """What state a method object keeps: ``swa`` / ``ema`` (an average), ``saf``, ``mesa`` or ``avg_sam``."""
    kind = getattr(part, "method", None) or getattr(part, "state_kind", None)  # WeightAveraging, AverageSAM
    return {kind} if kind else {type(part).__name__.lower()}


def state_kinds(meta: dict) -> set[str]:
    """What state a checkpoint's flat state file holds, from its metadata."""
    kinds = {meta["averaging"]} if "averaging" in meta else set()
    return kinds | {name for name in ("saf", "mesa", "avg_sam", "looksam", "esam") if f"{name}_version" in meta}
