"""The trajectory loss of SAF and MESA (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022,
arXiv 2205.14083, eq. 9 and 13), as the authors' code computes it:

    L_tra = lambda * tau^2 * 1/|B| * sum_{i in B with a target} KL( softmax(y_i / tau) || softmax(f(x_i) / tau) )

``y_i`` is the target (SAF: the logits of the same sample some epochs ago; MESA: the EMA model's
logits). ``tau^2`` keeps the gradient's scale independent of the temperature, as in knowledge
distillation. Samples without a target contribute nothing, but still count in ``|B|``.

Heads that are not a softmax over classes get the divergence that matches their loss (our
extension; the paper only has softmax classifiers):

- multi-label classification (``config.problem_type == "multi_label_classification"``, a
  BCE-with-logits loss over independent labels): one Bernoulli per label,
  ``lambda * tau^2 * sum_c KL( Bern(sigmoid(y_ic / tau)) || Bern(sigmoid(f_ic / tau)) )`` per
  sample, averaged like the softmax KL;
- regression (``problem_type == "regression"``, or a single output): there is no distribution to
  compare, so ``lambda * sum_c (f_ic - y_ic)^2``, averaged like the KL.

Per-token outputs (``logits`` of shape ``(B, T, C)``) average over the batch's valid positions:
those whose label is not ``-100`` (for a causal LM, which predicts label ``t + 1`` at position
``t``, the label of the next position), or, without labels, those the attention mask keeps.

Logits are found in the model's outputs as the Trainer finds them (`logits_of`): a dict's
``logits``, or in a tuple (``return_dict=False``) the first entry, or the second when the model
was given its labels and so returns its loss first.
"""

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: the divergences `trajectory_loss` knows, by the kind of head (see `head_kind`)
SOFTMAX, BERNOULLI, SQUARED_ERROR = "softmax", "bernoulli", "squared_error"


def kl_per_row(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(logits / tau)) over the last dimension, in float32."""
    log_p_target = F.log_softmax(target_logits.float() / tau, dim=-1)
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    return (log_p_target.exp() * (log_p_target - log_p)).sum(-1)


def bernoulli_kl_per_row(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_c KL(Bern(sigmoid(target_c / tau)) || Bern(sigmoid(logits_c / tau))), in float32:
    ``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`` per label, with log-sigmoids."""
    t, s = target_logits.float() / tau, logits.float() / tau
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(-1)


def trajectory_loss(logits: torch.Tensor, target_logits: torch.Tensor, lam: float, tau: float,
                    has_target: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                    kind: str | None = None) -> torch.Tensor:
    """The trajectory term for a batch.

    Args:
        logits: the model's logits, ``(B, C)`` or ``(B, T, C)``.
        target_logits: the targets, same shape (rows without a target may hold anything).
        lam: lambda, the weight of the term.
        tau: the temperature.
        has_target: ``(B,)`` bool, which samples have a target (default: all; per-sample logits only).
        valid: ``(B, T)`` bool, for per-token logits: the positions to compare (default: all).
        kind: `SOFTMAX`, `BERNOULLI` or `SQUARED_ERROR` (default: squared error for one output,
            else softmax); see the module docstring.
    """
    kind = kind or (SQUARED_ERROR if logits.shape[-1] == 1 else SOFTMAX)
    if kind == SQUARED_ERROR:  # regression head: squared error to the target
        per_row = (logits.float() - target_logits.float()).pow(2).sum(-1)
        scale = lam
    else:
        per_row = (bernoulli_kl_per_row if kind == BERNOULLI else kl_per_row)(target_logits, logits, tau)
        scale = lam * tau**2
    if per_row.dim() == 2:  # per token: mean over the valid positions of the batch
        mask = torch.ones_like(per_row, dtype=torch.bool) if valid is None else valid
        return scale * (per_row * mask).sum() / mask.sum().clamp(min=1)
    if has_target is not None:
        per_row = per_row * has_target
    return scale * per_row.sum() / per_row.shape[0]


