"""Flat-minima methods, one module each. `build_perturbation` maps `flat_method` to an object."""

from .avg_sam import AverageSAM
from .esam import ESAM
from .gsam import GSAM
from .looksam import LookSAM
from .mesa import MESA
from .saf import SAF
from .sam import ASAM, SAM, asam_perturbation, sam_perturbation
from .two_pass import TwoPassMethod

__all__ = [
    "SAM", "ASAM", "AverageSAM", "GSAM", "LookSAM", "ESAM", "SAF", "MESA", "TwoPassMethod", "sam_perturbation", "asam_perturbation",
    "build_perturbation", "build_trajectory",
]

#: name in `flat_method` -> factory taking the `FlatTrainingArguments`.
#: name in `flat_method` -> factory taking the `FlatTrainingArguments` and `where_and_when`'s settings.
PERTURBATIONS = {
    "sam": lambda args, settings: SAM(rho=args.sam_rho, **settings),
    "asam": lambda args, settings: ASAM(rho=args.sam_rho, eta=args.asam_eta, **settings),
    "avg_sam": lambda args, settings: AverageSAM(rho=args.sam_rho, seed=args.seed, process_index=args.process_index,
                                                 **settings),
    "gsam": lambda args, settings: GSAM(rho=args.sam_rho, alpha=args.gsam_alpha, rho_min=args.gsam_rho_min, **settings),
    "looksam": lambda args, settings: LookSAM(rho=args.sam_rho, k=args.looksam_k, alpha=args.looksam_alpha,
                                              start=args.sam_start),
    "esam": lambda args, settings: ESAM(rho=args.sam_rho, beta=args.esam_beta, gamma=args.esam_gamma, seed=args.seed,
                                        process_index=args.process_index, **settings),
}


def where_and_when(args, sharded: bool = False) -> dict:
    """The scope and the schedule of a perturbation method (`TwoPassMethod`'s arguments).
    ``sam_scope=None`` is ``"micro"``, or ``"step"`` for a sharded (FSDP) model."""
    scope = args.sam_scope or ("step" if sharded else "micro")
    return dict(scope=scope, m=args.sam_m, start=args.sam_start, interval=args.sam_interval)


#: methods that add a trajectory loss instead of a second pass (Du et al., NeurIPS 2022, arXiv 2205.14083).
TRAJECTORIES = {
    "saf": lambda args: SAF(args.saf_lambda, args.saf_tau, args.saf_start_epoch, args.saf_past_epochs),
    "mesa": lambda args: MESA(args.mesa_lambda, args.mesa_tau, args.mesa_decay, args.mesa_start_epoch),
}


def build_perturbation(args, sharded: bool = False) -> TwoPassMethod | None:
    """The two-pass method `args.flat_method` asks for (for a model sharded with FSDP if
    `sharded`), or `None`."""
    factory = PERTURBATIONS.get(args.flat_perturbation)
    return None if factory is None else factory(args, where_and_when(args, sharded))


def build_trajectory(args) -> SAF | MESA | None:
    """The trajectory-loss method `args.flat_method` asks for, or `None`."""
    factory = TRAJECTORIES.get(args.flat_perturbation)
    return None if factory is None else factory(args)
