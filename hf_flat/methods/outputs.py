"""What the model returned inside a trainer's `compute_loss`, read without asking that
`compute_loss` for it.

A trainer's `compute_loss(return_outputs=True)` is not a reliable way to get the training
forward's outputs: TRL's trainers (1.15 and later) hand back logits recomputed by a second
forward pass without grad, and a user's override may return none at all. hf-flat instead records
the model's own return value with a forward hook (`captured_forward`) while the trainer's
`compute_loss` runs, so SAF, MESA and ESAM see the outputs that the loss was computed from, with
their gradient, whatever the trainer does with them.

**A fused LM head.** TRL's `SFTTrainer` and `DPOTrainer` (1.15 and later) call the model with
``fused_lm_head=True``: the forward computes each next-token label's log-probability tile by tile
and never builds the logits (`trl.trainer.utils.add_fused_lm_head`). Its output carries
``log_probs`` and ``label_mask``, not ``logits``. For the positions the loss counts
(``label_mask``: the same mask as the trainer's loss, so completion-only when the loss is), the
logits are then computed from the backbone's last hidden state, recorded by a second hook, through
the model's output embedding, scaled and soft-capped as the model's forward does
(`scaled_logits`): ``(positions, vocabulary)`` rows that carry the gradient.
"""

from collections.abc import Mapping

import torch
from torch import nn

from .trajectory import unwrapped


class CapturedForward:
    """What `captured_forward` recorded of the first call of the model in its block: ``outputs``
    (the model's return value), ``kwargs`` (the keyword arguments it got) and ``hidden`` (the
    backbone's last hidden state in that call, or None)."""

    def __init__(self):
        self.outputs = self.kwargs = self.hidden = None
        self._inside = False

    @property
    def called(self) -> bool:
        return self.outputs is not None

    @property
    def fused(self) -> bool:
        """Whether the outputs come from a fused LM head: per-token log-probabilities, no logits."""
        outputs = self.outputs
        return (
            isinstance(outputs, Mapping)
            and outputs.get("logits") is None
            and outputs.get("log_probs") is not None
            and outputs.get("label_mask") is not None
        )


class captured_forward:
    """Record the first call of `model` (the trainer's unwrapped model, PEFT-wrapped or not) inside
    this block, and the backbone's last hidden state during that call (`CapturedForward`)."""

    def __init__(self, model: nn.Module):
        self.model, self.seen, self.handles = model, CapturedForward(), []

    def __enter__(self) -> CapturedForward:
        seen = self.seen

        def before(module, args, kwargs):
            if not seen.called and not seen._inside:
                seen._inside, seen.kwargs = True, dict(kwargs)

        def after(module, args, kwargs, output):
            if seen._inside and not seen.called:
                seen.outputs, seen._inside = output, False

        def backbone_after(module, args, output):
            if seen._inside and seen.hidden is None:
                seen.hidden = output.get("last_hidden_state") if isinstance(output, Mapping) else output[0]

        self.handles = [
            self.model.register_forward_pre_hook(before, with_kwargs=True),
            self.model.register_forward_hook(after, with_kwargs=True),
        ]
        backbone = backbone_of(self.model)
        if backbone is not None:
            self.handles.append(backbone.register_forward_hook(backbone_after))
        return seen

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The module whose output holds the last hidden state before the LM head: the (PEFT-unwrapped)
    model's ``base_model`` (``model.model`` for a Llama), as TRL's fused head calls it; None if it has none."""
    lm = unwrapped(model)
    backbone = getattr(lm, "base_model", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not lm else None


def scaled_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The output embedding's `logits` as the model's forward turns them into its logits: times the
    config's logit scale (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, or
    ``1 / logits_scaling``), then soft-capped, ``cap * tanh(z / cap)``, with
    ``final_logit_softcapping`` (the attributes TRL's fused head reads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = next((getattr(text, n) for n in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(text, n, None) is not None), None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / text.logits_scaling
    if scale is not None and scale != 1:
        logits = logits * scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _aligned(mask: torch.Tensor, per_position: torch.Tensor) -> torch.Tensor:
    """`per_position` (batch, tokens, ...) cut to the positions of a fused head's `mask`: without
    its last position when the mask scores next-token labels (one position fewer), else whole."""
    if mask.shape[1] == per_position.shape[1] - 1:
        return per_position[:, :-1]
    if mask.shape[1] == per_position.shape[1]:
        return per_position
    raise ValueError(
        f"The fused LM head scored {mask.shape[1]} positions per sequence but the model's hidden states have "
        f"{per_position.shape[1]} (prompt-learning PEFT adds virtual tokens?): SAF and MESA cannot line them up. Use "
        "a LoRA-type adapter, or a two-pass or averaging method."
    )


def fused_student_logits(seen: CapturedForward, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """For fused-head outputs: the logits of the positions the loss counts, ``(positions,
    vocabulary)`` with their gradient, and that ``(batch, tokens)`` mask."""
    mask = seen.outputs["label_mask"]
    if seen.hidden is None:
        raise ValueError(
            "The model returned a fused LM head's log-probabilities (TRL), but hf-flat found no backbone "
            "(`model.base_model`) whose hidden states give the logits: MESA cannot compute its term for this model."
        )
    lm = unwrapped(model)
    head = lm.get_output_embeddings()
    hidden = _aligned(mask, seen.hidden)[mask.to(seen.hidden.device)]
    return scaled_logits(lm.config, head(hidden.to(head.weight.device))), mask


def rows_at(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Full ``(batch, tokens, vocabulary)`` logits at a fused head's counted positions: ``(positions, vocabulary)``."""
    return _aligned(mask, logits)[mask.to(logits.device)]
