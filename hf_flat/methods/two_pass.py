"""The mechanics every two-pass method (SAM, ASAM, ...) shares, in one place.

One micro-batch of a two-pass method, inside the Trainer's gradient accumulation:

1. Stash the gradients accumulated by the earlier micro-batches of this optimizer step.
2. Pass 1: the gradient ``g`` of this micro-batch's loss at ``w``, scaled exactly as the Trainer
   scales it (gradient accumulation, loss scaling), under ``no_sync`` so no all-reduce happens:
   each process perturbs with its own local gradient (m-sharpness, m = per-device batch size).
3. ``e = perturbation(g)``; ``w <- w + e``. Only parameters that require grad and received a
   gradient are perturbed.
4. Put the stashed gradients back; pass 2 at ``w + e`` adds its gradient to them and is
   synchronised exactly as the Trainer arranged (all-reduce on the last micro-batch).
   BatchNorm running statistics are frozen: pass 1 has already updated them.
5. Restore ``w`` bit for bit from a copy.

If ``g`` is not finite (an fp16 loss-scale overflow) there is no perturbation; ``g`` itself goes
into the accumulated gradient, so the optimizer step sees the non-finite values and the
GradScaler skips it on every process, exactly as it would have without the method.
"""

import contextlib
import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but leave their running ones alone."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of all `tensors` taken together (inf or nan if any element is).

    Gradients still multiplied by a large fp16 loss scale can overflow the sum of squares while
    every element is finite; the norm is then recomputed on the tensors divided by their largest
    magnitude.
    """
    if not tensors:
        return 0.0
    norm = _norm_of_norms(torch._foreach_norm(tensors), tensors[0].device).item()
    if math.isinf(norm):
        largest = max(n.item() for n in torch._foreach_norm(tensors, math.inf))
        if math.isfinite(largest):
            scaled = torch._foreach_div(tensors, largest)
            norm = largest * _norm_of_norms(torch._foreach_norm(scaled), tensors[0].device).item()
    return norm


def _norm_of_norms(norms, device):
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]))


class TwoPassMethod(ABC):
    """Base class of the methods that take the gradient at a perturbed point ``w + e``.

    A subclass only says what ``e`` is, in `perturbation`.
    """

    @abstractmethod
    def perturbation(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Return ``e`` for each parameter, computed in place in `grads`.

        Return `None` (with `grads` left non-finite) if the gradient is not finite.
        """

    def step(self, trainer, model: nn.Module, inputs: dict, num_items_in_batch=None):
        """Run both passes on one micro-batch; return ``(L(w), L(w + e))``, each detached and scaled
        for gradient accumulation exactly as the Trainer reports its loss."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None

        with trainer.accelerator.no_sync(model):
            loss = trainer.forward_backward(model, inputs, num_items_in_batch)

        active = [i for i, p in enumerate(params) if p.grad is not None]
        active_params = [params[i] for i in active]
        grads = [params[i].grad for i in active]
        e = self.perturbation([named[i][0] for i in active], active_params, grads)

        saved = None
        if e:  # None: g is not finite; []: no parameter received a gradient
            with torch.no_grad():
                saved = [p.detach().clone() for p in active_params]  # to restore w exactly
                torch._foreach_add_(active_params, e)
        # Give the accumulated gradients back (pass 2 adds to them); this frees g, which held e.
        for p, acc in zip(params, accumulated):
            if e is None and p.grad is not None:
                # g is not finite: keep it, so the optimizer step (and the GradScaler) sees it
                p.grad = p.grad if acc is None else acc.add_(p.grad)
            else:
                p.grad = acc
        del e, grads

        try:
            with frozen_batchnorm_statistics(model):
                perturbed_loss = trainer.forward_backward(model, inputs, num_items_in_batch)
        finally:
            if saved is not None:
                with torch.no_grad():
                    torch._foreach_copy_(active_params, saved)
        return loss, perturbed_loss