def valid_positions(inputs: Mapping, logits: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """Which positions of per-token `logits` count: non-ignored labels (shifted by one for a causal
    LM, whose position t predicts label t + 1, unless the batch brings its ``shift_labels``, which
    ``ForCausalLMLoss`` then uses as they are), else the attention mask, else all."""
    shift_labels = inputs.get("shift_labels") if causal else None
    if shift_labels is not None and shift_labels.dim() == 2:
        return (shift_labels != -100)[:, : logits.shape[1]]
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


# ---- what kind of model ------------------------------------------------------------------------
def unwrapped(model):
    """`model` without its PEFT wrapper, as `Trainer.compute_loss` unwraps it (a `PeftModel` has a
    ``peft_config`` and keeps the wrapped model in ``base_model.model``)."""
    if hasattr(model, "peft_config") and hasattr(getattr(model, "base_model", None), "model"):
        return model.base_model.model
    return model


def is_causal_lm(model) -> bool:
    """Whether `model` shifts its labels (position t predicts label t + 1), decided as transformers
    decides it: `Trainer.compute_loss` shifts for label smoothing when the (PEFT-unwrapped) class is
    in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, and `Trainer._loss_shifts_labels` (token counts) when
    the v5 ``loss_type`` maps to ``ForCausalLMLoss`` and the model is not an encoder-decoder (whose
    decoder input is shifted instead). Either suffices. Encoder-only per-token models (token
    classification, masked LM) and models unknown to transformers do not shift."""
    model = unwrapped(model)
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(cls.__name__ in causal_names for cls in type(model).__mro__):  # also a user's subclass of one
        return True
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not encoder_decoder


def is_language_model(model) -> bool:
    """Whether `model` predicts a distribution over the vocabulary per token: a causal LM
    (`is_causal_lm`) or a sequence-to-sequence LM (T5, BART's generation head; not an
    encoder-decoder classifier)."""
    seq2seq = set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
    return is_causal_lm(model) or any(cls.__name__ in seq2seq for cls in type(unwrapped(model)).__mro__)


def head_kind(model, logits: torch.Tensor) -> str:
    """Which divergence suits `model`'s head: `BERNOULLI` for multi-label classification,
    `SQUARED_ERROR` for regression or a single output, else `SOFTMAX`. Hugging Face models set
    ``config.problem_type`` in their first forward, so it is known once the logits exist."""
    problem_type = getattr(getattr(unwrapped(model), "config", None), "problem_type", None)
    if problem_type == "multi_label_classification":
        return BERNOULLI
    if problem_type == "regression" or logits.shape[-1] == 1:
        return SQUARED_ERROR
    return SOFTMAX


def returns_loss_first(inputs: Mapping, label_names: list[str]) -> bool:
    """Whether a model given `inputs` puts its loss first in a tuple output: it was given its labels
    (`Trainer.prediction_step`'s ``has_labels``); a model without label arguments must return the
    loss the Trainer trains on, which the Trainer reads from the first entry."""
    return not label_names or all(inputs.get(name) is not None for name in label_names)


def logits_of(outputs, model, loss_first: bool) -> torch.Tensor:
    """The logits in `model`'s `outputs`, read as the Trainer reads them: a dict's (a
    `ModelOutput`'s) ``logits``; in a tuple, ``outputs[1]`` when the loss comes first
    (`returns_loss_first`), else ``outputs[0]``. Outputs without one set of logits (question
    answering's ``start_logits`` / ``end_logits``) are refused."""
    name = unwrapped(model)._get_name()
    if isinstance(outputs, Mapping):
        if outputs.get("logits") is not None:
            return outputs["logits"]
        returned = f"the keys {list(outputs.keys())}"
    elif "QuestionAnswering" in name:  # (start_logits, end_logits): the Trainer's find_labels rule
        returned = f"a tuple of {len(outputs)} tensors (start and end logits)"
    else:
        return outputs[1 if loss_first else 0]
    raise ValueError(
        f"SAF and MESA compare the model's `logits` with a target, but {name} returned {returned} "
        "and no `logits`. Use flat_method='sam' or 'asam' for this model."
    )


def student_logits(trainer, seen) -> torch.Tensor:
    """The logits of the training forward that `seen` (a `CapturedForward`) recorded, as the
    Trainer reads them (`logits_of`); refused if the trainer's loss did not run the model, or if
    they carry no gradient while the loss does (a trainer that recomputes its logits without
    grad), since the term would then silently not train."""
    if not seen.called:
        raise ValueError(
            "SAF and MESA read the model's logits from the forward pass the trainer's compute_loss makes, but this "
            "compute_loss did not call the trainer's model: use a two-pass or averaging method with it."
        )
    logits = logits_of(seen.outputs, trainer.model, returns_loss_first(seen.kwargs or {}, trainer.label_names))
    if torch.is_grad_enabled() and not logits.requires_grad:
        raise RuntimeError(
            "The logits of the training forward pass carry no gradient, so SAF's / MESA's term would not train the "
            "model: the trainer's compute_loss must call the model with grad enabled."
        )
    return logits


# ---- the methods' shared life cycle ----------------------------------------------------------------
class TrajectoryMethod(TrainerCallback, metaclass=ABCMeta):
    """What SAF and MESA share as `TrainerCallback`s: when training begins, whether the term can be
    used at all in this run. If it cannot (the first epoch it could be non-zero is past the last
    epoch, counting from 0 like ``int(state.epoch)``), warn once, keep nothing (`release`) and
    return no term (subclasses check `active`)."""

    #: the prefix of the method's arguments and its name in messages
    prefix = ""
    active = True
    used = False  # whether the term was computed in this run (set by the trainer)

    def first_epoch(self) -> int:
        """The first epoch (from 0) in which the term can be non-zero."""
        return self.start_epoch

    def binding_arguments(self) -> dict:
        """The argument(s) that put `first_epoch` where it is, by name, for the warning."""
        return {f"{self.prefix}_start_epoch": self.start_epoch}

    def release(self):
        """Drop the method's state (memory, teacher)."""

    def before_forward(self, trainer, inputs):
        """Called with each training micro-batch before the model's forward pass; what it returns is
        handed to `term` as its `target` (MESA: the teacher's logits)."""
        return None

    @abstractmethod
    def term(self, trainer, seen, inputs, target=None):
        """The term for a training micro-batch, from what the model returned (`seen`, a
        `hf_flat.methods.outputs.CapturedForward`), the micro-batch `inputs` as the trainer got it
        (labels included) and `before_forward`'s `target`; None when there is none."""

    def on_train_end(self, args, state, control, **kwargs):
        if not self.active or self.used:
            return
        method = getattr(args, "flat_method", self.prefix)
        last = max(math.ceil(state.epoch or 0) - 1, 0)  # the last epoch that ran, from 0
        if last < self.first_epoch():
            logger.warning(
                f"flat_method={method!r}: training ended in epoch {last} (from 0) before the trajectory term's first "
                f"epoch {self.first_epoch()}, so {self.prefix.upper()} never changed the loss. Lower "
                f"{' or '.join(self.binding_arguments())}. (With an IterableDataset without a length, the epoch only "
                "advances when the stream ends.)"
            )
        else:
            logger.warning(
                f"flat_method={method!r}: training reached epoch {last}, past the trajectory term's first epoch "
                f"{self.first_epoch()}, but {self.prefix.upper()} never changed the loss: no training micro-batch of "
                "those epochs went through hf-flat's compute_loss."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self.used = False
        epochs = state.num_train_epochs
        self.active = self.first_epoch() < epochs
        if not self.active:
            binding = self.binding_arguments()
            logger.warning(
                f"flat_method={args.flat_method!r}: {' and '.join(f'{k}={v}' for k, v in binding.items())}, but "
                f"training runs {epochs} epoch(s), numbered 0 to {epochs - 1}, so the trajectory term (first "
                f"possible in epoch {self.first_epoch()}) would never be used: {self.prefix.upper()} is off for "
                f"this run and keeps nothing. Lower {' or '.join(binding)}, or train for at least "
                f"{self.first_epoch() + 1} epochs (num_train_epochs)."
            )
            self.release()
