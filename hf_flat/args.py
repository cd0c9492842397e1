"""`FlatTrainingArguments`: the Trainer's arguments plus the flat-minima ones.

The flat-minima fields and their checks live in the dataclass mixin `FlatArgumentsMixin`:
`FlatTrainingArguments` adds them to `transformers.TrainingArguments`, `FlatSeq2SeqTrainingArguments`
to `transformers.Seq2SeqTrainingArguments`, and `flat_arguments_class(MyArgs)` to any other
`TrainingArguments` subclass.

`flat_method` is parsed, whenever it is read, into a perturbation method (`flat_perturbation`:
how each micro-batch's gradient is taken) and an averaging method (`flat_averaging`: what is
done with the weights along the trajectory). Every bad value raises a `ValueError` at
construction, and again from `check_flat_arguments()`, that names the argument, the value, and
what is allowed.
"""

import copyreg
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

#: Perturbation methods implemented so far (`hf_flat.methods.PERTURBATIONS` builds them).
PERTURBATION_METHODS = ("sam", "asam", "avg_sam", "gsam", "looksam", "esam", "saf", "mesa")
#: The methods that move the weights to ``w + e`` for a forward/backward pass (`hf_flat.methods.two_pass`):
#: two passes for SAM and ASAM, one for average SAM, whose ``e`` needs no gradient.
TWO_PASS_METHODS = ("sam", "asam", "avg_sam", "gsam", "looksam", "esam")
#: Where and when those methods perturb, with their defaults (the arguments only they read).
PERTURBATION_SETTINGS = {"sam_m": None, "sam_scope": None, "sam_start": 0.0, "sam_interval": 1}
#: Averaging methods implemented so far.
AVERAGING_METHODS = ("swa", "ema", "lawa")
#: SWA's learning-rate schedule (`hf_flat.swa_schedule`), with its defaults.
SWA_SCHEDULE_SETTINGS = {"swa_lr": None, "swa_anneal_steps": 0, "swa_anneal_strategy": "cos", "swa_cycle_steps": 0}
#: The arguments that apply to each part of a `flat_method` (recorded by the example scripts and in model cards).
FLAT_SETTINGS = {
    "sam": ("sam_rho", *PERTURBATION_SETTINGS),
    "asam": ("sam_rho", "asam_eta", *PERTURBATION_SETTINGS),
    "avg_sam": ("sam_rho", *PERTURBATION_SETTINGS),
    "gsam": ("sam_rho", "gsam_alpha", "gsam_rho_min", *PERTURBATION_SETTINGS),
    "looksam": ("sam_rho", "looksam_k", "looksam_alpha", "sam_start"),
    "esam": ("sam_rho", "esam_beta", "esam_gamma", "sam_start", "sam_interval"),
    "saf": ("saf_lambda", "saf_tau", "saf_start_epoch", "saf_past_epochs"),
    "mesa": ("mesa_lambda", "mesa_tau", "mesa_decay", "mesa_start_epoch"),
    "swa": ("average_start", "average_freq", "average_bn_batches", *SWA_SCHEDULE_SETTINGS),
    "ema": ("average_start", "ema_decay", "average_bn_batches", *SWA_SCHEDULE_SETTINGS),
    "lawa": ("average_start", "average_freq", "lawa_k", "average_bn_batches", *SWA_SCHEDULE_SETTINGS),
}
#: Each method's paper, as a model card cites it.
METHOD_PAPERS = {
    "sam": "SAM: Foret, Kleiner, Mobahi, Neyshabur, \"Sharpness-Aware Minimization for Efficiently Improving "
    "Generalization\", ICLR 2021, arXiv 2010.01412",
    "asam": "ASAM: Kwon, Kim, Park, Choi, \"ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of "
    "Deep Neural Networks\", ICML 2021, arXiv 2102.11600",
    "avg_sam": "average SAM (random perturbations): Boca, Cross, Holm, Korkmaz, \"Towards an Even Better Understanding "
    "of Sharpness-Aware Minimisation\", University of Cambridge, 2023",
    "gsam": "GSAM: Zhuang et al., \"Surrogate Gap Guided Sharpness-Aware Minimization\", ICLR 2022, arXiv 2203.08065",
    "looksam": "LookSAM: Liu et al., \"Towards Efficient and Scalable Sharpness-Aware Minimization\", CVPR 2022, "
    "arXiv 2203.02714",
    "esam": "ESAM: Du et al., \"Efficient Sharpness-aware Minimization for Improved Training of Neural Networks\", "
    "ICLR 2022, arXiv 2110.03141",
    "saf": "SAF: Du, Zhou, Feng, Tan, Zhou, \"Sharpness-Aware Training for Free\", NeurIPS 2022, arXiv 2205.14083",
    "mesa": "MESA: Du, Zhou, Feng, Tan, Zhou, \"Sharpness-Aware Training for Free\", NeurIPS 2022, arXiv 2205.14083",
    "swa": "SWA: Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, \"Averaging Weights Leads to Wider Optima and Better "
    "Generalization\", UAI 2018, arXiv 1803.05407",
    "ema": "EMA: an exponential moving average of the weights",
    "lawa": "LAWA: Kaddour, \"Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest Weight "
    "Averaging\", arXiv 2209.14981",
}
#: Names the papers use for combinations.
ALIASES = {"wasam": "sam+swa"}
#: Optimizers that update the weights inside `backward()`: a two-pass step cannot run with them.
_STEP_IN_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")


