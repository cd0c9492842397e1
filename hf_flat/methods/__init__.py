"""Flat-minima methods, one module each. `build_perturbation` maps `flat_method` to an object."""

from .sam import ASAM, SAM, asam_perturbation, sam_perturbation
from .two_pass import TwoPassMethod

__all__ = ["SAM", "ASAM", "TwoPassMethod", "sam_perturbation", "asam_perturbation", "build_perturbation"]

#: name in `flat_method` -> factory taking the `FlatTrainingArguments`.
PERTURBATIONS = {
    "sam": lambda args: SAM(rho=args.sam_rho),
    "asam": lambda args: ASAM(rho=args.sam_rho, eta=args.asam_eta),
}


def build_perturbation(args) -> TwoPassMethod | None:
    """The perturbation method `args.flat_method` asks for, or `None`."""
    name = args.flat_perturbation
    return None if name is None else PERTURBATIONS[name](args)
