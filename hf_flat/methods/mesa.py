"""MESA, Memory-Efficient Sharpness-Aware training (Du et al., "Sharpness-Aware Training for Free",
NeurIPS 2022, arXiv 2205.14083: Algorithm 1 lines 7-9, eq. 10 and 13).

The target is the output of an EMA copy of the model (the teacher), kept in float32. It starts as
a copy of the initial weights and follows ``v = decay * v + (1 - decay) * w`` after every
optimizer step from the first on (also before `start_epoch`, when the loss does not use it yet).
Its buffers (BatchNorm statistics) are copied from the model. The teacher runs without grad, in
eval mode, on each training micro-batch before the model's own forward pass: one extra forward
pass per micro-batch. If `start_epoch` is not below the run's number of epochs, no teacher is kept
at all (`TrajectoryMethod.on_train_begin` warns).

The teacher is one of two kinds:

- a model of its own (every parameter trainable): a float32 ``deepcopy`` of the model that runs
  its class's own ``forward``. A forward patched onto the instance (TRL's fused LM head, Accelerate's
  autocast wrapper) is a closure over the *live* model, which a copy would still call; the copy drops
  it, and a guard refuses a teacher forward that reaches the live model.
- `SwapTeacher`, float32 EMA copies of the *trainable* parameters only, run by putting them into the
  live model for the teacher's forward pass and the live values back bit for bit afterwards. It is
  used when some parameters are frozen (a LoRA adapter: the teacher is the EMA of the adapter on top
  of the shared frozen base, so it costs a float32 copy of the adapter, not of the model) and under
  FSDP2, where the model cannot be copied and a whole copy would defeat sharding (each process then
  keeps its rows of each parameter, ``1 / processes`` of the model, updated without communication).

The term reads the student's logits from the training forward itself
(`hf_flat.methods.outputs.captured_forward`); under TRL's fused LM head, which builds no logits,
from the backbone's hidden states at the positions the trainer's loss counts, and the teacher's
logits at the same positions.
"""

import contextlib
import copy
import itertools

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..sharding import ShardedTensor, is_sharded, local, reshard, rows_of
from ..state_file import rows_of_state, shape_in_state
from .outputs import fused_student_logits, rows_at
from .trajectory import (
    SOFTMAX, TrajectoryMethod, head_kind, is_causal_lm, logits_of, returns_loss_first, student_logits, trajectory_loss,
    valid_positions,
)


