"""The mechanics every weight-perturbation method (SAM, ASAM, average SAM, ...) shares, in one place.

A method only says what the perturbation ``e`` is (`TwoPassMethod.perturbation`). This module
decides where and when it is applied, and keeps every such step exact inside the Trainer's
gradient accumulation, gradient clipping, mixed precision and DDP.

**One perturbed group of samples.** For a gradient-based method (SAM, ASAM):

1. Stash the gradients accumulated so far in this optimizer step.
2. Pass 1: the gradient ``g`` of the group's loss at ``w``, scaled exactly as the Trainer scales it
   (gradient accumulation, ``num_items_in_batch``, loss scaling).
3. ``e = perturbation(g)``; ``w <- w + e``. Only parameters that require grad and received a
   gradient are perturbed.
4. Put the stashed gradients back; pass 2 at ``w + e`` adds its gradient to them. BatchNorm
   running statistics are frozen in pass 2: pass 1 has already updated them.
5. Restore ``w`` bit for bit from a copy (the one extra copy of the trainable weights).

A method whose ``e`` needs no gradient (average SAM, ``uses_gradient = False``) skips pass 1: its
one pass runs at ``w + e`` and also updates the BatchNorm statistics.

**Where: the scope of one perturbation** (``sam_scope``, ``sam_m``). Boca, Cross, Holm, Korkmaz,
"Towards an Even Better Understanding of Sharpness-Aware Minimisation" (2023), contrast m-SAM (one
perturbation per m samples) with n-SAM (one per large batch); Foret et al. (ICLR 2021, section
4.1) introduced m-sharpness.

- ``"micro"`` (default): one perturbation per micro-batch and process, from that process's own
  gradient. Pass 1 runs under ``no_sync`` (no all-reduce); pass 2 is synchronised exactly as the
  Trainer arranged (all-reduce on the last micro-batch of the optimizer step).
- ``"micro"`` with ``sam_m = m``: each micro-batch is cut into chunks of ``m`` samples (the last
  chunk of a smaller final batch may be shorter), each perturbed with its own chunk's gradient.
  Chunk ``c`` has the share ``s = len(c) / len(micro-batch)``: its loss is multiplied by ``s``
  and the model gets ``num_items_in_batch * s``. A mean loss becomes ``s`` times the chunk's mean;
  a loss normalised by ``num_items_in_batch`` stays the chunk's token sum over
  ``num_items_in_batch``; both add up over the chunks to the micro-batch's loss, which the Trainer
  then scales for accumulation as usual. So the step's gradient is the mean of the chunks' SAM
  gradients. Only the last chunk's pass 2 is synchronised. On a model with BatchNorm, which cannot
  normalise one sample, a last chunk of one sample joins the chunk before it.
- ``"step"`` (n-SAM): one perturbation per optimizer step, from the gradient of the whole step.
  Pass 1 runs on each micro-batch as it comes, synchronised as the Trainer arranges, so that after
  the last micro-batch the gradients hold the step's gradient, all-reduced over processes. The
  micro-batches' inputs are kept until then. ``e`` is computed once (the same on every process)
  and pass 2 runs over the whole window at ``w + e``, synchronised on its last micro-batch.

**Sharded training (FSDP2).** All processes share each parameter, each holding some of its rows,
so they must all add the same global ``e``: a perturbation of one process's own gradient does not
exist. The scope is therefore ``"step"`` (``sam_scope=None`` chooses it; ``"micro"`` and ``sam_m``
are refused). Each process computes ``e`` for its rows of the reduce-scattered step gradient;
every norm in it is the square root of the all-reduced sum of the processes' squared norms
(`TwoPassMethod.norm`), and everything else (ASAM's ``|w| + eta``, the copy that restores ``w``)
works row by row. So every process perturbs its rows exactly as one process holding the whole
model would.

**When: the schedule** (``sam_start``, ``sam_interval``). With ``T`` optimizer steps and
``s = max(1, ceil(sam_start * T))``, optimizer step ``t`` (1-based) is perturbed iff ``t >= s`` and
``(t - s) % sam_interval == 0`` (composer's SAM ``interval``; Zhou et al., "Sharpness-Aware
Minimization Efficiently Selects Flatter Minima Late in Training", ICLR 2025). Every other step is
the plain Trainer's step, for each of its micro-batches.

**On top of another trainer** (TRL's `SFTTrainer`, `DPOTrainer`, ...): every pass runs the base
trainer's own `training_step` and so its `compute_loss`; only the step's pass 1 (average SAM: its
one pass) counts in the base trainer's running metrics (`forward_backward`'s ``counted``).

**No host synchronisation.** Every quantity of a step (norms, inner products, GSAM's and
LookSAM's coefficients, ESAM's selection) stays a tensor on the device: nothing is read on the
host between the step's first forward pass and its optimizer step, so on a GPU the CPU keeps
queuing kernels while the device works (tests/test_host_syncs.py counts such reads against the
plain Trainer's).

**Non-finite gradients** (an fp16 loss-scale overflow), decided on the device: if ``g`` is not
finite, ``e = rho g / ||g||`` is not finite either (``||g||`` is inf or nan), so pass 2 at
``w + e`` gives a non-finite gradient, which reaches the step's gradients (through DDP's
all-reduce, every process's), and the GradScaler skips the step as it would have skipped the plain
one; ``w`` is restored exactly from its copy as always.
"""

