"""SWA's learning-rate schedule, from the start of averaging on.

Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging Weights Leads to Wider Optima and
Better Generalization", UAI 2018, arXiv 1803.05407, section 3.1, eq. 2 and Algorithm 1: from the
start of averaging SWA trains either with a constant learning rate or with a cyclical one, and
takes a snapshot at the end of each cycle. torch's `torch.optim.swa_utils.SWALR` anneals to the
constant rate; Lightning's SWA callback sets it up.

With ``s`` the averaging's first step (``max(1, ceil(average_start * T))``, `WeightAveraging`),
``lr_s`` the rate the Trainer's own schedule gives at step ``s`` (per parameter group) and
``k = t - s`` for optimizer step ``t >= s``:

- **anneal, then constant** (``swa_lr``, ``swa_anneal_steps = a``, ``swa_anneal_strategy``), as
  `SWALR`: ``lr_t = swa_lr * f(min(1, k / a)) + lr_s * (1 - f(min(1, k / a)))`` with
  ``f(x) = (1 - cos(pi x)) / 2`` ("cos") or ``f(x) = x`` ("linear"); ``a = 0`` gives ``swa_lr`` from
  step ``s`` on.
- **cyclical** (``swa_cycle_steps = c``, eq. 2): ``lr_t = (1 - tau) * lr_s + tau * swa_lr`` with
  ``tau = (k mod c + 1) / c``: within each cycle of ``c`` steps the rate falls linearly from
  ``lr_s`` to ``swa_lr``, reached at the cycle's last step, where SWA takes its snapshot.

Before step ``s`` the Trainer's own schedule governs, unchanged. The schedule counts the steps the
Trainer's scheduler is stepped (every optimizer step, except one that an fp16 overflow skipped,
as for any scheduler). Its state (the step count, ``lr_s`` and the wrapped schedule's state) goes
into the Trainer's ``scheduler.pt`` with every checkpoint, as plain numbers, so a resumed run
continues it exactly.
"""

import math

from torch.optim.lr_scheduler import LRScheduler


class SWASchedule:
    """The Trainer's learning-rate schedule until averaging starts, SWA's from there on.

    Args:
        scheduler: the Trainer's own scheduler (stepped until step `start`).
        start: ``s``, the first optimizer step (1-based) of SWA's schedule.
        swa_lr: the rate annealed to, or the low end of each cycle.
        anneal_steps: ``a`` (0: ``swa_lr`` at once).
        strategy: ``"cos"`` or ``"linear"``.
        cycle_steps: ``c`` > 0 for the cyclical schedule (then ``anneal_steps`` is unused).
    """

    def __init__(self, scheduler: LRScheduler, start: int, swa_lr: float, anneal_steps: int = 0, strategy: str = "cos",
                 cycle_steps: int = 0):
        self.scheduler, self.start, self.swa_lr = scheduler, start, swa_lr
        self.anneal_steps, self.strategy, self.cycle_steps = anneal_steps, strategy, cycle_steps
        self.done = 0  # optimizer steps taken (times step() was called)
        self.start_lrs = None  # lr_s per parameter group, once step s is reached
        self.optimizer = scheduler.optimizer
        self._update()

    def lr_at(self, step: int, start_lr: float) -> float:
        """The rate of optimizer step `step` >= s, for a group whose rate at step s is `start_lr`."""
        k = step - self.start
        if self.cycle_steps:
            tau = (k % self.cycle_steps + 1) / self.cycle_steps
            return (1 - tau) * start_lr + tau * self.swa_lr
        if self.anneal_steps == 0:
            return self.swa_lr
        x = min(1.0, k / self.anneal_steps)
        f = (1 - math.cos(math.pi * x)) / 2 if self.strategy == "cos" else x
        return self.swa_lr * f + start_lr * (1 - f)

    def step(self):
        self.done += 1
        if self.done + 1 <= self.start:  # the next step is the own schedule's, or step s, whose lr_s it gives
            self.scheduler.step()
        self._update()

    def _update(self):
        upcoming = self.done + 1
        if upcoming < self.start:
            self._last_lr = self.scheduler.get_last_lr()
            return
        if self.start_lrs is None:
            self.start_lrs = list(self.scheduler.get_last_lr())
        self._last_lr = [self.lr_at(upcoming, lr) for lr in self.start_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {"done": self.done, "start_lrs": self.start_lrs, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state["scheduler"])
        self.done, self.start_lrs = state["done"], state["start_lrs"]
        self._update()
