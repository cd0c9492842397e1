"""What hf-flat knows about the `Trainer` subclasses it runs on top of (TRL's trainers,
`Seq2SeqTrainer`, a user's own): which cannot be wrapped, and where they keep their own metrics.

Nothing here imports TRL: classes are recognised by name along their MRO, so that hf-flat works
without TRL installed and with every TRL version that has these trainers.
"""

import contextlib
import copy
import inspect

#: Trainer subclasses whose training step cannot be wrapped exactly, by class name -> why.
#: (A two-pass method runs the base trainer's `training_step` once per pass, and the trajectory
#: and averaging methods read the weights between the Trainer's optimizer steps.)
_ON_POLICY = (
    "generates completions inside its training step (its `_prepare_inputs` generates and buffers them, "
    "and a counter in `training_step` decides which buffered micro-batch comes next), so a second pass over the "
    "same micro-batch would generate again or train on the next one"
)
REFUSED_BASES = {
    "GRPOTrainer": _ON_POLICY,
    "AsyncGRPOTrainer": _ON_POLICY,
    "RLOOTrainer": _ON_POLICY,
    "OnlineDPOTrainer": _ON_POLICY,
    "NashMDTrainer": _ON_POLICY,
    "XPOTrainer": _ON_POLICY,
    "GKDTrainer": _ON_POLICY,
    "GOLDTrainer": _ON_POLICY,
    "DistillationTrainer": _ON_POLICY,
    "AsyncDistillationTrainer": _ON_POLICY,
    "SDPOTrainer": _ON_POLICY,
    "PPOTrainer": "runs its own training loop and steps the optimizer itself",
}

#: Trainers whose batches are not inputs of one model forward whose per-token or per-sample
#: distribution the loss trains (preference pairs against a reference model): SAF and MESA are
#: refused on them.
PREFERENCE_TRAINERS = ("DPOTrainer", "KTOTrainer", "ORPOTrainer", "CPOTrainer", "BCOTrainer", "RewardTrainer")

#: Attributes in which Trainer subclasses keep running metrics that their `compute_loss` updates
#: (TRL: ``_metrics[mode][name]`` lists, averaged when logged; ``_total_train_tokens``; older TRL
#: trainers' ``_stored_metrics``). A pass that is not the step's own (SAM's pass 2, ESAM's
#: selection pass) leaves them as it found them (`metrics_unchanged`).
METRIC_STATE = ("_metrics", "_total_train_tokens", "_stored_metrics")


def refusal(cls: type) -> str | None:
    """Why a flat trainer cannot run on top of `cls` (None: it can)."""
    for base in cls.__mro__:
        if base.__name__ in REFUSED_BASES:
            return (
                f"{base.__name__} {REFUSED_BASES[base.__name__]}: hf-flat's methods cannot run on top of it. For weight "
                "averaging with it, add hf_flat.WeightAveraging as a callback (callbacks=[WeightAveraging('ema')])."
            )
        if "_inner_training_loop" in vars(base) and base.__module__.split(".")[0] not in ("transformers", "hf_flat"):
            return (
                f"{base.__qualname__} replaces the Trainer's training loop (_inner_training_loop), where hf-flat's "
                "methods run: hf-flat's methods cannot run on top of it."
            )
    return None


def is_a(trainer, names) -> str | None:
    """The first class name of `names` found along `trainer`'s MRO, or None."""
    for base in type(trainer).__mro__:
        if base.__name__ in names:
            return base.__name__
    return None


@contextlib.contextmanager
def metrics_unchanged(trainer):
    """Within this block, the trainer's own running metrics (`METRIC_STATE`) may change; afterwards
    they are what they were before it."""
    saved = {name: copy.deepcopy(getattr(trainer, name)) for name in METRIC_STATE if hasattr(trainer, name)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


def new_eval_metrics(before: dict, after: dict) -> dict[str, float]:
    """The mean of each evaluation metric a TRL-style trainer recorded between two copies of its
    ``_metrics["eval"]`` (name -> list of values): the values appended in between, or, for a
    metric whose list was replaced (TRL's ``num_tokens``), the new list."""
    means = {}
    for name, values in after.items():
        old = before.get(name, [])
        new = values[len(old):] if len(values) > len(old) and values[: len(old)] == old else values
        if new:
            means[name] = sum(new) / len(new)
    return means


def parameter_named(signature: inspect.Signature, name: str) -> inspect.Parameter | None:
    """The parameter `name` of `signature` that a caller can pass by name (not ``*args`` / ``**kwargs``)."""
    parameter = signature.parameters.get(name)
    if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return None
    return parameter
