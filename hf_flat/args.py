"""`FlatTrainingArguments`: the Trainer's arguments plus the flat-minima ones.

`flat_method` is parsed once, here, into a perturbation method (how each micro-batch's gradient
is taken) and an averaging method (what is done with the weights along the trajectory).
Every bad value raises a `ValueError` at construction that names the argument, the value, and
what is allowed.
"""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

#: Perturbation methods implemented so far (`hf_flat.methods.PERTURBATIONS` builds them).
PERTURBATION_METHODS = ("sam", "asam", "saf", "mesa")
#: The perturbation methods that take two forward/backward passes per micro-batch.
TWO_PASS_METHODS = ("sam", "asam")
#: Averaging methods implemented so far.
AVERAGING_METHODS = ("swa", "ema")
#: Names the papers use for combinations.
ALIASES = {"wasam": "sam+swa"}
#: Optimizers that update the weights inside `backward()`: a two-pass step cannot run with them.
_STEP_IN_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")


def accepted_flat_methods() -> list[str]:
    """Every value `flat_method` accepts, in the order the README lists them."""
    names = ["none", *PERTURBATION_METHODS, *AVERAGING_METHODS]
    names += [f"{p}+{a}" for p in PERTURBATION_METHODS for a in AVERAGING_METHODS]
    names += [alias for alias, target in ALIASES.items() if target in names]
    return names


