"""hf-flat: flat-minima optimization (SAM, ASAM, SAF, MESA, SWA, WASAM, EMA) for the Hugging Face Trainer."""

from .args import (
    FlatArgumentsMixin,
    FlatSeq2SeqTrainingArguments,
    FlatTrainingArguments,
    accepted_flat_methods,
    flat_arguments_class,
    parse_flat_method,
)
from .averaging import WeightAveraging
from .trainer import FlatTrainer

#: So that `from hf_flat import TrainingArguments` works as a drop-in in user scripts.
TrainingArguments = FlatTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "FlatArgumentsMixin",
    "FlatSeq2SeqTrainingArguments",
    "FlatTrainer",
    "FlatTrainingArguments",
    "TrainingArguments",
    "WeightAveraging",
    "accepted_flat_methods",
    "flat_arguments_class",
    "parse_flat_method",
    "__version__",
]
