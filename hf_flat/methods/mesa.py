"""MESA, Memory-Efficient Sharpness-Aware training (Du et al., "Sharpness-Aware Training for Free",
NeurIPS 2022, arXiv 2205.14083: Algorithm 1 lines 7-9, eq. 10 and 13).

The target is the output of an EMA copy of the model (the teacher), kept in float32. It starts as
a copy of the initial weights and follows ``v = decay * v + (1 - decay) * w`` after every
optimizer step from the first on (also before `start_epoch`, when the loss does not use it yet).
Its buffers (BatchNorm statistics) are copied from the model. The teacher runs without grad, in
eval mode, on each training micro-batch before the model's own forward pass: one extra forward
pass per micro-batch. If `start_epoch` is not below the run's number of epochs, no teacher is kept
at all (`TrajectoryMethod.on_train_begin` warns).

Under FSDP2 the model cannot be copied (FSDP forbids ``deepcopy``) and a whole copy would defeat
sharding: the teacher is then `ShardedTeacher`, float32 copies of this process's rows of every
parameter (``1 / processes`` of the model each), updated without communication. Its forward puts
them into the model, runs the model, and puts the live rows back bit for bit.
"""

import contextlib
import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..sharding import ShardedTensor, is_sharded, local, reshard, rows_of
from ..state_file import rows_of_state, shape_in_state
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
        self.teacher = None  # a frozen float32 copy of the model, or a `ShardedTeacher`
        self._loaded = None  # the checkpoint's tensors (``mesa.<name>``), applied when the teacher is built

    def build_teacher(self, model):
        """A float32 copy of `model` (the unwrapped one), frozen, in eval mode; a `ShardedTeacher`
        for a model sharded with FSDP2."""
        reshard(model)
        if any(is_sharded(p) for p in model.parameters()):
            self.teacher, self._loaded = ShardedTeacher(model, self._loaded), None
            return
        teacher = copy.deepcopy(model).float().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self._loaded is not None:
            own = teacher.state_dict()
            _check_fits(self._loaded, {k: v.shape for k, v in own.items()})
            teacher.load_state_dict({k: self._loaded[f"mesa.{k}"] for k in own})
            self._loaded = None
        self.teacher = teacher

    @torch.no_grad()
    def update(self, model):
        """v <- decay * v + (1 - decay) * w for the parameters; buffers are copied."""
        if self.teacher is None:
            self.build_teacher(model)
        if isinstance(self.teacher, ShardedTeacher):
            return self.teacher.update(model, self.update_fn)
        pairs = list(zip(self.teacher.parameters(), model.parameters()))
        teacher_params = [t for t, _ in pairs]
        live = [p.detach().to(dtype=t.dtype, device=t.device) for t, p in pairs]
        self.update_fn(teacher_params, live, None)
        for t, b in zip(self.teacher.buffers(), model.buffers()):
            t.copy_(b)

    def before_forward(self, trainer, inputs):
        """The teacher's logits on this training micro-batch's `inputs` (labels included), computed
        before the model's own forward pass; None before `start_epoch` or when off for this run."""
        if not self.active or int(trainer.state.epoch or 0) < self.start_epoch:
            return None
        sharded = isinstance(self.teacher, ShardedTeacher)
        teacher = trainer.model if sharded else self.teacher
        with torch.no_grad(), self.teacher.swapped_in(teacher) if sharded else contextlib.nullcontext():
            with trainer.accelerator.autocast():
                outputs = teacher(**inputs)
            return logits_of(outputs, teacher, returns_loss_first(inputs, trainer.label_names)).detach()

    def term(self, trainer, logits, inputs, target=None):
        """The trajectory term for this training micro-batch of `trainer` against the teacher's logits
        `target` (`before_forward`), or None when there are none."""
        if target is None:
            return None
        valid = valid_positions(inputs, logits, is_causal_lm(trainer.model)) if logits.dim() == 3 else None
        kind = head_kind(trainer.model, logits)
        return trajectory_loss(logits, target, self.lam, self.tau, valid=valid, kind=kind)

    def state_dict(self):
        if self.teacher is None:
            return {}, {"mesa_version": "1"}
        if isinstance(self.teacher, ShardedTeacher):
            return self.teacher.state_dict(), {"mesa_version": "1"}
        # cloned: tied weights would otherwise share memory, which safetensors refuses
        return {f"mesa.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}, {
            "mesa_version": "1"
        }

    def load_state_dict(self, tensors, meta):
        if any(k.startswith("mesa.") for k in tensors):
            self._loaded, self.teacher = tensors, None


def _check_fits(tensors, shapes: dict):
    """Refuse a checkpoint's teacher (`tensors`, ``mesa.<name>``) that lacks one of `shapes` or has another shape."""
    missing = [k for k in shapes if f"mesa.{k}" not in tensors]
    if missing:
        raise ValueError(f"The MESA teacher in the checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}.")
    for k, shape in shapes.items():
        saved = tuple(shape_in_state(tensors, f"mesa.{k}"))
        if saved != tuple(shape):
            raise ValueError(
                f"The MESA teacher in the checkpoint does not fit the model: {k} has shape {saved} there and "
                f"{tuple(shape)} in the model. Resume with the model that wrote the checkpoint."
            )


class ShardedTeacher:
    """MESA's teacher for a model sharded with FSDP2: float32 copies of this process's rows of every
    parameter (by name), and of the model's buffers, which FSDP does not shard.

    `swapped_in(model)` runs the model as the teacher: the teacher's values go into the model's
    rows, every process's forward pass all-gathers them, and afterwards the live rows and buffers
    are back exactly (FSDP2 is resharded first and last, so no module keeps gathered values).
    """

    def __init__(self, model, loaded=None):
        reshard(model)
        params = dict(model.named_parameters())
        self.rows = {n: rows_of(p) for n, p in params.items()}
        if loaded is None:
            self.params = {n: local(p).detach().float().clone() for n, p in params.items()}
            self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            return
        _check_fits(loaded, {n: p.shape for n, p in params.items()})
        self.params = {n: rows_of_state(loaded, f"mesa.{n}", self.rows[n]).float().to(local(p).device)
                       for n, p in params.items()}
        # buffers the checkpoint lacks (non-persistent ones) keep the model's values
        self.buffers = {n: (loaded[f"mesa.{n}"] if f"mesa.{n}" in loaded else b.detach()).clone().to(b.device)
                        for n, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model, update_fn):
        reshard(model)
        params = dict(model.named_parameters())
        names = list(self.params)
        update_fn([self.params[n] for n in names], [local(params[n]).detach().float() for n in names], None)
        for n, b in model.named_buffers():
            self.buffers[n].copy_(b)

    @contextlib.contextmanager
    def swapped_in(self, model):
        reshard(model)
        params = {n: local(p) for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        live = {n: p.detach().clone() for n, p in params.items()}
        live_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        was_training = model.training
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.params[n])
            for n, b in buffers.items():
                b.copy_(self.buffers[n])
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            reshard(model)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])
                for n, b in buffers.items():
                    b.copy_(live_buffers[n])

    def state_dict(self) -> dict:
        tensors = {f"mesa.{n}": ShardedTensor(t.detach().cpu().contiguous(), self.rows[n]) for n, t in self.params.items()}
        tensors.update({f"mesa.{n}": b.detach().cpu().clone() for n, b in self.buffers.items()})
        return tensors