def parse_flat_method(value: str) -> tuple[str | None, str | None]:
    """Split `flat_method` into `(perturbation, averaging)`, each `None` when absent.

    >>> parse_flat_method("sam")
    ('sam', None)
    """
    name = str(value).strip().lower()
    name = ALIASES.get(name, name)
    if name in accepted_flat_methods():
        if name == "none":
            return None, None
        parts = name.split("+")
        perturbation = parts[0] if parts[0] in PERTURBATION_METHODS else None
        averaging = parts[-1] if parts[-1] in AVERAGING_METHODS else None
        return perturbation, averaging
    raise ValueError(
        f"flat_method={value!r} is not supported. Accepted values: {', '.join(accepted_flat_methods())}."
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(args, name, ok, allowed):
    value = getattr(args, name)
    if not ok(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}.")


@dataclass
class FlatTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with the arguments of the flat-minima methods.

    Example:
        >>> args = FlatTrainingArguments("out", flat_method="asam", sam_rho=0.5)
    """

    flat_method: str = field(
        default="none",
        metadata={
            "help": "Flat-minima method: 'none' (the plain Trainer), a perturbation method ('sam', 'asam'), "
            "an averaging method ('swa', 'ema'), or '<perturbation>+<averaging>' ('wasam' = 'sam+swa'). "
            "Accepted: " + ", ".join(accepted_flat_methods()) + "."
        },
    )
    sam_rho: float = field(
        default=0.05,
        metadata={"help": "Radius rho of the SAM / ASAM perturbation (> 0). ASAM's authors use 0.5-1.0."},
    )
    asam_eta: float = field(
        default=0.01,
        metadata={"help": "ASAM's eta (>= 0): the scale of a weight is |w| + eta."},
    )

    average_start: float = field(
        default=0.75,
        metadata={"help": "Averaging (swa, ema) begins after this fraction of the optimizer steps, in [0, 1)."},
    )
    average_freq: int = field(
        default=0,
        metadata={"help": "SWA snapshot every this many optimizer steps; 0 = once at the end of every epoch."},
    )
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay, in (0, 1)."})
    saf_lambda: float = field(default=0.3, metadata={"help": "SAF: weight of the trajectory loss (>= 0)."})
    saf_tau: float = field(default=5.0, metadata={"help": "SAF: softmax temperature of the trajectory loss (> 0)."})
    saf_start_epoch: int = field(
        default=5, metadata={"help": "SAF: 0-based epoch from which the trajectory loss is used (>= 0)."}
    )
    saf_past_epochs: int = field(
        default=3, metadata={"help": "SAF: the target is the sample's logits this many epochs ago (>= 1)."}
    )
    mesa_lambda: float = field(default=0.8, metadata={"help": "MESA: weight of the trajectory loss (>= 0)."})
    mesa_tau: float = field(default=5.0, metadata={"help": "MESA: softmax temperature (> 0)."})
    mesa_decay: float = field(default=0.9995, metadata={"help": "MESA: EMA decay of the teacher, in (0, 1)."})
    mesa_start_epoch: int = field(
        default=5, metadata={"help": "MESA: 0-based epoch from which the trajectory loss is used (>= 0)."}
    )
    average_on_cpu: bool = field(
        default=False, metadata={"help": "Keep the float32 averaged weights in CPU memory (for large models)."}
    )

    def __post_init__(self):
        self.flat_perturbation, self.flat_averaging = parse_flat_method(self.flat_method)
        if not (isinstance(self.sam_rho, (int, float)) and math.isfinite(self.sam_rho) and self.sam_rho > 0):
            raise ValueError(f"sam_rho={self.sam_rho!r} is not allowed: it must be a finite number > 0.")
        if not (isinstance(self.asam_eta, (int, float)) and math.isfinite(self.asam_eta) and self.asam_eta >= 0):
            raise ValueError(f"asam_eta={self.asam_eta!r} is not allowed: it must be a finite number >= 0.")
        if not (isinstance(self.average_start, (int, float)) and 0 <= self.average_start < 1):
            raise ValueError(f"average_start={self.average_start!r} is not allowed: it must be in [0, 1).")
        if isinstance(self.average_freq, bool) or not isinstance(self.average_freq, int) or self.average_freq < 0:
            raise ValueError(f"average_freq={self.average_freq!r} is not allowed: it must be an integer >= 0.")
        if not (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay={self.ema_decay!r} is not allowed: it must be in (0, 1).")
        for name in ("saf_lambda", "mesa_lambda"):
            _check(self, name, lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
        for name in ("saf_tau", "mesa_tau"):
            _check(self, name, lambda v: _is_number(v) and v > 0, "a finite number > 0")
        for name in ("saf_start_epoch", "mesa_start_epoch"):
            _check(self, name, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _check(self, "saf_past_epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check(self, "mesa_decay", lambda v: _is_number(v) and 0 < v < 1, "in (0, 1)")
        if self.flat_perturbation in TWO_PASS_METHODS:
            self._refuse_unsupported_two_pass_setups()
        if self.flat_perturbation == "mesa" and (self.deepspeed or self.fsdp):
            raise ValueError(
                "flat_method='mesa' keeps a full float32 copy of the model as its EMA teacher, which "
                "DeepSpeed / FSDP shard: train with DDP, or use flat_method='saf' (no copy of the model)."
            )
        if self.flat_averaging is not None and self.load_best_model_at_end:
            raise ValueError(
                f"load_best_model_at_end=True is not supported with flat_method={self.flat_method!r}: at the "
                "end of training the model holds the averaged weights, which no checkpoint holds. To keep "
                "the best checkpoint, use save_strategy='best' with metric_for_best_model='eval_avg_loss' "
                "(or another eval_avg_ metric), and set load_best_model_at_end=False."
            )
        super().__post_init__()

    def _refuse_unsupported_two_pass_setups(self):
        method = self.flat_method
        if self.deepspeed:
            raise ValueError(
                f"flat_method={method!r} takes two forward/backward passes per micro-batch, which DeepSpeed "
                "cannot run: its backward() already steps the optimizer and ZeRO-3 keeps no full weights to "
                "perturb. Drop deepspeed= and train with DDP (`accelerate launch` / `torchrun`), using "
                "PEFT/LoRA if the model is too large, or use flat_method='none'."
            )
        if self.fsdp:
            raise ValueError(
                f"flat_method={method!r} is not supported with fsdp={self.fsdp!r}: the perturbation needs the "
                "norm of the gradient over all shards. Train with DDP (`accelerate launch` / `torchrun`), "
                "using PEFT/LoRA if the model is too large."
            )
        optim = str(getattr(self.optim, "value", self.optim))
        if optim in _STEP_IN_BACKWARD_OPTIMIZERS or "layerwise" in optim:
            raise ValueError(
                f"optim={optim!r} updates the weights inside backward(), so flat_method={method!r} would "
                "step at the perturbed weights. Use an optimizer that steps once per optimizer step, such "
                "as optim='adamw_torch' or 'sgd'."
            )
