"""`FlatTrainer`: the Hugging Face `Trainer` with flat-minima methods.

The trainer stays thin: it builds the methods that `args.flat_method` names and delegates to
them: two-pass steps (`hf_flat.methods.sam`), trajectory losses (`hf_flat.methods.saf` /
`mesa`) and weight averaging (`hf_flat.averaging`, a callback). Everything else (gradient
accumulation, clipping, mixed precision, DDP, FSDP, checkpoints, evaluation) is the Trainer's own
code. Under FSDP2 the methods work on each process's rows of the sharded parameters
(`hf_flat.sharding`) and checkpoints hold the flat state in shard files (`hf_flat.state_file`).

Private `Trainer` members it still relies on, because no public hook does the same job, and the
tests that fail if their behaviour changes:

- `_save_checkpoint` (write the flat state into the folder before the Trainer pushes it; `on_save`
  runs after the push) and `_get_output_dir` (that folder's name): the Hub-push, resume and
  crash-safety tests in tests/test_trainer_surface.py, test_averaging.py, test_crash_safety.py.
- `_hp_search_setup` (the point where a trial's values are on `args`): the optuna test in
  tests/test_trainer_surface.py.
- the rule behind `loss_is_scaled_for_ga` (copied in `_loss_is_scaled_for_ga`, read with a fallback
  where the attribute is missing): tests/test_private_members.py.
- `_remove_unused_columns`, `_get_collator_with_removed_columns`, `_train_batch_size` (after
  `auto_find_batch_size`) and `_prepare_inputs`, to batch the training data exactly as for training
  when BatchNorm is recomputed: the BatchNorm tests in tests/test_averaging.py compare with a hand pass.
- `_set_signature_columns_if_needed` / `_signature_columns`, so that SAF's sample index survives
  column removal: the SAF tests with a `datasets.Dataset` and extra columns.
"""

import dataclasses
import itertools
import json
import math
import os
import time

import torch
from accelerate.utils import DistributedType
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR, default_compute_objective, get_last_checkpoint, speed_metrics,
)
from transformers.utils import logging

from .args import (
    FlatArgumentsMixin, FlatTrainingArguments, deepspeed_refusal, flat_arguments_class, fsdp1_refusal, sharded_scope_refusal,
)
from .averaging import build_averaging
from .methods.two_pass import start_step
from .state_file import is_sharded_state, load_flat_state, save_flat_state, save_shard_file
from .methods import MESA, SAF, build_perturbation, build_trajectory
from .swa_schedule import SWASchedule
from .methods.saf import INDEX_KEY, IndexedCollator, IndexedDataset
from .methods.trajectory import logits_of, returns_loss_first

logger = logging.get_logger(__name__)

#: The file in each checkpoint folder that holds hf-flat's own state (safetensors: loads without code).
FLAT_STATE_NAME = "hf_flat_state.safetensors"


def as_flat_args(args: TrainingArguments | None) -> FlatArgumentsMixin:
    """Flat arguments from what the user passed: flat arguments as they are; a plain
    `TrainingArguments` or any subclass (e.g. `Seq2SeqTrainingArguments`) becomes an instance of
    `flat_arguments_class(type(args))` that keeps every value and has `flat_method='none'`;
    `None` gives the Trainer's default output folder."""
    if args is None:
        return FlatTrainingArguments(output_dir="trainer_output")
    if isinstance(args, FlatArgumentsMixin):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return flat_arguments_class(type(args))(**values)
    raise TypeError(f"args must be a FlatTrainingArguments (hf_flat.TrainingArguments), not {type(args).__name__}.")