#: Why DeepSpeed cannot run the methods that read or move the weights, one sentence per ZeRO stage.
DEEPSPEED_STAGES = {
    0: "ZeRO stage 0: DeepSpeed's backward() also steps the optimizer at the end of each accumulation window, so "
    "a first pass at w (SAM, ASAM) would already move the weights, and with bf16/fp16 the weights it trains are "
    "an fp32 copy inside its optimizer, not the module's weights that an average or a teacher would read.",
    1: "ZeRO stage 1: as stage 0, and that fp32 copy is partitioned across processes inside the optimizer.",
    2: "ZeRO stage 2: as stage 1, and the gradients are reduced and partitioned inside backward(), so no process "
    "holds the gradient a perturbation is made from.",
    3: "ZeRO stage 3: the module's weights themselves are partitioned and empty outside a forward pass, so there "
    "is nothing to perturb, average or copy.",
}


def deepspeed_stage(deepspeed) -> int | None:
    """The ZeRO stage of a `deepspeed` argument (a dict or the path of a JSON file), if it says."""
    config = deepspeed
    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        with open(deepspeed, encoding="utf-8") as f:
            config = json.load(f)
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return stage if stage in DEEPSPEED_STAGES else None


def deepspeed_refusal(flat_method: str, stage: int | None) -> str:
    """The error for a flat method that reads or moves the weights under DeepSpeed."""
    this_run = f" (this configuration: stage {stage})" if stage is not None else ""
    return (
        f"flat_method={flat_method!r} cannot run under DeepSpeed{this_run}. "
        + " ".join(DEEPSPEED_STAGES.values())
        + " Use FSDP instead, under which every flat method is exact: fsdp='full_shard' with "
        "fsdp_config={'version': 2}, or `accelerate launch` with an FSDP config file (examples/accelerate/fsdp.yaml; docs: guides/distributed.md); or DDP. "
        "flat_method='saf' reads only the model's outputs and runs under DeepSpeed."
    )


def fsdp1_refusal(flat_method: str, version) -> str:
    return (
        f"flat_method={flat_method!r} works on FSDP2's sharded parameters, not on FSDP1's flattened ones "
        f"(FSDP version {version!r}): set fsdp_config={{'version': 2}} (the default of transformers 5), or "
        "fsdp_version: 2 in the accelerate config file."
    )