class MESA(TrajectoryMethod):
    """The EMA teacher (a `TrainerCallback`: built when training begins, updated after every
    optimizer step) and its trajectory loss."""

    prefix = "mesa"

    def __init__(self, lam=0.8, tau=5.0, decay=0.9995, start_epoch=5):
        self.lam, self.tau, self.decay, self.start_epoch = lam, tau, decay, start_epoch
        self.update_fn = get_ema_multi_avg_fn(decay)
        self.teacher = None  # a frozen float32 copy of the model, or a `SwapTeacher`
        self._loaded = None  # the checkpoint's tensors (``mesa.<name>``), applied when the teacher is built

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.active and (self.teacher is None or self._loaded is not None):
            self.build_teacher(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.active:
            self.update(model)

    def release(self):
        self.teacher = self._loaded = None

    def build_teacher(self, model):
        """The teacher of `model` (the unwrapped one): a float32 copy of its own if every parameter
        is trainable, else (frozen parameters, or FSDP2) a `SwapTeacher` of its trainable ones."""
        reshard(model)
        params = list(model.named_parameters())
        if any(is_sharded(p) for _, p in params) or not all(p.requires_grad for _, p in params):
            names = [n for n, p in params if p.requires_grad] or [n for n, _ in params]
            self.teacher, self._loaded = SwapTeacher(model, names, self._loaded), None
            return
        teacher = copy.deepcopy(model).float().eval()
        for module in teacher.modules():
            module.__dict__.pop("forward", None)  # a patched forward would still call the live model
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self._loaded is not None:
            own = teacher.state_dict()
            _check_fits(self._loaded, {k: v.shape for k, v in own.items()})
            teacher.load_state_dict({k: self._loaded[f"mesa.{k}"] for k in own})
            self._loaded = None
        self.teacher = teacher

    @property
    def nbytes(self) -> int:
        """The memory the teacher holds (its parameters and buffers)."""
        if self.teacher is None:
            return 0
        if isinstance(self.teacher, SwapTeacher):
            return self.teacher.nbytes
        return sum(t.nbytes for t in itertools.chain(self.teacher.parameters(), self.teacher.buffers()))

    @torch.no_grad()
    def update(self, model):
        """v <- decay * v + (1 - decay) * w for the parameters; buffers are copied."""
        if self.teacher is None:
            self.build_teacher(model)
        if isinstance(self.teacher, SwapTeacher):
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
        swapped = isinstance(self.teacher, SwapTeacher)
        teacher = trainer.model if swapped else self.teacher
        with torch.no_grad(), self.teacher.swapped_in(teacher) if swapped else live_model_not_called(trainer.model):
            with trainer.accelerator.autocast():
                outputs = teacher(**inputs)
            return logits_of(outputs, teacher, returns_loss_first(inputs, trainer.label_names)).detach()

    def term(self, trainer, seen, inputs, target=None):
        """The trajectory term for this training micro-batch: the student's logits from its training
        forward (`seen`) against the teacher's logits `target` (`before_forward`), over the positions
        the trainer's loss counts; None when there is no target."""
        if target is None:
            return None
        if seen.fused:  # TRL's fused LM head: the counted positions' logits, from the hidden states
            logits, mask = fused_student_logits(seen, trainer.model)
            if torch.is_grad_enabled() and not logits.requires_grad:
                raise RuntimeError("MESA: the student's logits carry no gradient, so its term would not train the model.")
            return trajectory_loss(logits, rows_at(mask, target), self.lam, self.tau, kind=SOFTMAX)
        logits = student_logits(trainer, seen)
        valid = valid_positions(inputs, logits, is_causal_lm(trainer.model)) if logits.dim() == 3 else None
        kind = head_kind(trainer.model, logits)
        return trajectory_loss(logits, target, self.lam, self.tau, valid=valid, kind=kind)

    def state_dict(self):
        if self.teacher is None:
            return {}, {"mesa_version": "1"}
        if isinstance(self.teacher, SwapTeacher):
            return self.teacher.state_dict(), {"mesa_version": "1"}
        # cloned: tied weights would otherwise share memory, which safetensors refuses
        return {f"mesa.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}, {
            "mesa_version": "1"
        }

    def load_state_dict(self, tensors, meta):
        if any(k.startswith("mesa.") for k in tensors):
            self._loaded, self.teacher = tensors, None


@contextlib.contextmanager
def live_model_not_called(model):
    """Refuse a call of the live `model` inside this block (a teacher copy whose forward still runs
    the model it was copied from would make the term silently zero)."""

    def refuse(module, args):
        raise RuntimeError(
            "MESA's teacher, a copy of the model, ran the live model's forward: a forward patched onto the model "
            "still refers to it. Report this with the trainer and model you use; meanwhile freeze a parameter "
            "(the teacher then keeps EMA copies of the trainable ones only) or use another method."
        )

    handle = model.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


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


class SwapTeacher:
    """MESA's teacher as float32 EMA copies of some of the model's parameters (`names`: the
    trainable ones), this process's rows of each under FSDP2, and copies of the model's buffers.

    `swapped_in(model)` runs the model as the teacher: the teacher's values go into those parameters
    (under FSDP2 into this process's rows, which every process's forward pass all-gathers), the model
    is put in eval mode, and afterwards the live values, buffers and mode are back exactly. The
    other parameters (a LoRA adapter's frozen base) are shared with the live model.
    """

    def __init__(self, model, names, loaded=None):
        reshard(model)
        params = dict(model.named_parameters())
        self.names = list(names)
        self.rows = {n: rows_of(params[n]) for n in self.names}
        self.sharded = {n: is_sharded(params[n]) for n in self.names}
        if loaded is None:
            self.params = {n: local(params[n]).detach().float().clone() for n in self.names}
            self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            return
        _check_fits(loaded, {n: params[n].shape for n in self.names})
        self.params = {n: rows_of_state(loaded, f"mesa.{n}", self.rows[n]).float().to(local(params[n]).device)
                       for n in self.names}
        # buffers the checkpoint lacks (non-persistent ones) keep the model's values
        self.buffers = {n: (loaded[f"mesa.{n}"] if f"mesa.{n}" in loaded else b.detach()).clone().to(b.device)
                        for n, b in model.named_buffers()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in itertools.chain(self.params.values(), self.buffers.values()))

    @torch.no_grad()
    def update(self, model, update_fn):
        reshard(model)
        params = dict(model.named_parameters())
        update_fn([self.params[n] for n in self.names], [local(params[n]).detach().float() for n in self.names], None)
        for n, b in model.named_buffers():
            self.buffers[n].copy_(b)

    @contextlib.contextmanager
    def swapped_in(self, model):
        reshard(model)
        params = {n: local(p) for n, p in model.named_parameters() if n in self.params}
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
        tensors = {f"mesa.{n}": ShardedTensor(t.detach().cpu().contiguous(), self.rows[n]) if self.sharded[n]
                   else t.detach().cpu().clone() for n, t in self.params.items()}
        tensors.update({f"mesa.{n}": b.detach().cpu().clone() for n, b in self.buffers.items()})
        return tensors