class FlatTrainer(Trainer):
    """A `transformers.Trainer` that trains with the method `args.flat_method` names.

    Example:
        >>> from hf_flat import FlatTrainer, TrainingArguments
        >>> args = TrainingArguments("out", flat_method="sam", sam_rho=0.05)
        >>> FlatTrainer(model=model, args=args, train_dataset=train).train()

    With SAM or ASAM every training log also carries ``perturbed_loss``, L(w + e), and
    ``sharpness`` = L(w + e) - L(w), averaged like ``loss`` but over the perturbed optimizer steps
    only (every step unless ``sam_start`` / ``sam_interval`` set a schedule; a log whose window
    has no perturbed step has neither). With average SAM, ``loss`` is L(w + e) on perturbed steps,
    its only pass.

    With SAF or MESA the loss gains the trajectory term, logged as ``trajectory_loss`` beside
    ``task_loss``.

    With an averaging method (SWA, EMA) each evaluation during training also evaluates the averaged
    weights (metrics prefixed ``eval_avg_``), and at the end of training the model holds them.
    """

    def __init__(self, model=None, args=None, *positional, **kwargs):
        super().__init__(model, as_flat_args(args), *positional, **kwargs)
        self._flat_callbacks = []  # the method objects that are callbacks, registered with the Trainer
        self._flat_checkpoint = None  # the checkpoint whose flat state the methods restore
        self._log_sums = {}  # name -> sum since the last training log (on device), e.g. perturbed_loss
        self._log_steps = 0  # optimizer steps since the last training log
        self._log_perturbed_steps = 0  # ... of which perturbed steps (perturbed_loss, sharpness average over those)
        self._perturbed_step = False  # the current optimizer step is a perturbed one
        self._sample_indices = None  # SAF: the current micro-batch's indices in train_dataset
        self._training_micro_batch = False
        self._loss_share, self._loss_share_applied = 1, False  # sam_m: the current chunk's share of its micro-batch
        self._keep_outputs, self._kept_outputs = False, None  # forward_backward_with_outputs
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
        self._flat_callbacks = [m for m in (self.trajectory, self.averaging) if isinstance(m, TrainerCallback)]
        # First in line, so every other callback sees their work: at on_train_end the model already
        # holds the averaged weights (reporting integrations, a callback that saves the model).
        self.callback_handler.callbacks[:0] = self._flat_callbacks
        if self._flat_checkpoint:
            self._load_flat_state(self._flat_checkpoint)

    # ---- training --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            refuse_incomplete_checkpoint(str(resume_from_checkpoint))
        self._flat_checkpoint = resume_from_checkpoint or None
        self._log_sums, self._log_steps, self._log_perturbed_steps, self._perturbed_step = {}, 0, 0, False
        self._set_up_flat_methods()
        self._check_training_setup()
        return super().train(resume_from_checkpoint or None, trial, ignore_keys_for_eval, **kwargs)

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
            self._set_up_flat_methods()
            self._check_training_setup()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(self.trajectory, SAF):  # the sample indices never reach the model
            inputs = dict(inputs)
            self._sample_indices = inputs.pop(INDEX_KEY, None)
        self._training_micro_batch = True
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
        if self.accelerator.sync_gradients:
            self._log_steps += 1
            self._log_perturbed_steps += int(self._perturbed_step)
            self._perturbed_step = False
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss`, plus SAF's or MESA's trajectory loss on training micro-batches, or
        times a ``sam_m`` chunk's share of its micro-batch (see `forward_backward`)."""
        if self._keep_outputs:  # (forward_backward_with_outputs)
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self._kept_outputs = outputs
            return (loss, outputs) if return_outputs else loss
        if self._loss_share != 1:
            self._loss_share_applied = True
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            loss = loss * self._loss_share
            return (loss, outputs) if return_outputs else loss
        if self.trajectory is None or not self._training_micro_batch:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        teacher_inputs = dict(inputs)  # compute_loss may pop the labels
        target = self.trajectory.before_forward(self, teacher_inputs)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        # `inputs` is now what the model got: without its labels, a tuple output has no loss first
        logits = logits_of(outputs, self.model, returns_loss_first(inputs, self.label_names))
        term = self.trajectory.term(self, logits, teacher_inputs, target)
        if term is not None:
            self.trajectory.used = True
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
        self._signature_columns = [*self._signature_columns, INDEX_KEY]  # kept by column removal
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator, self._signature_columns = saved

    def forward_backward(self, model, inputs, num_items_in_batch=None, share=1):
        """One forward and backward pass exactly as the plain Trainer runs it (loss scaling for
        gradient accumulation and mixed precision included); the methods call it once per pass.

        `share` < 1: `inputs` is that share of the micro-batch (a chunk of ``sam_m`` samples), and
        its loss counts that much of the micro-batch's: `compute_loss` multiplies it by `share`, and
        the model gets ``num_items_in_batch * share``. A mean loss thus becomes ``share`` times the
        chunk's mean, and a loss normalised by `num_items_in_batch` (a sum over the chunk's tokens
        divided by it) stays that sum divided by `num_items_in_batch`, whether or not the Trainer
        believes the model normalises (it takes any model whose forward has ``**kwargs`` for one).
        """
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
                "sam_m weights each chunk's loss in FlatTrainer.compute_loss, which this trainer's compute_loss "
                "override did not call: call super().compute_loss(...) from it, or set sam_m=None."
            )
        return loss

    def forward_backward_with_outputs(self, model, inputs, num_items_in_batch=None):
        """`forward_backward`, also returning the model's outputs of that pass (ESAM reads each
        sample's loss from them)."""
        self._keep_outputs, self._kept_outputs = True, None
        try:
            loss = self.forward_backward(model, inputs, num_items_in_batch)
        finally:
            self._keep_outputs = False
        outputs, self._kept_outputs = self._kept_outputs, None
        return loss, outputs

    def loss_and_outputs(self, model, inputs, num_items_in_batch=None):
        """A training forward pass without backward (call it under `torch.no_grad`): the loss,
        scaled as the Trainer scales the loss it logs, and the model's outputs."""
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, dict(inputs), True, num_items_in_batch)
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return loss.detach(), outputs

    def _check_training_setup(self):
        """Refuse, before any step, what the chosen methods cannot do with this trainer's set-up."""
        self._check_sharded_setup()
        streamed = isinstance(self.train_dataset, torch.utils.data.IterableDataset)
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
        self.lr_scheduler = SWASchedule(
            scheduler, start_step(self.args.average_start, num_training_steps), self.args.swa_lr,
            self.args.swa_anneal_steps, self.args.swa_anneal_strategy, self.args.swa_cycle_steps,
        )
        return self.lr_scheduler

    # ---- averaged weights -------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluate`. During training with an averaging method, the averaged weights are
        evaluated in the same call: their metrics, prefixed ``eval_avg_``, are logged together with
        the live ones, passed to the callbacks' ``on_evaluate`` (early stopping), used for
        best-checkpoint selection (``metric_for_best_model="eval_avg_loss"``) and returned. Before
        the first snapshot the average is the live model, so ``eval_avg_*`` equals ``eval_*``."""
        self._evaluating = True
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluation_loop`; inside `evaluate()` during training with an averaging method,
        the averaged weights' metrics are added to the live ones."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if not (self._evaluating and self.is_in_train and self.averaging is not None):
            return output
        prefix = averaged_prefix(metric_key_prefix)
        if not self.averaging.count:  # no snapshot yet: the average is the live model
            live = f"{metric_key_prefix}_"
            averaged = {f"{prefix}_{k[len(live):]}": v for k, v in output.metrics.items() if k.startswith(live)}
        else:
            start = time.time()
            with self.averaging.swapped_in(self.model):
                result = super().evaluation_loop(
                    dataloader, "Evaluation of the averaged weights", prediction_loss_only, ignore_keys, prefix
                )
            steps = math.ceil(result.num_samples / (self.args.eval_batch_size * self.args.world_size))
            averaged = {**result.metrics, **speed_metrics(prefix, start, result.num_samples, steps)}
            # `evaluate` times both passes together: `log` takes this one out of the live speed metrics
            self._averaged_eval_seconds[metric_key_prefix] = time.time() - start
        output.metrics.update(averaged)
        return output

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
        for part in self._stateful_parts():
            part.load_state_dict(tensors, meta)
        saf_rows = getattr(self.trajectory, "logits", None)
        if isinstance(self.trajectory, SAF) and saf_rows is not None and saf_rows.shape[1] != len(self.train_dataset):
            raise ValueError(
                f"The SAF memory in {checkpoint} has rows for {saf_rows.shape[1]} samples but train_dataset has "
                f"{len(self.train_dataset)}: resume with the training data that wrote the checkpoint."
            )

    # ---- logging ---------------------------------------------------------------------------
    def _add_to_log(self, name, value):
        """Sum a per-micro-batch value (scaled like the Trainer's loss) until the next training log."""
        if name not in self._log_sums:
            self._log_sums[name] = torch.zeros((), device=value.device)
        self._log_sums[name] += value.detach().float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for prefix, seconds in self._averaged_eval_seconds.items():
            _exclude_from_speed_metrics(logs, prefix, seconds)
        self._averaged_eval_seconds = {}
        if "loss" in logs and self._log_steps > 0:  # averages over the whole logging window
            for name, total in self._log_sums.items():
                # perturbed_loss and sharpness: over the perturbed steps only (all of them unless on a schedule)
                steps = self._log_perturbed_steps if name in ("perturbed_loss", "sharpness") else self._log_steps
                if steps:  # the same on every process, so every process takes part in the reduce
                    logs[name] = self.accelerator.reduce(total.clone(), reduction="mean").item() / steps
                total.zero_()
            self._log_steps = self._log_perturbed_steps = 0
            if "trajectory_loss" in logs:
                logs["task_loss"] = logs["loss"] - logs["trajectory_loss"]
        super().log(logs, start_time)


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


def averaged_prefix(metric_key_prefix: str) -> str:
    """``eval`` -> ``eval_avg``, ``eval_a`` -> ``eval_avg_a``, ``test`` -> ``test_avg``."""
    if metric_key_prefix == "eval" or metric_key_prefix.startswith("eval_"):
        return metric_key_prefix.replace("eval", "eval_avg", 1)
    return f"{metric_key_prefix}_avg"


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
