"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization.

Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, "Surrogate Gap Guided
Sharpness-Aware Minimization", ICLR 2022 (published as "Surrogate Gap Minimization Improves
Sharpness-Aware Training"), arXiv 2203.08065, Algorithm 1; the authors' PyTorch port
juntang-zhuang/GSAM (`gsam.py`, `scheduler.py`).

The ascent is SAM's, ``e = rho_t * g / ||g||``, with ``g`` the gradient at ``w``. The descent
direction replaces SAM's ``g_p`` (the gradient at ``w + e``) by

    g_p - alpha * g_perp,   g_perp = g - cos(g, g_p) * ||g|| * g_p / ||g_p||

``g_perp`` is the component of ``g`` orthogonal to ``g_p``: descending along ``-g_perp`` lowers the
surrogate gap L(w + e) - L(w) without changing the perturbed loss to first order.

``rho_t`` follows the learning rate (the paper's proportional schedule, eq. 7 and section 5.1):

    rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)

with ``rho_max = sam_rho``, ``rho_min = gsam_rho_min``, ``lr_t`` the learning rate of the current
optimizer step and ``lr_max`` / ``lr_min`` the largest and smallest learning rates of the run's
schedule (read from the Trainer's scheduler over all optimizer steps). ``gsam_rho_min=None`` (the
default) keeps ``rho_t = sam_rho``, as does a constant learning rate.

**Inside the Trainer.** ``g`` is not kept: it is ``e * (||g|| + eps) / rho_t``, so besides the
gradients GSAM holds ``e`` and the copy of ``w`` (two copies of the trainable weights; one more
gradient buffer with gradient accumulation, where pass 2's gradient is taken apart from the
accumulated one). Under ``sam_scope="micro"`` each micro-batch (and each process) is decomposed on
its own gradients, and the step's gradient is the average over processes of the sum of the
micro-batches' directions: under DDP pass 2 runs without all-reduce and the directions are
averaged after the last micro-batch, as the authors do ("decompose per worker, then synchronize").
Under ``"step"`` (and under FSDP) the step's all-reduced ``g`` and ``g_p`` are decomposed once. A
non-finite ``g`` or ``g_p`` makes the direction non-finite, so the GradScaler skips the step; the
scalars stay on the device.
"""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .sam import EPS, sam_perturbation
from .two_pass import TwoPassMethod


class GSAM(TwoPassMethod):
    """GSAM (``flat_method="gsam"``): SAM's ascent, descent along ``g_p - alpha * g_perp``."""

    separate_pass_2 = True

    def __init__(self, rho: float = 0.05, alpha: float = 0.4, rho_min: float | None = None, **schedule_and_scope):
        super().__init__(**schedule_and_scope)
        self.rho_max, self.alpha, self.rho_min = rho, alpha, rho_min
        self.rho = rho  # rho_t of the current step
        self.trainer = None  # set in training_step: rho_t reads its learning rate schedule
        self._lr_range = None  # (lr_min, lr_max) of the run's schedule
        self._g_norm = None  # ||g|| of the current perturbation

    def training_step(self, trainer, model, inputs, num_items_in_batch=None):
        self.trainer = trainer
        self.rho = self.rho_at(trainer)
        return super().training_step(trainer, model, inputs, num_items_in_batch)

    def rho_at(self, trainer) -> float:
        """rho_t of the current optimizer step."""
        if self.rho_min is None:
            return self.rho_max
        if self._lr_range is None:
            self._lr_range = learning_rate_range(trainer)
        lr_min, lr_max = self._lr_range
        if lr_max <= lr_min:
            return self.rho_max
        lr = trainer.lr_scheduler.get_last_lr()[0]
        return self.rho_min + (self.rho_max - self.rho_min) * (lr - lr_min) / (lr_max - lr_min)

    def perturbation(self, names, params, grads):
        self._g_norm = self.norm(grads)
        return sam_perturbation(grads, self.rho, norm_of=lambda _: self._g_norm)

    def descend(self, params, e, grads):
        """``g_p <- g_p - alpha * g_perp`` in place, with ``g = e * (||g|| + eps) / rho``:
        ``g_p - alpha g_perp = (1 + alpha cos ||g|| / ||g_p||) g_p - alpha (||g|| + eps) / rho * e``,
        every scalar a tensor on the device (nothing is read on the host). A non-finite ``g_p``
        makes the direction non-finite, so that the GradScaler skips the step.

        With ``rho_t = 0`` (``gsam_rho_min=0`` at the run's smallest learning rate) ``e = 0``, so
        ``g_p = g``, ``g_perp = 0`` and the direction is ``g_p`` as it is."""
        if self.rho == 0 or not grads:
            return
        g_norm = self._g_norm
        g_p_norm = self.norm(grads)
        inner = self.dot(e, grads) * (g_norm + EPS) / self.rho  # <g, g_p>
        cos = inner / (g_norm * g_p_norm + EPS)
        scale = 1.0 + self.alpha * cos * g_norm / (g_p_norm + EPS)
        scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, math.nan))
        torch._foreach_mul_(grads, scale)
        torch._foreach_mul_(e, -self.alpha * (g_norm + EPS) / self.rho)  # (e is not needed after this)
        torch._foreach_add_(grads, e)


def learning_rate_range(trainer) -> tuple[float, float]:
    """The smallest and largest learning rate the Trainer's scheduler gives over the run's
    optimizer steps (of its first parameter group). Every ``lr_scheduler_type`` of the Trainer
    is a `LambdaLR`; another scheduler is refused."""
    scheduler = trainer.lr_scheduler
    swa = scheduler if hasattr(scheduler, "lr_at") else None  # SWA's schedule (hf_flat.swa_schedule) around the Trainer's
    scheduler = swa.scheduler if swa is not None else scheduler
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"gsam_rho_min={trainer.args.gsam_rho_min!r} makes rho follow the learning rate between its smallest and "
            f"largest value over the run, which hf-flat reads from a LambdaLR scheduler (every lr_scheduler_type of "
            f"the Trainer); this run's scheduler is a {type(scheduler).__name__}. Set gsam_rho_min=None (constant rho)."
        )
    base = scheduler.base_lrs[0]
    rates = [base * scheduler.lr_lambdas[0](t) for t in range(trainer.state.max_steps)]  # step t + 1's rate
    if swa is not None:  # from its start on, SWA's rates (from the Trainer's rate at that step)
        start = min(swa.start, len(rates))
        rates = rates[: start - 1] + [swa.lr_at(t, rates[start - 1]) for t in range(start, trainer.state.max_steps + 1)]
    return min(rates), max(rates)
