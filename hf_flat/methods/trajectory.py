"""The trajectory loss of SAF and MESA (seed 003, eq. 9 and 13), as the authors' code computes it:

    L_tra = lambda * tau^2 * 1/|B| * sum_{i in B with a target} KL( softmax(y_i / tau) || softmax(f(x_i) / tau) )

``y_i`` is the target (SAF: the logits of the same sample some epochs ago; MESA: the EMA model's
logits). ``tau^2`` keeps the gradient's scale independent of the temperature, as in knowledge
distillation. Samples without a target contribute nothing, but still count in ``|B|``.

Per-token outputs (``logits`` of shape ``(B, T, C)``) average the KL over the batch's valid positions:
those whose label is not ``-100`` (for a causal LM, the label of the next position), or, without
labels, those the attention mask keeps. Regression heads (``C = 1``) have no distribution to
compare: their term is ``lambda * (f(x) - y)^2``, averaged like the KL.
"""

import torch
import torch.nn.functional as F


def kl_per_row(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(logits / tau)) over the last dimension, in float32."""
    log_p_target = F.log_softmax(target_logits.float() / tau, dim=-1)
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    return (log_p_target.exp() * (log_p_target - log_p)).sum(-1)


def trajectory_loss(logits, target_logits, lam, tau, has_target=None, valid=None) -> torch.Tensor:
    """The trajectory term for a batch.

    Args:
        logits: the model's logits, ``(B, C)`` or ``(B, T, C)``.
        target_logits: the targets, same shape (rows without a target may hold anything).
        lam, tau: lambda and the temperature.
        has_target: ``(B,)`` bool, which samples have a target (default: all; per-sample logits only).
        valid: ``(B, T)`` bool, for per-token logits: the positions to compare (default: all).
    """
    if logits.shape[-1] == 1:  # regression head: squared error to the target
        per_row = (logits.float() - target_logits.float()).pow(2).squeeze(-1)
        scale = lam
    else:
        per_row = kl_per_row(target_logits, logits, tau)
        scale = lam * tau**2
    if per_row.dim() == 2:  # per token: mean over the valid positions of the batch
        mask = torch.ones_like(per_row, dtype=torch.bool) if valid is None else valid
        return scale * (per_row * mask).sum() / mask.sum().clamp(min=1)
    if has_target is not None:
        per_row = per_row * has_target
    return scale * per_row.sum() / per_row.shape[0]


def valid_positions(inputs: dict, logits: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """Which positions of per-token `logits` count: non-ignored labels (shifted by one for a causal
    LM, whose position t predicts label t + 1), else the attention mask, else all."""
    labels = inputs.get("labels")
    if labels is not None and labels.dim() == 2:
        if causal:
            valid = torch.zeros_like(labels, dtype=torch.bool)
            valid[:, :-1] = labels[:, 1:] != -100
        else:
            valid = labels != -100
        return valid[:, : logits.shape[1]]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.shape[:2] == logits.shape[:2]:
        return mask.bool()
    return None