import contextlib
import math
from abc import ABC, abstractmethod
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sharding import local, reshard, rows_of, shard_group, sum_over_shards

#: Values of `sam_scope`.
SCOPES = ("micro", "step")


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but leave their running ones alone."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` taken together, as a float64 tensor on their device (inf or nan
    if any element is), read by no one on the host: computing it does not wait for the device.

    The sums of squares are accumulated in float64, so gradients still multiplied by a large loss
    scale do not overflow them while every element is finite."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def start_step(fraction: float, total_steps: int) -> int:
    """``max(1, ceil(fraction * total_steps))``, with the product taken on the decimal value that
    was written (0.7 x 10 is 7, not 7.000000000000001)."""
    return max(1, math.ceil(Fraction(repr(float(fraction))) * total_steps))


def batch_size_of(inputs: dict) -> int:
    """The number of samples in a collated batch: the first dimension of its first tensor."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("sam_m needs the batch as tensors with the samples along the first dimension; this batch has none.")


def normalises_over_samples(model: nn.Module) -> bool:
    """Whether `model` has a BatchNorm layer in training mode: such a layer cannot normalise a group
    of one sample (torch: "Expected more than 1 value per channel when training")."""
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def split_batch(inputs: dict, m: int, no_single: bool = False) -> list[tuple[dict, int]]:
    """Cut a collated batch into chunks of `m` samples along the first dimension: `(chunk, size)`
    pairs. Tensors, lists and tuples with one entry per sample are cut; other values (scalars,
    flags) go to every chunk whole. `no_single`: a last chunk of one sample joins the chunk
    before it (for BatchNorm models, `normalises_over_samples`)."""
    size = batch_size_of(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != size:
            raise ValueError(
                f"sam_m={m} cuts each batch into chunks along the first dimension, but input {key!r} has "
                f"shape {tuple(value.shape)} while the batch has {size} samples: leave sam_m=None for such inputs."
            )
    begins = list(range(0, size, m))
    if no_single and len(begins) > 1 and size - begins[-1] == 1:
        begins.pop()
    chunks = []
    for begin, end in zip(begins, [*begins[1:], size]):
        chunk = {
            key: value[begin:end]
            if (isinstance(value, torch.Tensor) and value.dim() > 0) or (isinstance(value, (list, tuple)) and len(value) == size)
            else value
            for key, value in inputs.items()
        }
        chunks.append((chunk, end - begin))
    return chunks


class PassLosses(NamedTuple):
    """What one micro-batch of a perturbation method reports, each scaled like the Trainer's loss.

    `loss` is what the Trainer logs as ``loss``: L(w) for gradient-based methods, L(w + e) for
    average SAM (its only pass). `perturbed` is L(w + e) and `sharpness` L(w + e) - L(w) summed
    over what this call perturbed (`None` when it perturbed nothing, or for average SAM).
    """

    loss: torch.Tensor
    perturbed: torch.Tensor | None = None
    sharpness: torch.Tensor | None = None


class TwoPassMethod(ABC):
    """Base class of the methods that train on the gradient at a perturbed point ``w + e``.

    A subclass says what ``e`` is, in `perturbation`; the scope and the schedule (see the module
    docstring) are the base class's.

    Args:
        scope: ``"micro"`` (one perturbation per micro-batch and process, or per ``m`` samples) or
            ``"step"`` (one per optimizer step, from the whole step's gradient).
        m: samples per perturbation within a micro-batch (``scope="micro"`` only); None: the whole
            micro-batch.
        start: in [0, 1); the first perturbed step is ``max(1, ceil(start * T))`` of ``T`` (so 0.8
            perturbs the last 20% of the steps and one more: steps 16-20 of 20).
        interval: every `interval`-th optimizer step from there on is perturbed.
    """

    #: False for methods whose ``e`` does not depend on the gradient: no pass 1.
    uses_gradient = True
    #: True for methods whose descent direction combines pass 2's gradient with ``e`` (GSAM,
    #: LookSAM): pass 2's gradient is then taken on its own and handed to `descend`, with ``e``
    #: kept until then (under DDP with the "micro" scope, pass 2 runs without all-reduce and the
    #: step's gradient is averaged over the processes after the last micro-batch, so that each
    #: process combines its own gradients, as GSAM's authors do).
    separate_pass_2 = False

    def __init__(self, scope: str = "micro", m: int | None = None, start: float = 0.0, interval: int = 1):
        self.scope, self.m, self.start, self.interval = scope, m, start, interval
        self.rows = None  # where the tensors handed to `perturbation` lie in the whole parameters
        self.group = None  # the process group over which they are sharded (None: not sharded)
        self._window = []  # scope "step": (inputs, num_items_in_batch) of the step's micro-batches so far
        self._window_loss = None  # scope "step": the sum of their pass-1 losses
        self._window_step = None  # scope "step": the optimizer step (global_step) the window belongs to
        self._checked_batch_size = None

    @abstractmethod
    def perturbation(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        """Return ``e`` for each of `params` (for gradient-based methods computed in place in `grads`),
        without reading anything on the host (a non-finite gradient gives a non-finite ``e``).

        Under sharded training `params` and `grads` are this process's rows of each parameter,
        which lie at `self.rows` in the whole ones; norms over all parameters come from `norm`.
        """

    def descend(self, params: list[torch.Tensor], e: list[torch.Tensor], grads: list[torch.Tensor]):
        """(`separate_pass_2` methods) Turn pass 2's gradient `grads`, taken at ``w + e`` on the same
        samples as ``e``, into this group's descent direction, in place."""

    def dot(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """The inner product of two lists of tensors (a float64 tensor on their device), over all
        processes' rows when sharded."""
        if not a:
            return torch.zeros((), dtype=torch.float64)
        dots = [torch.dot(x.reshape(-1).float(), y.reshape(-1).float()).to(a[0].device) for x, y in zip(a, b)]
        own = torch.stack(dots).double().sum()
        return own if self.group is None else sum_over_shards(own, self.group)

    def norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of `tensors` taken together (a float64 tensor on their device), over all
        processes' rows when sharded: the square root of the all-reduced sum of every process's
        squared norm."""
        own = global_norm(tensors)
        return own if self.group is None else sum_over_shards(own**2, self.group).sqrt()

    def _own_rows(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The rows of `params` this process holds (views: writes reach the parameters), with
        `rows` and `group` set for `perturbation` and `norm`. Unsharded: `params` themselves."""
        self.rows, self.group = [rows_of(p) for p in params], shard_group(params)
        return [local(p) for p in params]

    def add_perturbation(self, params: list[torch.Tensor], e: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """``w <- w + e`` in place; returns the copy of ``w`` that restores it exactly (None: nothing added)."""
        return _add_perturbation(params, e)

    def perturb(self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor] | None = None):
        """``w <- w + e`` for ``e = perturbation(names, params, grads)``; returns what `restore` takes.
        (Average SAM computes ``w + e`` without making ``e`` first.)"""
        return self.add_perturbation(params, self.perturbation(names, params, grads))

    def restore(self, params: list[torch.Tensor], saved: list[torch.Tensor] | None):
        """``w`` back, bit for bit, from what `add_perturbation` (or `perturb`) returned."""
        _restore(params, saved)

    # ---- when ----------------------------------------------------------------------------------
    def perturbs_step(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step `step` (1-based) of `total_steps` is a perturbed step."""
        first = start_step(self.start, total_steps)
        return step >= first and (step - first) % self.interval == 0

    # ---- one micro-batch -------------------------------------------------------------------------
    def training_step(self, trainer, model: nn.Module, inputs: dict, num_items_in_batch=None) -> PassLosses:
        """Train on one micro-batch: the plain Trainer's step, or this method's (see the module docstring)."""
        self._check_batch_size(trainer)  # from the first micro-batch on, even when the first perturbed step is late
        if not self.perturbs_step(trainer.state.global_step + 1, trainer.state.max_steps):
            return PassLosses(trainer.forward_backward(model, inputs, num_items_in_batch))
        if self.scope == "step":
            return self._whole_step(trainer, model, inputs, num_items_in_batch)
        return self._micro_batch(trainer, model, inputs, num_items_in_batch)

    def _micro_batch(self, trainer, model, inputs, num_items_in_batch) -> PassLosses:
        """Scope "micro": one perturbation per micro-batch, or per chunk of `m` samples."""
        named = trainable(trainer)
        params = [p for _, p in named]
        chunks = self._chunks(trainer, inputs)
        total = perturbed_total = sharpness_total = None
        copy = None  # the copy of w, reused from chunk to chunk
        by_hand = self.separate_pass_2 and _processes() > 1  # the step's gradient is averaged below
        for i, (chunk, share) in enumerate(chunks):
            # only the last pass-2 backward of the micro-batch takes part in the Trainer's all-reduce
            last = i == len(chunks) - 1 and not by_hand
            sync = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
            if self.uses_gradient:
                loss, perturbed, copy = self._two_passes(
                    trainer, model, named, params, chunk, num_items_in_batch, share, sync, copy
                )
                sharpness = perturbed - loss
            else:
                saved = self.perturb([n for n, _ in named], params)
                with sync:
                    loss = self._at(trainer, model, params, saved, [(chunk, num_items_in_batch, share)], frozen=False,
                                    counted=True)
                perturbed = sharpness = None
            total = _add(total, loss)
            perturbed_total, sharpness_total = _add(perturbed_total, perturbed), _add(sharpness_total, sharpness)
        if by_hand and trainer.accelerator.sync_gradients:
            _average_over_processes(params)
        return PassLosses(total, perturbed_total, sharpness_total)

    def _two_passes(self, trainer, model, named, params, inputs, num_items_in_batch, share, sync, copy=None):
        """Steps 1-5 of the module docstring on one group of samples, saving w into `copy` when it fits;
        returns ``(L(w), L(w + e))`` and the copy of w, for the next chunk to reuse."""
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with trainer.accelerator.no_sync(model):
            loss = trainer.forward_backward(model, inputs, num_items_in_batch, share)

        active = [i for i, p in enumerate(params) if p.grad is not None]
        active_params = [params[i] for i in active]
        e = self.perturbation([named[i][0] for i in active], active_params, [params[i].grad for i in active])
        saved = _add_perturbation(active_params, e, into=copy)
        separate = self.separate_pass_2 and e is not None
        # Give the accumulated gradients back (pass 2 adds to them); this frees g, which held e
        # (unless pass 2 is taken on its own: e is kept for `descend`).
        for p, acc in zip(params, accumulated):
            p.grad = None if separate else acc
        if not separate:
            del e
        try:
            with sync, frozen_batchnorm_statistics(model):
                perturbed = trainer.forward_backward(model, inputs, num_items_in_batch, share, counted=False)
        finally:
            _restore(active_params, saved)
        if separate:
            self.descend(active_params, e, [p.grad for p in active_params])
            del e
            for p, acc in zip(params, accumulated):  # this group's direction joins the step's gradient
                if acc is not None:
                    p.grad = acc if p.grad is None else acc.add_(p.grad)
        return loss, perturbed, saved

    def _whole_step(self, trainer, model, inputs, num_items_in_batch) -> PassLosses:
        """Scope "step": keep the micro-batch (pass 1 now, for gradient-based methods); on the
        step's last micro-batch, perturb once and run pass 2 over all of them."""
        step = trainer.state.global_step
        if self._window and self._window_step != step:  # a window that ended early (a callback stopped the epoch)
            self._window, self._window_loss = [], None
        self._window_step = step
        self._window.append((inputs, num_items_in_batch))
        if self.uses_gradient:  # pass 1, synchronised as the Trainer arranges (all-reduce on the last)
            loss = trainer.forward_backward(model, inputs, num_items_in_batch)
            self._window_loss = _add(self._window_loss, loss)
        else:  # average SAM: its one pass waits for the step's perturbation
            loss = torch.zeros((), device=trainer.args.device)
        if not trainer.accelerator.sync_gradients:
            return PassLosses(loss)

        window, window_loss = self._window, self._window_loss
        self._window, self._window_loss = [], None
        reshard(model)  # (FSDP2: every module reads its rows again, and so will see w + e)
        named = trainable(trainer)
        if self.uses_gradient:
            active = [(name, p) for name, p in named if p.grad is not None]
            sharded = [p for _, p in active]
            params = self._own_rows(sharded)
            e = self.perturbation([n for n, _ in active], params, [local(p.grad) for p in sharded])
            for p in sharded:
                p.grad = None  # g (now e) leaves the gradients; pass 2 accumulates afresh
            saved = self.add_perturbation(params, e)
        else:
            sharded = [p for _, p in named]
            params = self._own_rows(sharded)
            e, saved = None, self.perturb([n for n, _ in named], params)
        if not self.separate_pass_2:
            del e  # frees g's memory before pass 2 allocates new gradients
        groups = [(batch, items, 1) for batch, items in window]
        # (average SAM's one pass is the step's own: it counts in the base trainer's metrics)
        perturbed = self._at(trainer, model, params, saved, groups, frozen=self.uses_gradient, counted=not self.uses_gradient)
        if self.separate_pass_2:
            self.descend(params, e, [local(p.grad) for p in sharded])
            del e
        if not self.uses_gradient:
            return PassLosses(perturbed)
        return PassLosses(loss, perturbed, perturbed - window_loss)

    def _at(self, trainer, model, params, saved, groups, frozen: bool, counted: bool = False) -> torch.Tensor:
        """Forward and backward passes over `groups` (``(inputs, num_items_in_batch, share)``) at
        ``w + e``, which `params` hold now; only the last one is synchronised. `params` are restored
        exactly from `saved` (what `add_perturbation` or `perturb` returned) afterwards. `counted`: whether
        the passes count in the base trainer's running metrics (`forward_backward`)."""
        total = None
        try:
            for j, (batch, items, share) in enumerate(groups):
                sync = contextlib.nullcontext() if j == len(groups) - 1 else trainer.accelerator.no_sync(model)
                with sync, frozen_batchnorm_statistics(model) if frozen else contextlib.nullcontext():
                    total = _add(total, trainer.forward_backward(model, batch, items, share, counted=counted))
        finally:
            self.restore(params, saved)
        return total

    def _chunks(self, trainer, inputs) -> list[tuple[dict, float]]:
        """`(chunk, share)` pairs: the micro-batch whole, or cut into `m`-sample chunks."""
        if self.m is None:
            return [(inputs, 1)]
        pieces = split_batch(inputs, self.m, no_single=normalises_over_samples(trainer.model))
        size = sum(n for _, n in pieces)
        return [(chunk, 1 if n == size else n / size) for chunk, n in pieces]


    def _check_batch_size(self, trainer):
        """`m` must divide the per-device batch size, which `auto_find_batch_size` may lower once
        training has started (the Trainer's `_train_batch_size`)."""
        if self.m is None:
            return
        nominal = getattr(trainer, "_train_batch_size", None) or trainer.args.per_device_train_batch_size
        if nominal != self._checked_batch_size:
            if nominal % self.m:
                raise ValueError(
                    f"sam_m={self.m} must divide the per-device batch size, which is {nominal} in this run "
                    f"(auto_find_batch_size may have lowered it): choose a divisor of {nominal}, or sam_m=None."
                )
            self._checked_batch_size = nominal


def trainable(trainer) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters by name, named as in the unwrapped model (without DDP's "module.")."""
    return [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]


def _processes() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


@torch.no_grad()
def _average_over_processes(params: list[torch.Tensor]):
    """Average the gradients of `params` over all processes (what DDP's all-reduce does), one
    all-reduce per parameter in `params` order; a missing gradient counts as zeros."""
    size = _processes()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(size)


def _add(total, value):
    if value is None:
        return total
    return value if total is None else total + value


def _add_perturbation(params: list[torch.Tensor], e: list[torch.Tensor] | None, into=None) -> list[torch.Tensor] | None:
    """``w <- w + e`` in place; returns the copy of ``w`` that restores it (None: nothing was added),
    written into the tensors `into` when they fit (a copy made for an earlier chunk)."""
    if not e:  # no parameter received a gradient
        return None
    with torch.no_grad():
        if into is not None and [t.shape for t in into] == [p.shape for p in params]:
            saved = into
            torch._foreach_copy_(saved, [p.detach() for p in params])
        else:
            saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, e)
    return saved


def _restore(params, saved):
    if saved is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
