"""LookSAM: SAM's gradient every k steps, reused in between.

Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
2022, arXiv 2203.02714, Algorithm 1 (the authors released no code).

On the first of every ``looksam_k`` optimizer steps LookSAM takes a SAM step and keeps ``g_v``, the
component of the SAM gradient ``g_s`` (at ``w + e``) orthogonal to the plain gradient ``g``:

    g_v = g_s - (<g_s, g> / ||g||^2) g

Every other step takes **one** forward/backward pass and descends along

    g + alpha * (||g|| / ||g_v||) * g_v

so ``g_v``, the part of SAM's gradient that the plain gradient lacks, is added back at the plain
gradient's scale.

**Inside the Trainer.** A LookSAM step is a whole optimizer step: ``g`` and ``g_s`` are the
gradients of all micro-batches of all processes (n-SAM, `TwoPassMethod`'s ``"step"`` scope), so
``g_v`` is the same on every process (under FSDP each process keeps its rows of it). Step ``t``
(1-based) is a SAM step iff ``t >= s`` and ``(t - s) % looksam_k == 0``, ``s = max(1, ceil(sam_start
* T))``; steps before ``s`` are plain steps. On the other steps the micro-batches run as the plain
Trainer runs them, and after the last one (its gradient all-reduced) ``g`` is replaced in place.
``g`` is not kept on a SAM step: ``e`` has its direction, and ``g_v`` is computed in ``e``'s memory,
so LookSAM holds one copy of the trainable weights between steps (``g_v``) and two during a SAM step
(``e`` becoming ``g_v``, and the copy of ``w``).

``g_v`` is saved with every checkpoint (``looksam.g_v.<name>`` in ``hf_flat_state.safetensors``) and
restored on resume. Mixed precision: ``g_v`` is scale-free in the rule above, so loss scaling does
not change the step. A non-finite ``g`` or ``g_s`` on a SAM step makes that step's gradient
non-finite (the GradScaler skips the step) and leaves ``g_v = 0``, so the steps up to the next SAM
step are plain steps, as they are before the first one. A non-finite ``g`` on another step stays
non-finite, for the GradScaler. All of it is decided on the device, without reading a value on the
host.
"""

import json

import torch

from ..sharding import ShardedTensor, local, reshard, rows_of, shard_group
from ..state_file import rows_of_state
from .sam import EPS, sam_perturbation
from .two_pass import PassLosses, TwoPassMethod

#: Version of the layout of this method's part of the flat state file.
STATE_VERSION = "1"


class LookSAM(TwoPassMethod):
    """LookSAM (``flat_method="looksam"``): a SAM step every `k` optimizer steps, one pass between."""

    separate_pass_2 = True
    state_kind = "looksam"

    def __init__(self, rho: float = 0.05, k: int = 5, alpha: float = 0.7, start: float = 0.0):
        super().__init__(scope="step", start=start, interval=k)
        self.rho, self.k, self.alpha = rho, k, alpha
        self.g_v: dict[str, torch.Tensor] | None = None  # by parameter name: this process's rows of g_v
        self._names = None  # the names of the parameters of the current SAM step
        self._g_v_rows = None  # under FSDP: where this process's rows of g_v lie, by name
        self._restored = None  # (tensors, names) from a checkpoint, until the model's layout is known

    def training_step(self, trainer, model, inputs, num_items_in_batch=None):
        self._take_restored(trainer.model)
        step = trainer.state.global_step + 1
        if self.perturbs_step(step, trainer.state.max_steps):
            if self._window == []:  # the first micro-batch of a SAM step: the old g_v goes (memory for e)
                self.g_v = None
            return super().training_step(trainer, model, inputs, num_items_in_batch)
        loss = trainer.forward_backward(model, inputs, num_items_in_batch)
        if trainer.accelerator.sync_gradients:
            self._look(trainer.model)
        return PassLosses(loss)

    def perturbation(self, names, params, grads):
        self._names = names
        return sam_perturbation(grads, self.rho, self.norm)

    def descend(self, params, e, grads):
        """``g_v = g_s - (<g_s, e> / ||e||^2) e``, computed in ``e``'s memory; ``g_s`` stays the step's
        gradient. Every scalar stays on the device; a non-finite ``g_s`` leaves ``g_v = 0`` (the
        GradScaler skips this step, and the steps up to the next SAM step are plain steps)."""
        e_norm = self.norm(e)
        coefficient = -self.dot(grads, e) / (e_norm * e_norm + EPS)
        finite = torch.isfinite(coefficient) & torch.isfinite(self.norm(grads))
        torch._foreach_mul_(e, coefficient)
        torch._foreach_add_(e, grads)
        for t in e:
            t.masked_fill_(~finite, 0.0)
        self.g_v = dict(zip(self._names, e))
        self._g_v_rows = dict(zip(self._names, self.rows)) if self.group is not None else None

    @torch.no_grad()
    def _look(self, model):
        """On a step without SAM: ``g <- g + alpha * ||g|| / ||g_v|| * g_v`` (after the all-reduce;
        a non-finite ``g`` stays non-finite, for the GradScaler)."""
        if self.g_v is None:
            return
        params = {n: p for n, p in model.named_parameters() if n in self.g_v and p.grad is not None}
        names = list(params)
        self.group = shard_group(params.values())
        grads = [local(params[n].grad) for n in names]
        if not grads:
            return
        g_v = [self.g_v[n] for n in names]
        g_norm, v_norm = self.norm(grads), self.norm(g_v)
        coefficient = self.alpha * g_norm / (v_norm + EPS)
        torch._foreach_addcmul_(grads, g_v, [coefficient] * len(g_v))  # (no temporary copy of g_v)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self):
        meta = {"looksam_version": STATE_VERSION, "looksam_names": json.dumps(list(self.g_v or {}))}
        if not self.g_v:
            return {}, meta
        tensors = {}
        for name, t in self.g_v.items():
            t = t.detach().cpu().contiguous()
            rows = self._g_v_rows[name] if self._g_v_rows else None
            tensors[f"looksam.g_v.{name}"] = ShardedTensor(t, rows) if rows is not None else t
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        names = json.loads(meta.get("looksam_names", "[]"))
        self.g_v, self._restored = None, (tensors, names) if names else None

    def _take_restored(self, model):
        """Take the rows of a restored g_v that this process holds, once the model is prepared."""
        if self._restored is None:
            return
        tensors, names = self._restored
        self._restored = None
        reshard(model)
        params = dict(model.named_parameters())
        rows = {n: rows_of(params[n]) for n in names}
        self.g_v = {n: rows_of_state(tensors, f"looksam.g_v.{n}", rows[n]).to(local(params[n]).device) for n in names}
        self._g_v_rows = rows if shard_group([params[n] for n in names]) is not None else None
