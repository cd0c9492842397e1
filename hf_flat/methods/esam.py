"""ESAM: Efficient Sharpness-Aware Minimization.

Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
Training of Neural Networks", ICLR 2022, arXiv 2110.03141, section 3 and Algorithm 1; the authors'
code dydjw9/Efficient_SAM (`utils/Esam.py`). Two savings on SAM's two passes:

- **Stochastic weight perturbation (SWP).** Only a random subset ``S`` of the trainable parameter
  tensors, each drawn with probability ``beta`` (``esam_beta``), is perturbed, and scaled up by
  ``1 / beta`` so that the perturbation is unbiased:

      e = (rho / beta) * g_S / ||g_S||   on S,   0 elsewhere

  Pass 1 computes gradients for ``S`` only (the other tensors are marked as not requiring grad
  for it), which is what saves time. The paper writes the mask per coordinate; the authors' code,
  followed here, draws it per tensor, which is what lets pass 1 skip the others' weight gradients,
  and takes the norm over ``S``.
- **Sharpness-sensitive data selection (SDS).** A forward pass without grad at ``w + e`` gives each
  sample's loss; pass 2 (forward and backward at ``w + e``) runs only on the ``ceil(gamma * n)``
  samples (``esam_gamma``) of the micro-batch whose loss rose most, ``l_i(w + e) - l_i(w)``, and its
  gradient is the mean loss of those samples. On a model with BatchNorm, which cannot normalise one
  sample, it keeps at least two.

Per-sample losses are computed for classification heads (logits ``(batch, classes)``, integer
labels) and token-level cross-entropy heads (logits ``(batch, tokens, classes)``, labels with -100
ignored; a causal LM's position ``t`` predicts label ``t + 1``; or a fused LM head's per-token
log-probabilities under TRL): a sample's loss is the mean over its counted tokens. Other models
are refused. On top of another trainer (TRL's `SFTTrainer`), pass 1 counts in its running metrics,
the selection pass and pass 2 do not. With a loss normalised by ``num_items_in_batch`` (token
sums), pass 2 gets ``num_items_in_batch`` times the selected samples' share of the micro-batch's
counted tokens, so the selected samples' gradient has the weight that the micro-batch's has.

**Inside the Trainer.** ESAM perturbs per micro-batch and process (``sam_scope="micro"``; the
data selection ranks one micro-batch's samples). Under DDP pass 1 and the selection pass run
without all-reduce and pass 2 is synchronised as the Trainer arranges: the step's gradient is the
average over processes of the sum over micro-batches of each one's ``grad L_{B+}(w + e)``.
``sam_scope="step"``, ``sam_m`` and FSDP are refused. The logged ``perturbed_loss`` is the whole
micro-batch's loss at ``w + e`` (from the selection pass), so ``sharpness`` is its rise.

**Random numbers.** ``S`` comes from a dedicated generator, as average SAM's directions do
(`esam_subset`): perturbation number ``k`` of process ``r`` draws from a seed hashed from
``(args.seed, "esam/r", k)``. The count ``k`` is saved with checkpoints (``esam_draws``), so a
resumed run draws the same subsets. A non-finite ``g`` gives a non-finite ``e``, so pass 2's
gradient is non-finite and the GradScaler skips the step. The selection and the selected samples'
share of the counted items stay tensors on the device: nothing is read on the host.
"""

import math
import random

import torch
import torch.nn.functional as F

from .avg_sam import direction_seed
from .sam import EPS
from .trajectory import is_causal_lm, logits_of, returns_loss_first
from .two_pass import TwoPassMethod, _add_perturbation, _restore, frozen_batchnorm_statistics, normalises_over_samples

#: Version of the layout of this method's part of the flat state file.
STATE_VERSION = "1"


