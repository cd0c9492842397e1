"""SAM and ASAM: the perturbation ``e`` of one micro-batch.

SAM (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv 2010.01412, eq. 2; Kaddour et al. 2022, arXiv 2202.00661,
Algorithm 1 line 5):

    e = rho * g / ||g||_2

ASAM (Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
of Deep Neural Networks", ICML 2021, arXiv 2102.11600, eq. 11 with T_w = |w| + eta, as in the official
SamsungLabs code):

    e = rho * T^2 g / ||T g||_2,   T = |w| + eta for parameters whose name contains "weight",
                                   T = 1 for the others (biases, ...)

The norms run over all perturbed parameters together (under FSDP2 over all processes' rows,
`TwoPassMethod.norm`; ``T`` is elementwise, so each process computes it for its own rows). Both functions compute ``e`` in place in
the gradient tensors (no extra memory), on the device: a GradScaler overflow gives a non-finite
``e`` and so a non-finite pass-2 gradient, and the GradScaler skips the step (`hf_flat.methods.two_pass`).
Because ``e`` is scale-invariant in ``g``, gradients still multiplied by an fp16 loss scale give
the same ``e``.
"""

import torch

from .two_pass import TwoPassMethod, global_norm

#: Added to the norm, as in the reference implementations, so a zero gradient gives e = 0.
EPS = 1e-12


def sam_perturbation(grads: list[torch.Tensor], rho: float, norm_of=global_norm) -> list[torch.Tensor]:
    """e = rho * g / ||g||, in place in `grads` (`norm_of`: the norm of tensors taken together, a
    tensor on the device: nothing is read on the host; a non-finite g gives a non-finite e)."""
    if grads:  # torch's foreach ops refuse empty lists
        torch._foreach_mul_(grads, rho / (norm_of(grads) + EPS))
    return grads


def asam_perturbation(
    names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, eta: float, norm_of=global_norm
) -> list[torch.Tensor]:
    """e = rho * T^2 g / ||T g|| with T = |w| + eta on parameters named '*weight*', in place in `grads`."""
    weights = [p.detach() for name, p in zip(names, params) if "weight" in name]
    weight_grads = [g for name, g in zip(names, grads) if "weight" in name]
    # T, freed on return; None when no perturbed parameter is a "weight" (biases only, PEFT IA3 vectors...)
    t = torch._foreach_abs(weights) if weights else None
    if t is not None:
        torch._foreach_add_(t, eta)
        torch._foreach_mul_(weight_grads, t)  # g <- T g
    norm = norm_of(grads)  # ||T g||
    if t is not None:
        torch._foreach_mul_(weight_grads, t)  # g <- T^2 g
    if grads:
        torch._foreach_mul_(grads, rho / (norm + EPS))
    return grads


class SAM(TwoPassMethod):
    """Sharpness-Aware Minimization: ``e = rho * g / ||g||``. Where and when it perturbs (per
    micro-batch, per ``m`` samples or per optimizer step; on every step or on a schedule) is
    `TwoPassMethod`'s."""

    def __init__(self, rho: float = 0.05, **schedule_and_scope):
        super().__init__(**schedule_and_scope)
        self.rho = rho

    def perturbation(self, names, params, grads):
        return sam_perturbation(grads, self.rho, self.norm)


class ASAM(TwoPassMethod):
    """Adaptive SAM: the radius scales with each weight's magnitude."""

    def __init__(self, rho: float = 0.5, eta: float = 0.01, **schedule_and_scope):
        super().__init__(**schedule_and_scope)
        self.rho = rho
        self.eta = eta

    def perturbation(self, names, params, grads):
        return asam_perturbation(names, params, grads, self.rho, self.eta, self.norm)
