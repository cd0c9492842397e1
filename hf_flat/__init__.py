"""hf-flat: flat-minima optimization (SAM, ASAM, SAF, MESA, SWA, WASAM, EMA, ...) for the Hugging Face
Trainer and its subclasses (TRL's `SFTTrainer` and `DPOTrainer`, `Seq2SeqTrainer`, your own)."""

from .args import (
    FlatArgumentsMixin,
    FlatSeq2SeqTrainingArguments,
    FlatTrainingArguments,
    accepted_flat_methods,
    flat_arguments_class,
    parse_flat_method,
)
from .averaging import WeightAveraging
from .trainer import FlatSeq2SeqTrainer, FlatTrainer, FlatTrainerMixin, flat_trainer_class

#: So that `from hf_flat import TrainingArguments` works as a drop-in in user scripts.
TrainingArguments = FlatTrainingArguments

__version__ = "0.1.0"

#: Made on first use from TRL's classes (`hf_flat.trl_trainers`), which needs ``pip install trl``.
_TRL_NAMES = ("FlatSFTTrainer", "FlatSFTConfig", "FlatDPOTrainer", "FlatDPOConfig")


def __getattr__(name):
    if name in _TRL_NAMES:
        from . import trl_trainers

        return getattr(trl_trainers, name)
    raise AttributeError(f"module 'hf_flat' has no attribute {name!r}")


__all__ = [
    "FlatArgumentsMixin",
    "FlatSeq2SeqTrainer",
    "FlatSeq2SeqTrainingArguments",
    "FlatTrainer",
    "FlatTrainerMixin",
    "FlatTrainingArguments",
    "TrainingArguments",
    "WeightAveraging",
    "accepted_flat_methods",
    "flat_arguments_class",
    "flat_trainer_class",
    "parse_flat_method",
    "__version__",
    *_TRL_NAMES,
]