def esam_subset(seed: int, stream: str, index: int, n: int, beta: float) -> list[bool]:
    """Which of the `n` trainable parameter tensors (in ``named_parameters()`` order) ESAM
    perturbation number `index` of `stream` perturbs: each with probability `beta`, from Python's
    generator seeded with `direction_seed(seed, "esam/<stream>", index, 0)`. If none is drawn
    (probability ``(1 - beta)^n``), or none that the model's forward uses (`ESAM` learns which from
    its first pass 1, which computes every tensor's gradient), ESAM perturbs every tensor with
    ``rho`` unscaled, as for beta = 1."""
    draw = random.Random(direction_seed(seed, f"esam/{stream}", index, 0))  # (Python's: no tensor to read back)
    return [draw.random() < beta for _ in range(n)]


def per_sample_losses(
    logits: torch.Tensor, inputs: dict, causal: bool, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's cross-entropy (mean over its counted tokens) and how many items it counts, as
    float32 tensors of shape (batch,). `smoothing`: the Trainer's ``label_smoothing_factor`` eps,
    so that each token's loss is the one the Trainer trains on, ``(1 - eps) nll + eps mean_c(-log p_c)``
    (its `LabelSmoother`)."""
    labels = inputs.get("labels")
    if labels is not None and logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        losses = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100, label_smoothing=smoothing)
        return losses, (labels != -100).float()
    if labels is not None and logits.dim() == 3 and labels.dim() == 2 and not labels.is_floating_point():
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(
            logits.float().transpose(1, 2), labels[:, : logits.shape[1]], reduction="none", ignore_index=-100,
            label_smoothing=smoothing,
        )
        counted = (labels[:, : logits.shape[1]] != -100).float()
        return tokens.sum(1) / counted.sum(1).clamp(min=1), counted.sum(1)
    raise ValueError(
        "flat_method='esam' ranks the samples of a batch by their loss, which it computes for classification "
        "(logits (batch, classes) with integer labels) and token-level cross-entropy (logits (batch, tokens, "
        f"classes) with labels, -100 ignored); this model gives logits of shape {tuple(logits.shape)} and labels "
        f"{'none' if labels is None else tuple(labels.shape)}. Use flat_method='sam' for it."
    )


def sample_losses(trainer, seen, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_sample_losses` from what the model returned in a pass (`CapturedForward`): from its
    logits, or, for a fused LM head (TRL), from its per-token log-probabilities and label mask."""
    if seen.fused:
        log_probs, mask = seen.outputs["log_probs"].detach().float(), seen.outputs["label_mask"]
        counted = mask.float().sum(1)
        return -log_probs.sum(1) / counted.clamp(min=1), counted
    logits = logits_of(seen.outputs, trainer.model, returns_loss_first(seen.kwargs or {}, trainer.label_names))
    # label_smoothing_factor: rank by the smoothed loss the Trainer trains on (unless a compute_loss_func replaces it)
    smoother = getattr(trainer, "label_smoother", None)
    smoothing = smoother.epsilon if smoother is not None and getattr(trainer, "compute_loss_func", None) is None else 0.0
    return per_sample_losses(logits.detach(), inputs, is_causal_lm(trainer.model), smoothing)


class ESAM(TwoPassMethod):
    """ESAM (``flat_method="esam"``): SAM on a random subset of the weights, pass 2 on the samples
    whose loss the perturbation raised most."""

    state_kind = "esam"

    def __init__(self, rho=0.05, beta=0.6, gamma=0.5, seed=42, process_index=0, **schedule_and_scope):
        super().__init__(**schedule_and_scope)
        self.rho, self.beta, self.gamma, self.seed, self.process_index = rho, beta, gamma, seed, process_index
        self.draws = 0  # subsets drawn so far in this run (k)
        self._used = None  # per trainable tensor: whether the forward uses it (learned at the run's first pass 1)
        self._scale_beta = beta  # beta of the current draw (1 for an empty draw)

    def perturbation(self, names, params, grads):
        if grads:  # (on the device: a non-finite g gives a non-finite e, and the GradScaler skips the step)
            torch._foreach_mul_(grads, self.rho / self._scale_beta / (self.norm(grads) + EPS))
        return grads

    def _two_passes(self, trainer, model, named, params, inputs, num_items_in_batch, share, sync, copy=None):
        """One micro-batch: pass 1 on the drawn subset of tensors, the selection pass, pass 2 on the
        selected samples. Returns ``(L(w), L(w + e))`` (scaled like the Trainer's loss) and the copy of w."""
        chosen = esam_subset(self.seed, str(self.process_index), self.draws, len(params), self.beta)
        self.draws += 1
        # An empty draw (probability (1 - beta)^n), or one of tensors the forward does not use, takes
        # every tensor, unscaled, as beta = 1 would. Which tensors are used, this run's first pass 1
        # finds out: it computes every tensor's gradient.
        learning = self._used is None
        subset = not learning and any(c and used for c, used in zip(chosen, self._used))
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        left_out = [p for p, c in zip(params, chosen) if not c] if subset else []
        for p in left_out:
            p.requires_grad_(False)
        try:
            with trainer.accelerator.no_sync(model):
                loss, seen = trainer.forward_backward_with_outputs(model, inputs, num_items_in_batch)
        except RuntimeError as error:
            if left_out and "does not require grad" in str(error):
                raise ValueError(
                    f"flat_method='esam' drew a subset of the trainable tensors (esam_beta={self.beta}) of which this "
                    "batch's forward uses none, though the run's first batch used some of them: the model's forward "
                    "uses different weights on different batches (mixture-of-experts routing, LayerDrop). Use "
                    "esam_beta=1 (no subset) or flat_method='sam' with this model."
                ) from error
            raise
        finally:
            for p in left_out:
                p.requires_grad_(True)
        if learning:
            self._used = [p.grad is not None for p in params]
            subset = any(c and used for c, used in zip(chosen, self._used))
            for p, c in zip(params, chosen):
                if subset and not c:
                    p.grad = None  # as if it had not required grad
        self._scale_beta = self.beta if subset else 1.0
        before, counted = sample_losses(trainer, seen, inputs)
        del seen

        active = [i for i, p in enumerate(params) if p.grad is not None]
        active_params = [params[i] for i in active]
        e = self.perturbation([named[i][0] for i in active], active_params, [params[i].grad for i in active])
        saved = _add_perturbation(active_params, e, into=copy)
        for p, acc in zip(params, accumulated):
            p.grad = acc
        try:
            selected, items = inputs, num_items_in_batch
            perturbed = loss
            if e:  # (empty: no trainable tensor received a gradient)
                del e
                with torch.no_grad(), frozen_batchnorm_statistics(model):
                    at_e, seen = trainer.loss_and_outputs(model, inputs, num_items_in_batch)
                after, _ = sample_losses(trainer, seen, inputs)
                del seen
                perturbed = at_e
                selected, share_of_items = self.select(inputs, after - before, counted, normalises_over_samples(model))
                if num_items_in_batch is not None:
                    items = num_items_in_batch * share_of_items
            with sync, frozen_batchnorm_statistics(model):
                trainer.forward_backward(model, selected, items, counted=False)
        finally:
            _restore(active_params, saved)
        return loss, perturbed, saved

    def select(self, inputs: dict, rise: torch.Tensor, counted: torch.Tensor, two_or_more=False):
        """The ``ceil(gamma * n)`` samples of `inputs` with the largest loss `rise` (in batch order),
        at least two if `two_or_more` (BatchNorm), and their share of the micro-batch's counted items
        (a tensor on the device: the selection reads nothing on the host)."""
        n = rise.shape[0]
        keep = max(2 if two_or_more else 1, math.ceil(self.gamma * n))
        if keep >= n:
            return inputs, 1.0
        index = torch.topk(rise, keep).indices.sort().values
        chosen = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                chosen[key] = value[index.to(value.device)]
            else:
                chosen[key] = value
        total = counted.sum()
        share = torch.where(total > 0, counted[index].sum() / total.clamp(min=1), keep / n)
        return chosen, share

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self):
        return {}, {"esam_version": STATE_VERSION, "esam_draws": str(self.draws)}

    def load_state_dict(self, tensors, meta):
        self.draws = int(meta["esam_draws"])