def sharded_scope_refusal(flat_method: str, scope: str | None, m: int | None) -> str | None:
    """Why `scope` / `m` cannot run under FSDP (None: they can)."""
    if parse_flat_method(flat_method)[0] == "esam":
        return (
            f"flat_method={flat_method!r} cannot run under FSDP: ESAM perturbs each micro-batch and process on its own "
            "(its data selection ranks one micro-batch's samples), and under FSDP every process must add the same "
            "perturbation to its part of each parameter. Use ESAM with DDP, or under FSDP flat_method='sam', 'gsam' "
            "or 'looksam' (one perturbation per optimizer step)."
        )
    if scope != "micro" and m is None:
        return None
    setting = f"sam_scope={scope!r}" if scope == "micro" else f"sam_m={m!r}"
    return (
        f"{setting} is not allowed with flat_method={flat_method!r} under FSDP: FSDP splits every parameter "
        "across the processes, so all of them must add the same perturbation e to their parts, and a "
        "perturbation per process or per micro-batch (m-SAM) does not exist. Under FSDP the perturbation is "
        "n-SAM's, one per optimizer step from the gradient of the whole step: set sam_scope='step' or leave it "
        "None, and sam_m=None; for m-SAM, train with DDP."
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def accepted_flat_methods() -> list[str]:
    """Every value `flat_method` accepts, in the order the docs list them (docs/methods.md)."""
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


def read_settings(flat_method: str) -> set[str]:
    """The flat arguments that a run of `flat_method` reads: `FLAT_SETTINGS` of its parts, and
    ``average_on_cpu`` for an averaging method (``flat_method`` itself is not included)."""
    read = set()
    for part in parse_flat_method(flat_method):
        if part is not None:
            read |= set(FLAT_SETTINGS[part]) | ({"average_on_cpu"} if part in AVERAGING_METHODS else set())
    return read


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(args, name, ok, allowed):
    value = getattr(args, name)
    if not ok(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}.")


@dataclass
class FlatArgumentsMixin:
    """The arguments of the flat-minima methods, to put before a `TrainingArguments` class.

    Only useful combined with a `transformers.TrainingArguments` (sub)class, mixin first:
    `FlatTrainingArguments` and `FlatSeq2SeqTrainingArguments` are made this way, and
    `flat_arguments_class(MyArgs)` makes (and caches) the same for any subclass `MyArgs`:

        >>> @dataclass
        ... class MyFlatArgs(FlatArgumentsMixin, MyArgs):
        ...     pass

    `flat_perturbation` and `flat_averaging` are read-only properties computed from the current
    `flat_method`. `check_flat_arguments()` validates the flat fields; `__post_init__` runs it
    before the base class's own `__post_init__`.
    """

    flat_method: str = field(
        default="none",
        metadata={
            "help": "Flat-minima method: 'none' (the plain Trainer), a perturbation method ('sam', 'asam', "
            "'avg_sam', 'gsam', 'looksam', 'esam', 'saf', 'mesa'), "
            "an averaging method ('swa', 'ema', 'lawa'), or '<perturbation>+<averaging>' ('wasam' = 'sam+swa'). "
            "Accepted: " + ", ".join(accepted_flat_methods()) + "."
        },
    )
    sam_rho: float = field(
        default=0.05,
        metadata={
            "help": "Radius rho of the SAM / ASAM / average-SAM perturbation (> 0). ASAM's authors use 0.5-1.0; "
            "average SAM's (random directions) 0.5 and 1.0."
        },
    )
    asam_eta: float = field(
        default=0.01,
        metadata={"help": "ASAM's eta (>= 0): the scale of a weight is |w| + eta."},
    )
    sam_m: int | None = field(
        default=None,
        metadata={
            "help": "SAM / ASAM / average SAM: samples per perturbation (m-sharpness). None: one perturbation per "
            "per-device micro-batch; an m that divides per_device_train_batch_size cuts each micro-batch into "
            "chunks of m samples, each perturbed with its own gradient (costs one more pass pair per chunk)."
        },
    )
    sam_scope: str | None = field(
        default=None,
        metadata={
            "help": "SAM / ASAM / average SAM: 'micro' (one perturbation per micro-batch and process, or per "
            "sam_m samples) or 'step' (n-SAM: one perturbation per optimizer step, from the gradient of the whole "
            "step over every micro-batch and process; keeps the step's inputs until its last micro-batch). "
            "None: 'micro', or 'step' under FSDP, where every process must add the same perturbation."
        },
    )
    sam_start: float = field(
        default=0.0,
        metadata={
            "help": "SAM / ASAM / average SAM: perturb only from optimizer step max(1, ceil(sam_start * T)) on, "
            "in [0, 1) (late-phase SAM: Zhou et al., ICLR 2025). Earlier steps are plain steps."
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={
            "help": "SAM / ASAM / average SAM: perturb every sam_interval-th optimizer step from the first "
            "perturbed one (>= 1); the steps between are plain steps."
        },
    )

    gsam_alpha: float = field(
        default=0.4,
        metadata={"help": "GSAM: alpha (>= 0), the weight of -g_perp in the descent direction g_p - alpha * g_perp."},
    )
    gsam_rho_min: float | None = field(
        default=None,
        metadata={
            "help": "GSAM: rho follows the learning rate from sam_rho (at its largest) down to gsam_rho_min (at its "
            "smallest), in [0, sam_rho]. None: constant rho = sam_rho."
        },
    )
    looksam_k: int = field(
        default=5,
        metadata={"help": "LookSAM: a SAM step on the first of every looksam_k optimizer steps (>= 1), one pass between."},
    )
    looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "LookSAM: alpha (>= 0), the weight of the reused component g_v on the one-pass steps."},
    )
    esam_beta: float = field(
        default=0.6,
        metadata={"help": "ESAM: each trainable tensor is perturbed with probability esam_beta, in (0, 1] (SWP)."},
    )
    esam_gamma: float = field(
        default=0.5,
        metadata={
            "help": "ESAM: pass 2 uses the esam_gamma fraction of each micro-batch whose loss rose most, in (0, 1] (SDS)."
        },
    )

    average_start: float = field(
        default=0.75,
        metadata={"help": "Averaging (swa, ema, lawa) begins after this fraction of the optimizer steps, in [0, 1)."},
    )
    average_freq: int = field(
        default=0,
        metadata={"help": "SWA / LAWA snapshot every this many optimizer steps; 0 = once at the end of every epoch."},
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
    lawa_k: int = field(
        default=5,
        metadata={"help": "LAWA: the average is that of the latest lawa_k snapshots (>= 1), taken at SWA's moments."},
    )
    swa_lr: float | None = field(
        default=None,
        metadata={
            "help": "SWA's learning-rate schedule: from averaging's first step the rate anneals to swa_lr (> 0) and "
            "stays there (torch SWALR), or cycles down to it (swa_cycle_steps). None: the Trainer's own schedule "
            "throughout. Any averaging method."
        },
    )
    swa_anneal_steps: int = field(
        default=0, metadata={"help": "SWA schedule: optimizer steps of the anneal to swa_lr (>= 0; 0: at once)."}
    )
    swa_anneal_strategy: str = field(default="cos", metadata={"help": "SWA schedule: the anneal's shape, 'cos' or 'linear'."})
    swa_cycle_steps: int = field(
        default=0,
        metadata={
            "help": "SWA schedule: > 0 for the cyclical schedule of Izmailov et al. (eq. 2): within each cycle of this "
            "many optimizer steps the rate falls linearly from the rate at averaging's start to swa_lr, and a "
            "snapshot is taken at each cycle's end. Needs swa_lr; average_freq must be 0 or the same."
        },
    )
    average_bn_batches: int | None = field(
        default=None,
        metadata={
            "help": "BatchNorm statistics of the averaged weights are recomputed from this many training batches "
            "(>= 1). Default: one pass over the whole training set, as SWA's authors do; required for a model with "
            "BatchNorm trained on an IterableDataset, whose stream may never end."
        },
    )

    @property
    def flat_perturbation(self) -> str | None:
        """The perturbation method `flat_method` names ('sam', 'asam', 'saf', 'mesa'), or None."""
        return parse_flat_method(self.flat_method)[0]

    @property
    def flat_averaging(self) -> str | None:
        """The averaging method `flat_method` names ('swa', 'ema'), or None."""
        return parse_flat_method(self.flat_method)[1]

    def __post_init__(self):
        self.check_flat_arguments()
        super().__post_init__()

    def check_flat_arguments(self):
        """Raise a `ValueError` on any bad flat-minima value, or a setup the chosen method cannot run.

        Runs at construction and can run again on a constructed instance, e.g. after a
        hyperparameter trial has set `flat_method` or `sam_rho`.
        """
        parse_flat_method(self.flat_method)
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
        _check(self, "average_bn_batches", lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1")
        self._check_where_and_when()
        self._check_gsam_looksam_esam()
        self._check_swa_schedule()
        if self.flat_perturbation in TWO_PASS_METHODS:
            self._refuse_unsupported_two_pass_setups()
        if self.deepspeed and (self.flat_perturbation in (*TWO_PASS_METHODS, "mesa") or self.flat_averaging):
            raise ValueError(deepspeed_refusal(self.flat_method, deepspeed_stage(self.deepspeed)))
        if self.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
            self._check_fsdp()
        self._warn_unread_settings()
        if self.flat_averaging is not None and self.load_best_model_at_end:
            raise ValueError(
                f"load_best_model_at_end=True is not supported with flat_method={self.flat_method!r}: at the "
                "end of training the model holds the averaged weights, which no checkpoint holds. To keep "
                "the best checkpoint, use save_strategy='best' with metric_for_best_model='eval_avg_loss' "
                "(or another eval_avg_ metric), and set load_best_model_at_end=False."
            )

    def _warn_unread_settings(self):
        """Warn about each flat argument set away from its default that `flat_method` does not read
        (``sam_rho`` with ``flat_method='saf'``): nothing is silently ignored."""
        read = read_settings(self.flat_method)
        for f in dataclasses.fields(FlatArgumentsMixin):
            value = getattr(self, f.name)
            if f.name == "flat_method" or f.name in read or value == f.default:
                continue
            readers = [m for m in (*PERTURBATION_METHODS, *AVERAGING_METHODS) if f.name in read_settings(m)]
            warnings.warn(
                f"{f.name}={value!r} has no effect with flat_method={self.flat_method!r}: only "
                f"{', '.join(readers)} (alone or combined) {'reads' if len(readers) == 1 else 'read'} it.",
                stacklevel=3,
            )

    def _check_swa_schedule(self):
        """`swa_lr`, `swa_anneal_steps`, `swa_anneal_strategy`, `swa_cycle_steps`, `lawa_k`."""
        _check(self, "swa_lr", lambda v: v is None or (_is_number(v) and v > 0), "None or a finite number > 0")
        _check(self, "swa_anneal_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _check(self, "swa_anneal_strategy", lambda v: v in ("cos", "linear"), "'cos' or 'linear'")
        _check(self, "swa_cycle_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _check(self, "lawa_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        changed = [f"{k}={getattr(self, k)!r}" for k, v in SWA_SCHEDULE_SETTINGS.items() if getattr(self, k) != v]
        if changed and self.swa_lr is None:
            raise ValueError(
                f"{', '.join(changed)} needs swa_lr: SWA's schedule runs from averaging's start towards swa_lr. "
                "Set swa_lr, or leave these at their defaults."
            )
        if self.swa_lr is not None and self.flat_averaging is None:
            raise ValueError(
                f"swa_lr={self.swa_lr!r} is not allowed with flat_method={self.flat_method!r}: SWA's schedule starts "
                "with averaging, which this method does not do. Use an averaging method ('swa', 'ema', 'lawa', "
                "'<perturbation>+swa', ...), or leave swa_lr=None."
            )
        if self.swa_lr is not None and self.lr_scheduler_type == "reduce_lr_on_plateau":
            raise ValueError(
                f"swa_lr={self.swa_lr!r} is not allowed with lr_scheduler_type='reduce_lr_on_plateau': SWA's schedule "
                "sets the rate at every optimizer step from averaging's start on, and ReduceLROnPlateau steps only on "
                "evaluation metrics. Use a step-wise lr_scheduler_type (e.g. 'linear', 'cosine', 'constant') with "
                "swa_lr, or leave swa_lr=None."
            )
        if self.swa_cycle_steps:
            if self.swa_anneal_steps:
                raise ValueError(
                    f"swa_anneal_steps={self.swa_anneal_steps!r} is not allowed with swa_cycle_steps="
                    f"{self.swa_cycle_steps!r}: the cyclical schedule has no anneal. Set one of them to 0."
                )
            if self.flat_averaging in ("swa", "lawa") and self.average_freq not in (0, self.swa_cycle_steps):
                raise ValueError(
                    f"average_freq={self.average_freq!r} is not allowed with swa_cycle_steps={self.swa_cycle_steps!r}: "
                    f"snapshots are taken at the end of each cycle. Set average_freq to 0 or {self.swa_cycle_steps}."
                )

    def _check_gsam_looksam_esam(self):
        _check(self, "gsam_alpha", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
        _check(self, "gsam_rho_min", lambda v: v is None or (_is_number(v) and 0 <= v <= self.sam_rho),
               f"None or a number in [0, sam_rho={self.sam_rho!r}]")
        if self.flat_perturbation == "gsam" and self.gsam_rho_min is not None and \
                self.lr_scheduler_type == "reduce_lr_on_plateau":
            raise ValueError(
                f"gsam_rho_min={self.gsam_rho_min!r} is not allowed with lr_scheduler_type='reduce_lr_on_plateau': "
                "rho follows the learning rate between its smallest and largest value over the run, which a "
                "schedule driven by evaluation metrics does not know in advance. Use a step-wise lr_scheduler_type, "
                "or gsam_rho_min=None (constant rho)."
            )
        _check(self, "looksam_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check(self, "looksam_alpha", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
        _check(self, "esam_beta", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        _check(self, "esam_gamma", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        method = self.flat_perturbation
        if method == "looksam":
            for name, value, why in [
                ("sam_scope", self.sam_scope if self.sam_scope == "micro" else None, "its SAM steps take the whole "
                 "step's gradient, so that g_v is the same on every process: leave sam_scope None or 'step'"),
                ("sam_m", self.sam_m, "its SAM steps take the whole step's gradient: leave sam_m None"),
                ("sam_interval", self.sam_interval if self.sam_interval != 1 else None,
                 "its SAM steps come every looksam_k steps: set looksam_k instead"),
            ]:
                if value is not None:
                    raise ValueError(f"{name}={value!r} is not allowed with flat_method={self.flat_method!r}: {why}.")
        if method == "esam":
            for name, value in [("sam_scope", self.sam_scope if self.sam_scope == "step" else None), ("sam_m", self.sam_m)]:
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} is not allowed with flat_method={self.flat_method!r}: ESAM perturbs each "
                        "micro-batch on its own (its data selection ranks one micro-batch's samples). Leave sam_scope "
                        "None or 'micro' and sam_m None, or use flat_method='sam' for n-SAM or m-SAM."
                    )

    def _check_where_and_when(self):
        """`sam_m`, `sam_scope`, `sam_start`, `sam_interval`: their values, and a warning when they are
        set for a method that does not read them."""
        _check(self, "sam_m", lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1")
        _check(self, "sam_scope", lambda v: v in (None, "micro", "step"), "None, 'micro' or 'step'")
        _check(self, "sam_start", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "sam_interval", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        if self.sam_m is not None:
            if self.sam_scope == "step":
                raise ValueError(
                    f"sam_m={self.sam_m!r} is not allowed with sam_scope='step': that scope takes one perturbation "
                    "per optimizer step, from the whole step's gradient. Set sam_m=None, or use sam_scope='micro'."
                )
            batch = self.per_device_train_batch_size
            if _is_int(batch) and batch % self.sam_m:
                raise ValueError(
                    f"sam_m={self.sam_m!r} is not allowed with per_device_train_batch_size={batch}: it must divide "
                    f"the per-device batch size (one perturbation per sam_m samples). Divisors of {batch}: "
                    + ", ".join(str(d) for d in range(1, batch + 1) if batch % d == 0) + "."
                )

    def _check_fsdp(self):
        """Under FSDP: version 2 only; two-pass methods perturb once per step (see `sharded_scope_refusal`)."""
        if self.flat_method == "none" or self.flat_perturbation == "saf" and not self.flat_averaging:
            return  # SAF reads only the model's outputs: any FSDP version
        config = self.fsdp_config if isinstance(self.fsdp_config, dict) else {}
        version = config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", 2)))
        if str(version) != "2":
            raise ValueError(fsdp1_refusal(self.flat_method, version))
        if self.flat_perturbation in TWO_PASS_METHODS:
            refusal = sharded_scope_refusal(self.flat_method, self.sam_scope, self.sam_m)
            if refusal:
                raise ValueError(refusal)

    def _refuse_unsupported_two_pass_setups(self):
        method = self.flat_method
        optim = str(getattr(self.optim, "value", self.optim))
        if optim in _STEP_IN_BACKWARD_OPTIMIZERS or "layerwise" in optim:
            raise ValueError(
                f"optim={optim!r} updates the weights inside backward(), so flat_method={method!r} would "
                "step at the perturbed weights. Use an optimizer that steps once per optimizer step, such "
                "as optim='adamw_torch' or 'sgd'."
            )


@dataclass
class FlatTrainingArguments(FlatArgumentsMixin, TrainingArguments):
    """`transformers.TrainingArguments` with the arguments of the flat-minima methods.

    Example:
        >>> args = FlatTrainingArguments("out", flat_method="asam", sam_rho=0.5)

    For a `TrainingArguments` subclass, use `FlatSeq2SeqTrainingArguments` or
    `flat_arguments_class(MyArgs)`. `FlatTrainer` also accepts a plain `TrainingArguments` or any
    subclass of it, keeps every value, and trains with `flat_method='none'`.
    """


@dataclass
class FlatSeq2SeqTrainingArguments(FlatArgumentsMixin, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` with the arguments of the flat-minima methods.

    Example:
        >>> args = FlatSeq2SeqTrainingArguments("out", flat_method="sam", predict_with_generate=True)
    """


#: `TrainingArguments` class -> the class with the flat fields added (`flat_arguments_class`).
_FLAT_CLASSES: dict[type, type] = {
    TrainingArguments: FlatTrainingArguments,
    Seq2SeqTrainingArguments: FlatSeq2SeqTrainingArguments,
}


def flat_arguments_class(cls: type) -> type:
    """The dataclass with the flat-minima fields and every field of the `TrainingArguments` subclass `cls`.

    `cls` itself when it already has them; `FlatTrainingArguments` for `TrainingArguments` and
    `FlatSeq2SeqTrainingArguments` for `Seq2SeqTrainingArguments`; otherwise a class made once and
    cached, `Flat<cls.__name__>(FlatArgumentsMixin, cls)`. Its instances pickle (`torch.save`) as
    long as `cls` does: they are rebuilt through this function from `cls`.

    Example:
        >>> args = flat_arguments_class(MyArgs)("out", my_field=3, flat_method="sam")
        >>> parser = HfArgumentParser(flat_arguments_class(MyArgs))  # both flag sets
    """
    if not (isinstance(cls, type) and issubclass(cls, TrainingArguments)):
        raise TypeError(f"flat_arguments_class() takes a TrainingArguments subclass, not {cls!r}.")
    if issubclass(cls, FlatArgumentsMixin):
        return cls
    if cls not in _FLAT_CLASSES:
        _FLAT_CLASSES[cls] = _make_flat_class(cls)
    return _FLAT_CLASSES[cls]


def _make_flat_class(cls: type) -> type:
    def __reduce__(self):
        # The made class is not a module attribute, so pickle cannot find it by name: rebuild it
        # from `cls`. A subclass of it the user defined pickles by name, as usual.
        state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__  # 3.10: no __getstate__
        if type(self) is flat_cls:
            return _new_flat_arguments, (cls,), state
        return copyreg.__newobj__, (type(self),), state

    namespace = {
        "__module__": __name__,
        "__doc__": f"`{cls.__module__}.{cls.__qualname__}` with the arguments of the flat-minima methods.",
        "__reduce__": __reduce__,
    }
    flat_cls = dataclass(type(f"Flat{cls.__name__}", (FlatArgumentsMixin, cls), namespace))
    return flat_cls


def _new_flat_arguments(cls: type):
    """An empty instance of `flat_arguments_class(cls)`, which unpickling then fills (see `_make_flat_class`)."""
    flat_cls = flat_arguments_class(cls)
    return flat_cls.__new__(flat_cls)
