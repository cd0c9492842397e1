"""MESA, Memory-Efficient Sharpness-Aware training (Du et al., "Sharpness-Aware Training for Free",
NeurIPS 2022, arXiv 2205.14083: Algorithm 1 lines 7-9, eq. 10 and 13).

The target is the output of an EMA copy of the model (the teacher), kept in float32. It starts as
a copy of the initial weights and follows ``v = decay * v + (1 - decay) * w`` after every
optimizer step from the first on (also before `start_epoch`, when the loss does not use it yet).
Its buffers (BatchNorm statistics) are copied from the model. The teacher runs without grad, in
eval mode: one extra forward pass per micro-batch. If `start_epoch` is not below the run's number
of epochs, no teacher is kept at all (`TrajectoryMethod.on_train_begin` warns).
"""

import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .trajectory import (
    TrajectoryMethod, head_kind, is_causal_lm, logits_of, returns_loss_first, trajectory_loss, valid_positions,
)


class MESA(TrajectoryMethod):
    """The EMA teacher (a `TrainerCallback`: built when training begins, updated after every
    optimizer step) and its trajectory loss."""

    prefix = "mesa"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.active and (self.teacher is None or self._loaded is not None):
            self.build_teacher(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.active:
            self.update(model)

    def release(self):
        self.teacher = self._loaded = None

    def __init__(self, lam=0.8, tau=5.0, decay=0.9995, start_epoch=5):
        self.lam, self.tau, self.decay, self.start_epoch = lam, tau, decay, start_epoch
        self.update_fn = get_ema_multi_avg_fn(decay)
        self.teacher = None
        self._loaded = None  # teacher tensors restored from a checkpoint, applied when the teacher exists

    def build_teacher(self, model):
        """A float32 copy of `model` (the unwrapped one), frozen, in eval mode."""
        teacher = copy.deepcopy(model).float().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self._loaded is not None:
            own = teacher.state_dict()
            missing = set(own) - set(self._loaded)
            if missing:
                raise ValueError(f"The MESA teacher in the checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}.")
            wrong = [k for k in own if own[k].shape != self._loaded[k].shape]
            if wrong:
                raise ValueError(
                    f"The MESA teacher in the checkpoint does not fit the model: {wrong[0]} has shape "
                    f"{tuple(self._loaded[wrong[0]].shape)} there and {tuple(own[wrong[0]].shape)} in the model. "
                    "Resume with the model that wrote the checkpoint."
                )
            teacher.load_state_dict(self._loaded)
            self._loaded = None
        self.teacher = teacher

    @torch.no_grad()
    def update(self, model):
        """v <- decay * v + (1 - decay) * w for the parameters; buffers are copied."""
        if self.teacher is None:
            self.build_teacher(model)
        pairs = list(zip(self.teacher.parameters(), model.parameters()))
        teacher_params = [t for t, _ in pairs]
        live = [p.detach().to(dtype=t.dtype, device=t.device) for t, p in pairs]
        self.update_fn(teacher_params, live, None)
        for t, b in zip(self.teacher.buffers(), model.buffers()):
            t.copy_(b)

    def term(self, trainer, logits, inputs):
        """The trajectory term for this training micro-batch of `trainer` against the teacher's logits
        on the same `inputs` (labels included), or None before `start_epoch` or when off for this run."""
        if not self.active or int(trainer.state.epoch or 0) < self.start_epoch:
            return None
        with torch.no_grad(), trainer.accelerator.autocast():
            outputs = self.teacher(**inputs)
        target = logits_of(outputs, self.teacher, returns_loss_first(inputs, trainer.label_names))
        valid = valid_positions(inputs, logits, is_causal_lm(trainer.model)) if logits.dim() == 3 else None
        kind = head_kind(trainer.model, logits)
        return trajectory_loss(logits, target, self.lam, self.tau, valid=valid, kind=kind)

    def state_dict(self):
        if self.teacher is None:
            return {}, {"mesa_version": "1"}
        # cloned: tied weights would otherwise share memory, which safetensors refuses
        return {f"mesa.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}, {
            "mesa_version": "1"
        }

    def load_state_dict(self, tensors, meta):
        loaded = {k[len("mesa.") :]: v for k, v in tensors.items() if k.startswith("mesa.")}
        if loaded:
            self._loaded, self.teacher = loaded, None
