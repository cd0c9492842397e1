"""TRL's `SFTTrainer` and `DPOTrainer` with the flat-minima methods, and their configs with the flat
fields: ``hf_flat.FlatSFTTrainer`` is ``flat_trainer_class(trl.SFTTrainer)`` and
``hf_flat.FlatSFTConfig`` is ``flat_arguments_class(trl.SFTConfig)`` (the same for DPO).

    >>> from hf_flat import FlatSFTConfig, FlatSFTTrainer
    >>> args = FlatSFTConfig("out", flat_method="sam", sam_rho=0.05)
    >>> FlatSFTTrainer(model=model, args=args, train_dataset=train).train()
"""

try:
    import trl
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "hf_flat's TRL trainers (FlatSFTTrainer, FlatDPOTrainer, FlatSFTConfig, FlatDPOConfig) need TRL, which is not "
        "installed: pip install trl (hf-flat is tested with trl 1.0 to 1.16). Any other Trainer subclass works through "
        "hf_flat.flat_trainer_class(YourTrainer)."
    ) from error

from .args import flat_arguments_class
from .trainer import flat_trainer_class

FlatSFTTrainer = flat_trainer_class(trl.SFTTrainer)
FlatSFTConfig = flat_arguments_class(trl.SFTConfig)
FlatDPOTrainer = flat_trainer_class(trl.DPOTrainer)
FlatDPOConfig = flat_arguments_class(trl.DPOConfig)
