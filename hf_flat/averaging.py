"""Weight averaging along the training trajectory, as a `TrainerCallback`.

- **SWA** (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging Weights Leads to Wider Optima
  and Better Generalization", UAI 2018, arXiv 1803.05407): a running mean of snapshots
  of the weights, ``avg = (n * avg + w) / (n + 1)``, one snapshot after optimizer step ``t`` iff
  ``t >= start_step`` and ``t % average_freq == 0`` (or, for ``average_freq = 0``, ``t`` ends an
  epoch). Combined with SAM this is WASAM (Kaddour, Liu, Silva, Kusner, "When Do Flat Minima
  Optimizers Work?", NeurIPS 2022, arXiv 2202.00661, Algorithm 1 lines 7-9).
- **EMA**: ``v = decay * v + (1 - decay) * w`` after every optimizer step after ``start_step``,
  with ``v = w`` at ``start_step``.
- **LAWA** (Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
  Weight Averaging", arXiv 2209.14981): the mean of the latest ``k`` snapshots (``lawa_k``), taken at
  SWA's moments: a sliding window of ``k`` float32 copies; the mean is computed when it is used.

With SWA's cyclical learning rate (``swa_cycle_steps = c``, `hf_flat.swa_schedule`) the SWA and
LAWA snapshots are taken at the end of each cycle instead: steps ``start_step - 1 + j * c``.

``start_step = max(1, ceil(average_start * total_optimizer_steps))``. The average covers the
trainable parameters (under PEFT: the adapters), is kept in float32 (on the parameters' device,
or on the CPU with ``average_on_cpu``) and is updated with torch's foreach averaging functions.
BatchNorm running statistics are recomputed for the averaged weights (one pass over the
training data, momentum ``None``) before they are evaluated or become the final model.

Under FSDP2 each process averages the rows of each parameter that it holds (`hf_flat.sharding`):
the average takes ``1 / processes`` of a float32 copy of the trainable weights on each process,
and updating it needs no communication. Checkpoints store it by rows of the whole parameters
(`hf_flat.state_file`), so a run with any number of processes, sharded or not, can resume it.
"""

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn
from transformers import TrainerCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .methods.two_pass import start_step
from .sharding import ShardedTensor, is_sharded, local, reshard, rows_of
from .state_file import load_flat_state, rows_of_state, save_flat_state, shape_in_state

logger = logging.get_logger(__name__)

#: Bumped when the layout of the averaging entries in the checkpoint file changes.
STATE_VERSION = "1"
#: The file in each checkpoint folder that holds the average of a `WeightAveraging` used on its own
#: (inside a flat trainer the average is part of ``hf_flat_state.safetensors``).
AVERAGING_STATE_NAME = "hf_flat_averaging.safetensors"


def recompute_batchnorm(model: nn.Module, batches) -> bool:
    """Recompute BatchNorm running statistics as a plain average over `batches` (momentum None),
    like `torch.optim.swa_utils.update_bn`, for dict batches as the Trainer yields them.
    Returns False (and iterates nothing) when the model has no BatchNorm layer."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return False
    momenta = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    was_training = model.training
    model.train()
    with torch.no_grad():
        for batch in batches():
            model(**batch)
    for layer, momentum in momenta.items():
        layer.momentum = momentum
    model.train(was_training)
    return True


@contextlib.contextmanager
def preserved_rng_state():
    """Leave Python's, NumPy's and torch's random streams exactly as they were."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class WeightAveraging(TrainerCallback):
    """SWA, EMA or LAWA of the trainable weights, as a `TrainerCallback`. The flat trainers add it
    for ``flat_method`` ``swa``, ``ema``, ``lawa``, ``wasam`` or ``<perturbation>+<averaging>``; it
    also works on its own, on any Trainer (the plain one, TRL's `SFTTrainer` / `DPOTrainer`, ...):

        >>> trainer = SFTTrainer(model=model, args=SFTConfig("out", save_steps=50), train_dataset=train,
        ...                      callbacks=[WeightAveraging("ema", start=0.5, decay=0.999)])

    On its own it averages exactly as inside a flat trainer, puts the average into the model at the
    end of training, writes it into each checkpoint folder (``hf_flat_averaging.safetensors``) and
    restores it on resume (from a checkpoint in ``output_dir``), and adds ``eval_avg_loss`` (the
    model's own loss on the evaluation batches, averaged over the samples) to what each evaluation
    during training returns and to ``trainer.state.log_history``; list it before an
    `EarlyStoppingCallback` that watches ``eval_avg_loss``. What needs a flat trainer
    (`hf_flat.flat_trainer_class`), and is refused or warned about here: every other ``eval_avg_``
    metric (``compute_metrics``, TRL's metrics, generated ones) and the averaged metrics in the
    reporting integrations' logs; models with BatchNorm (recomputing its statistics needs the
    training batches in order); FSDP; SWA's learning-rate schedule (``swa_lr``); the average in a
    checkpoint pushed to the Hub, and in hyperparameter-search trials.

    The average is kept per parameter *name*, so it always lands in the layer it came from.
    Parameters may join or leave the trainable set during training (gradual unfreezing, a callback
    calling ``requires_grad_``):

    - a parameter that *joins* after averaging began enters the average with its current value
      standing for every earlier snapshot. It was frozen until then, so that is the value it had
      at those snapshots, and the average stays the exact SWA mean / EMA of the weights the model
      went through. (A frozen weight that something edits in place is not tracked.)
    - a parameter that *leaves* stays in the average, and its frozen value keeps entering it.

    Args:
        method: ``"swa"``, ``"ema"`` or ``"lawa"``.
        start: `average_start`, the fraction of the optimizer steps after which averaging begins.
        freq: `average_freq`, SWA's snapshot period in optimizer steps (0: once per epoch).
        decay: `ema_decay`.
        k: `lawa_k`, LAWA's window.
        cycle: `swa_cycle_steps` (> 0: SWA / LAWA snapshots at the end of each cycle).
        on_cpu: keep the average in CPU memory.
        batchnorm_batches: a function returning an iterable of training batches, ready for the
            model, for the BatchNorm recomputation.
    """

    #: True when a flat trainer evaluates and checkpoints the average (the callback then only averages).
    managed = False

    def __init__(self, method: str, start: float = 0.75, freq: int = 0, decay: float = 0.999, on_cpu: bool = False,
                 batchnorm_batches: Callable[[], Iterable] | None = None, k: int = 5, cycle: int = 0):
        _check_settings(method, start, freq, decay, k, cycle)
        self.method, self.start, self.freq, self.decay, self.on_cpu = method, start, freq, decay, on_cpu
        self.k, self.cycle = k, cycle
        self.update_fn = get_ema_multi_avg_fn(decay) if method == "ema" else get_swa_multi_avg_fn()
        self.batchnorm_batches = batchnorm_batches
        self.reset()

    def reset(self):
        """Forget the average (a new `train()` without resuming starts a new one)."""
        self._training = False  # between on_train_begin and on_train_end
        self._warned_no_loss = False
        self.average: dict[str, torch.Tensor] = {}  # parameter name -> float32 average (SWA, EMA)
        self.window: list[dict[str, torch.Tensor]] = []  # LAWA: the latest snapshots, oldest first
        self.count = 0  # snapshots in the SWA mean / EMA updates / LAWA snapshots so far
        self.start_step = None
        self.params: dict[str, nn.Parameter] = {}  # the model's parameters by name, set when training begins
        self._restored = None  # (tensors, names) of an average restored from a checkpoint, until training begins

    # ---- schedule ------------------------------------------------------------------------
    def _name(self, argument: str) -> str:
        """How the user set `argument` (``start``, ``freq``, ``cycle``): a training argument of a flat
        trainer (``average_start``, ``average_freq``, ``swa_cycle_steps``) or this callback's own."""
        return {"start": "average_start", "freq": "average_freq", "cycle": "swa_cycle_steps"}[argument] if self.managed else argument

    def _what(self, args) -> str:
        return f"flat_method={args.flat_method!r}" if self.managed else f"WeightAveraging({self.method!r})"

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        epochs = self.method in ("swa", "lawa") and self.freq == 0 and not self.cycle
        if epochs and train_dataloader is not None and not has_length(train_dataloader):
            raise ValueError(
                f"{self._what(args)} with {self._name('freq')}=0 takes a snapshot at the end of every epoch, but "
                "the training data has no length (an IterableDataset), so the Trainer cannot tell where an epoch "
                f"ends. Set {self._name('freq')} to the number of optimizer steps between snapshots."
            )
        if not self.managed:
            self._begin_on_its_own(args, state, model)
        self._training = True
        self.start_step = start_step(self.start, state.max_steps)
        reshard(model)  # (FSDP2: the sharded parameters, which the optimizer updates)
        self.params = dict(model.named_parameters())
        self._check_restored_average()
        if self.first_snapshot(state.max_steps) is None and self.count == 0:
            logger.warning(self.no_snapshot_message(self._what(args), state.max_steps, ended=False))

    def _begin_on_its_own(self, args, state, model):
        """As a callback on a trainer that is not a flat trainer: refuse what needs one, start a new
        average, or restore it from the checkpoint being resumed (``output_dir/checkpoint-<step>``)."""
        if any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules()):
            raise ValueError(
                f"{self._what(args)} as a plain callback cannot recompute the averaged weights' BatchNorm statistics "
                "(that needs the training batches in order, which only the trainer has). Use a flat trainer: "
                f"hf_flat.flat_trainer_class(YourTrainer) with flat_method={self.method!r}."
            )
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError(
                f"{self._what(args)} as a plain callback does not support FSDP. Use a flat trainer: "
                f"hf_flat.flat_trainer_class(YourTrainer) with flat_method={self.method!r}."
            )
        logger.warning(
            f"{self._what(args)} runs as a plain callback: evaluations during training get eval_avg_loss only (the "
            "model's own loss), in what evaluate() returns and in state.log_history, not in the reporting "
            "integrations' logs; a checkpoint pushed to the Hub or written in a hyperparameter-search trial lacks the "
            "average. For every eval_avg_ metric and those, use a flat trainer: hf_flat.flat_trainer_class(YourTrainer)"
            f" with flat_method={self.method!r}."
        )
        self.reset()
        if state.global_step > 0:  # resuming: the Trainer loaded the checkpoint's state
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", AVERAGING_STATE_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"{self._what(args)}: training resumes at step {state.global_step}, but {path} does not exist, so the "
                    "average would start again from nothing. This callback writes the average into each checkpoint "
                    "folder in output_dir: resume from a checkpoint of args.output_dir written with it, or train "
                    "without this callback."
                )
            tensors, meta = load_flat_state(path)
            self.load_state_dict(tensors, meta)

    def on_save(self, args, state, control, **kwargs):
        """On its own: the average goes into the checkpoint folder the Trainer has just written."""
        if self.managed or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning(
                f"{self._what(args)}: no checkpoint folder {folder} to write the average into (a hyperparameter "
                "search writes its checkpoints elsewhere): a resume from this checkpoint would lose the average."
            )
            return
        save_flat_state(os.path.join(folder, AVERAGING_STATE_NAME), [self.state_dict()], f"WeightAveraging({self.method})")

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        """On its own, during training: ``eval_avg_loss``, the averaged weights' loss on the
        evaluation batches, added to `metrics` (what `evaluate` returns, early stopping and best
        checkpoints see) and to the evaluation's record in ``state.log_history``."""
        if self.managed or not self._training or metrics is None or model is None or eval_dataloader is None:
            return
        prefix = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        if not self.count:  # no snapshot yet: the average is the live model
            loss = metrics.get(f"{prefix}_loss")
        else:
            with self.swapped_in(model):
                loss = evaluation_loss(model, eval_dataloader, args)
        if loss is None:
            if not self._warned_no_loss:
                logger.warning(f"{self._what(args)}: the model returns no loss for the evaluation batches (the trainer "
                               "computes it in compute_loss), so there is no eval_avg_loss; a flat trainer gives it.")
                self._warned_no_loss = True
            return
        key = f"{averaged_prefix(prefix)}_loss"
        metrics[key] = loss
        if state.log_history and f"{prefix}_loss" in state.log_history[-1]:
            state.log_history[-1][key] = loss

    def first_snapshot(self, max_steps) -> int | None:
        """The first step >= start_step that takes a snapshot (with `average_freq = 0`, the end of
        an epoch, at the latest `max_steps`), or None if none of steps start_step..max_steps does."""
        if self.cycle and self.method != "ema":
            first = self.start_step + self.cycle - 1
            return first if first <= max_steps else None
        if self.method == "ema" or self.freq == 0:
            return self.start_step if self.start_step <= max_steps else None
        first = math.ceil(self.start_step / self.freq) * self.freq
        return first if first <= max_steps else None

    def no_snapshot_message(self, what, steps, ended) -> str:
        """`what`: ``flat_method='swa'`` or ``WeightAveraging('swa')``."""
        start, freq, cycle = self._name("start"), self._name("freq"), self._name("cycle")
        when = f"training ended at step {steps}" if ended else f"training runs {steps} optimizer steps"
        outcome = (
            "so no averaged weights were taken and the model keeps its last weights"
            if ended
            else "so no averaged weights will be taken and the model will keep its last weights"
        )
        if self.cycle and self.method != "ema":  # SWA's cyclical schedule: a snapshot at the end of each cycle
            return (
                f"{what}: with {cycle}={self.cycle} the first snapshot is taken at the end of the first cycle, step "
                f"{self.start_step + self.cycle - 1} (averaging starts at step {self.start_step}, {start}={self.start}), "
                f"and {when}, {outcome}. Lower {start} or {cycle}, or train longer."
            )
        every = self.method in ("swa", "lawa") and self.freq > 0
        rule = (
            f"{freq}={self.freq} takes snapshots at multiples of {self.freq} only, and none lies between "
            if every
            else "averaging starts at "
        )
        return (
            f"{what}: {rule}step {self.start_step} ({start}={self.start}) and {when}, "
            f"{outcome}. Lower {start}{f' or {freq}' if every else ''}, or train longer."
        )

    def restore(self, params: dict, tensors: dict, meta: dict):
        """`load_state_dict`, then take the restored average for `params` (name -> parameter) at
        once, as `on_train_begin` does; `value(name)` then gives each averaged weight. For reading an
        average outside training (the `hf-flat` commands' ``--weights averaged``)."""
        self.params = params
        self.load_state_dict(tensors, meta)
        self._check_restored_average()

    def _check_restored_average(self):
        """Take the restored average's rows that this process holds (all of them unless sharded),
        after checking its names and shapes against the model."""
        if self._restored is None:
            return
        tensors, names, slots = self._restored
        self._restored = None
        unknown = [n for n in names if n not in self.params]
        if unknown:
            raise ValueError(
                f"The averaged weights restored from the checkpoint include {len(unknown)} parameter(s) the "
                f"model does not have, e.g. {unknown[:3]}: resume with the model that wrote the checkpoint."
            )
        keys = [f"averaging.{n}" for n in names] if slots is None else [f"averaging.{i}.{n}" for i in range(slots) for n in names]
        for key in keys:
            name = key.split(".", 2)[-1] if slots is not None else key[len("averaging."):]
            shape = shape_in_state(tensors, key)
            if shape != tuple(self.params[name].shape):
                raise ValueError(
                    f"The averaged weight {name!r} in the checkpoint has shape {shape} but the model's "
                    f"parameter has shape {tuple(self.params[name].shape)}."
                )

        def restored(key, name):
            p = self.params[name]
            return rows_of_state(tensors, key, rows_of(p)).to(
                device="cpu" if self.on_cpu else local(p).device, dtype=torch.float32)

        if slots is None:
            self.average = {n: restored(f"averaging.{n}", n) for n in names}
        else:
            self.window = [{n: restored(f"averaging.{i}.{n}", n) for n in names} for i in range(slots)]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # After every callback's on_step_begin and the backward passes, before the weights move: a
        # parameter that became trainable since still holds its frozen value here.
        self.admit_new_parameters()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step < self.start_step:
            return
        if self.method == "ema" or self.is_snapshot_step(step, state):
            self.update()

    def is_snapshot_step(self, step, state) -> bool:
        """SWA, LAWA: every `freq` steps, or with freq 0 at the last step of each epoch (an epoch
        ends when `state.epoch` reaches a whole number, or when training stops at `max_steps`); with
        SWA's cyclical schedule at the end of each cycle."""
        if self.cycle:
            return (step - self.start_step + 1) % self.cycle == 0
        if self.freq > 0:
            return step % self.freq == 0
        return float(state.epoch).is_integer() or step == state.max_steps

    @torch.no_grad()
    def admit_new_parameters(self):
        """Once averaging has begun, add the parameters that have become trainable since, with their
        current (so far frozen) value as their average."""
        if not self.names():
            return
        for name, p in self.params.items():
            if p.requires_grad and name not in self.names():
                if self.method == "lawa":  # its frozen value stands in every snapshot of the window
                    for snapshot in self.window:
                        snapshot[name] = self._float32_copy(p)
                else:
                    self.average[name] = self._float32_copy(p)

    def names(self) -> list[str]:
        """The parameters the average covers."""
        return list(self.window[-1]) if self.method == "lawa" and self.window else list(self.average)

    def value(self, name) -> torch.Tensor:
        """The averaged value of parameter `name` (LAWA: the mean of the window, computed now)."""
        if self.method != "lawa":
            return self.average[name]
        total = self.window[0][name].clone()
        for snapshot in self.window[1:]:
            total.add_(snapshot[name])
        return total.div_(len(self.window))

    def _float32_copy(self, p):
        p = local(p).detach()
        return p.to(device="cpu" if self.on_cpu else p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def update(self):
        """Add the current weights to the average (SWA) or move the average towards them (EMA); LAWA:
        add a snapshot to the window, the oldest leaving it (its memory is reused) once it holds k."""
        if self.method == "lawa":
            self.admit_new_parameters()
            names = [n for n, p in self.params.items() if p.requires_grad or (self.window and n in self.window[-1])]
            if len(self.window) == self.k:
                snapshot = self.window.pop(0)
                for n in names:
                    if n in snapshot:
                        snapshot[n].copy_(local(self.params[n]).detach())
                    else:
                        snapshot[n] = self._float32_copy(self.params[n])
                self.window.append(snapshot)
            else:
                self.window.append({n: self._float32_copy(self.params[n]) for n in names})
            self.count += 1
            return
        if not self.average:
            self.average = {n: self._float32_copy(p) for n, p in self.params.items() if p.requires_grad}
            self.count = 1
            return
        self.admit_new_parameters()  # also those unfrozen after the optimizer step (they did not move)
        names = list(self.average)
        average = [self.average[n] for n in names]
        current = [local(self.params[n]).detach() for n in names]
        if any(a.device != p.device or a.dtype != p.dtype for a, p in zip(average, current)):
            current = [p.to(device=a.device, dtype=a.dtype) for a, p in zip(average, current)]
        self.update_fn(average, current, self.count)
        self.count += 1

    # ---- using the average ---------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, model):
        """Put the averaged weights into `model`, each by name, and recompute its BatchNorm statistics."""
        reshard(model)
        params = dict(model.named_parameters())
        for name in self.names():
            local(params[name]).copy_(self.value(name))
        if self.batchnorm_batches is not None:
            recompute_batchnorm(model, self.batchnorm_batches)

    @contextlib.contextmanager
    def swapped_in(self, model):
        """Evaluate the averaged weights inside this block; afterwards the live weights, BatchNorm
        buffers and random streams are exactly what they were."""
        reshard(model)
        params = {n: local(p) for n, p in model.named_parameters()}
        live = {n: params[n].detach().to("cpu" if self.on_cpu else params[n].device, copy=True) for n in self.names()}
        buffers = {k: b.clone() for k, b in _batchnorm_buffers(model).items()}
        try:
            with preserved_rng_state():
                self.copy_to(model)
                yield
        finally:
            reshard(model)  # (FSDP2: the evaluation left the root module holding the averaged weights)
            with torch.no_grad():
                for name, w in live.items():
                    params[name].copy_(w)
                for k, b in _batchnorm_buffers(model).items():
                    b.copy_(buffers[k])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        if not self.count:
            logger.warning(self.no_snapshot_message(self._what(args), state.global_step, ended=True))
            return
        if self.method == "swa" and self.count == 1:
            start, freq = self._name("start"), self._name("freq")
            logger.warning(
                f"{self._what(args)}: SWA took a single snapshot (steps {self.start_step} to {state.global_step}, "
                f"{start}={self.start}, {freq}={self.freq}), so the averaged model is the weights of that one step. "
                f"Lower {start}, set {freq}, or train more epochs."
            )
        self.copy_to(model)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The average by name (LAWA: each snapshot of the window, ``averaging.<i>.<name>``, oldest
        first); under FSDP2, this process's rows of it (`ShardedTensor`)."""
        stored = {f"averaging.{n}": a for n, a in self.average.items()}
        for i, snapshot in enumerate(self.window):
            stored.update({f"averaging.{i}.{n}": a for n, a in snapshot.items()})
        tensors = {}
        for key, a in stored.items():
            a = a.detach().cpu().contiguous()
            p = self.params.get(key.split(".", 2)[-1] if self.method == "lawa" else key[len("averaging."):])
            tensors[key] = ShardedTensor(a, rows_of(p)) if is_sharded(p) else a
        meta = {
            "averaging_version": STATE_VERSION,
            "averaging": self.method,
            "averaging_count": str(self.count),
            "averaging_names": json.dumps(self.names()),
        }
        if self.method == "lawa":
            meta["averaging_window"] = str(len(self.window))
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        if meta.get("averaging") != self.method:
            raise ValueError(
                f"The checkpoint holds averaging={meta.get('averaging')!r} state but this run uses "
                f"{self.method!r}; resume with the checkpoint's flat_method."
            )
        self.count = int(meta["averaging_count"])
        slots = int(meta["averaging_window"]) if "averaging_window" in meta else None
        if slots is not None and slots > self.k:
            raise ValueError(f"The checkpoint's LAWA window holds {slots} snapshots but lawa_k={self.k}: resume with "
                             f"lawa_k={slots} or more.")
        # the rows this process needs are taken when training begins and the model's layout is known
        self._restored = (tensors, json.loads(meta["averaging_names"]), slots)
        self.average, self.window = {}, []


def _batchnorm_buffers(model):
    return {
        f"{name}.{buf_name}": buf
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        for buf_name, buf in m.named_buffers(recurse=False)
    }


def averaged_prefix(metric_key_prefix: str) -> str:
    """``eval`` -> ``eval_avg``, ``eval_a`` -> ``eval_avg_a``, ``test`` -> ``test_avg``."""
    if metric_key_prefix == "eval" or metric_key_prefix.startswith("eval_"):
        return metric_key_prefix.replace("eval", "eval_avg", 1)
    return f"{metric_key_prefix}_avg"


@torch.no_grad()
def evaluation_loss(model, batches, args) -> float | None:
    """The model's own loss over `batches` (the Trainer's evaluation data loader), averaged over the
    samples of every process, in eval mode and the run's mixed precision; None if it returns none."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss x samples, samples
    try:
        for batch in batches:
            with autocast:
                outputs = model(**batch)
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0] if len(outputs) else None
            if loss is None:
                return None
            size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            total += torch.stack([loss.detach().double() * size, torch.tensor(float(size), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _check_settings(method, start, freq, decay, k, cycle):
    """Refuse bad constructor values of `WeightAveraging`, naming the argument and what is allowed."""
    def refuse(name, value, allowed):
        raise ValueError(f"WeightAveraging({name}={value!r}) is not allowed: it must be {allowed}.")

    if method not in ("swa", "ema", "lawa"):
        refuse("method", method, "'swa', 'ema' or 'lawa'")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
        refuse("start", start, "a number in [0, 1): the fraction of the optimizer steps after which averaging begins")
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 0:
        refuse("freq", freq, "an integer >= 0 (0: a snapshot at the end of every epoch)")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        refuse("decay", decay, "in (0, 1)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        refuse("k", k, "an integer >= 1")
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 0:
        refuse("cycle", cycle, "an integer >= 0")


def build_averaging(args, batchnorm_batches=None) -> WeightAveraging | None:
    """The averaging callback `args.flat_method` asks for, or `None`."""
    if args.flat_averaging is None:
        return None
    return WeightAveraging(
        args.flat_averaging,
        start=args.average_start,
        freq=args.average_freq,
        decay=args.ema_decay,
        on_cpu=args.average_on_cpu,
        batchnorm_batches=batchnorm_batches,
        k=args.lawa_k,
        cycle=args.swa_cycle_steps,
    )
