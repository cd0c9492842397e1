"""Weight averaging along the training trajectory, as a `TrainerCallback`.

- **SWA** (Izmailov et al., 2018; seed 000 Algorithm 1 lines 7-9): a running mean of snapshots
  of the weights, ``avg = (n * avg + w) / (n + 1)``, one snapshot after optimizer step ``t`` iff
  ``t >= start_step`` and ``t % average_freq == 0`` (or, for ``average_freq = 0``, ``t`` ends an
  epoch). Combined with SAM this is WASAM (seed 000, Algorithm 1).
- **EMA**: ``v = decay * v + (1 - decay) * w`` after every optimizer step after ``start_step``,
  with ``v = w`` at ``start_step``.

``start_step = max(1, ceil(average_start * total_optimizer_steps))``. The average covers the
trainable parameters (under PEFT: the adapters), is kept in float32 (on the parameters' device,
or on the CPU with ``average_on_cpu``) and is updated with torch's foreach averaging functions.
BatchNorm running statistics are recomputed for the averaged weights (one pass over the
training data, momentum ``None``) before they are evaluated or become the final model.
"""

import contextlib
import json
import math
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Bumped when the layout of the averaging entries in the checkpoint file changes.
STATE_VERSION = "1"


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


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
    """SWA or EMA of the trainable weights; `FlatTrainer` adds it for ``flat_method`` ``swa``,
    ``ema``, ``wasam`` or ``<perturbation>+<averaging>``.

    Args:
        method: ``"swa"`` or ``"ema"``.
        start: `average_start`, the fraction of the optimizer steps after which averaging begins.
        freq: `average_freq`, SWA's snapshot period in optimizer steps (0: once per epoch).
        decay: `ema_decay`.
        on_cpu: keep the average in CPU memory.
        batchnorm_batches: a function returning an iterable of training batches, ready for the
            model, for the BatchNorm recomputation.
    """

    def __init__(self, method, start=0.75, freq=0, decay=0.999, on_cpu=False, batchnorm_batches=None):
        self.method, self.start, self.freq, self.decay, self.on_cpu = method, start, freq, decay, on_cpu
        self.update_fn = get_swa_multi_avg_fn() if method == "swa" else get_ema_multi_avg_fn(decay)
        self.batchnorm_batches = batchnorm_batches
        self.reset()

    def reset(self):
        """Forget the average (a new `train()` without resuming starts a new one)."""
        self.names: list[str] | None = None
        self.average: list[torch.Tensor] | None = None
        self.count = 0  # snapshots in the SWA mean / EMA updates so far
        self.start_step = None
        self.params: list[torch.Tensor] = []  # the model's trainable parameters, set when training begins

    # ---- schedule ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = max(1, math.ceil(self.start * state.max_steps))
        named = trainable_parameters(model)
        names = [name for name, _ in named]
        if self.names is not None and self.names != names:
            raise ValueError(
                "The averaged weights restored from the checkpoint do not match the model's trainable "
                f"parameters ({len(self.names)} saved, {len(names)} trainable)."
            )
        self.names, self.params = names, [p for _, p in named]
        if self.average is not None and not self.on_cpu:  # restored from a checkpoint, on the CPU
            self.average = [a.to(p.device) for a, p in zip(self.average, self.params)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step < self.start_step:
            return
        if self.method == "ema" or self.is_snapshot_step(step, state):
            self.update()

    def is_snapshot_step(self, step, state) -> bool:
        """SWA: every `freq` steps, or with freq 0 at the last step of each epoch (an epoch ends
        when `state.epoch` reaches a whole number, or when training stops at `max_steps`)."""
        if self.freq > 0:
            return step % self.freq == 0
        return float(state.epoch).is_integer() or step == state.max_steps

    @torch.no_grad()
    def update(self):
        """Add the current weights to the average (SWA) or move the average towards them (EMA)."""
        current = [p.detach() for p in self.params]
        if self.average is None:
            device = "cpu" if self.on_cpu else None
            self.average = [p.to(device=device or p.device, dtype=torch.float32, copy=True) for p in current]
            self.count = 1
            return
        if any(a.device != p.device or a.dtype != p.dtype for a, p in zip(self.average, current)):
            current = [p.to(device=a.device, dtype=a.dtype) for a, p in zip(self.average, current)]
        self.update_fn(self.average, current, self.count)
        self.count += 1

    # ---- using the average ---------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, model):
        """Put the averaged weights into `model` and recompute its BatchNorm statistics."""
        for (_, p), a in zip(trainable_parameters(model), self.average):
            p.copy_(a)
        if self.batchnorm_batches is not None:
            recompute_batchnorm(model, self.batchnorm_batches)

    @contextlib.contextmanager
    def swapped_in(self, model):
        """Evaluate the averaged weights inside this block; afterwards the live weights, BatchNorm
        buffers and random streams are exactly what they were."""
        params = [p for _, p in trainable_parameters(model)]
        live = [p.detach().to("cpu" if self.on_cpu else p.device, copy=True) for p in params]
        buffers = {k: b.clone() for k, b in _batchnorm_buffers(model).items()}
        try:
            with preserved_rng_state():
                self.copy_to(model)
                yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, live):
                    p.copy_(w)
                for k, b in _batchnorm_buffers(model).items():
                    b.copy_(buffers[k])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.count:
            logger.warning(
                f"flat_method={args.flat_method!r}: averaging starts at optimizer step {self.start_step} "
                f"(average_start={self.start}) but training ended at step {state.global_step}; the model "
                "keeps its last weights."
            )
            return
        self.copy_to(model)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        names = self.names if self.average is not None else []
        tensors = {f"averaging.{n}": a.detach().cpu().contiguous() for n, a in zip(names, self.average or [])}
        meta = {
            "averaging_version": STATE_VERSION,
            "averaging": self.method,
            "averaging_count": str(self.count),
            "averaging_names": json.dumps(names),
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        if meta.get("averaging") != self.method:
            raise ValueError(
                f"The checkpoint holds averaging={meta.get('averaging')!r} state but this run uses "
                f"{self.method!r}; resume with the checkpoint's flat_method."
            )
        self.count = int(meta["averaging_count"])
        names = json.loads(meta["averaging_names"])
        self.names = names or None
        self.average = [tensors[f"averaging.{n}"] for n in names] or None


def _batchnorm_buffers(model):
    return {
        f"{name}.{buf_name}": buf
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        for buf_name, buf in m.named_buffers(recurse=False)
    }


def save_flat_state(path, parts):
    """Write the state of every flat component (`(tensors, metadata)` pairs) to one safetensors file."""
    tensors, meta = {}, {"hf_flat_state_version": STATE_VERSION}
    for part_tensors, part_meta in parts:
        tensors.update(part_tensors)
        meta.update(part_meta)
    save_file(tensors, path, metadata=meta)


def load_flat_state(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta
