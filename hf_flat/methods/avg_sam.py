"""Average SAM: a random perturbation of fixed radius.

Boca, Cross, Holm, Korkmaz, "Towards an Even Better Understanding of Sharpness-Aware
Minimisation", University of Cambridge (R252 report), 2023, section 3: the gradient is taken at a
random point on the sphere of radius ``rho`` around ``w``, so training minimises the *average*
loss around ``w`` instead of the worst case that SAM's ascent step approximates:

    e = rho * z / ||z||_2,   z ~ N(0, I) over the trainable parameters

Since ``e`` does not depend on the gradient, each perturbed group of samples takes **one**
forward/backward pass, at ``w + e``; the logged ``loss`` is that pass's loss, L(w + e), and no
``perturbed_loss`` / ``sharpness`` is logged. BatchNorm running statistics come from that pass.
The paper uses rho = 0.5 and 1.0, ten to twenty times SAM's radius.

**Random numbers.** ``z`` comes from dedicated `torch.Generator` objects on the parameters'
devices, never from torch's global generators, so it is independent of the data order and of
dropout and leaves both untouched. In perturbation number ``k`` (0-based, counted over the run),
the part of ``z`` for trainable parameter number ``i`` (in ``model.named_parameters()`` order) is
``torch.randn`` of the parameter's shape in float32 from a generator seeded with `direction_seed`
``(args.seed, stream, k, i)``. The stream is the process index under ``sam_scope="micro"`` (each
process draws its own directions) and ``all`` under ``sam_scope="step"`` (one direction per step,
the same on every process). (Every part has its own seed, so the parts do not depend on the order
in which they are drawn.) Under FSDP2 every process draws each parameter's whole part (the same
on every process) and keeps the rows it holds: ``z`` and its norm are those of the unsharded run,
at the cost of one whole parameter's draw at a time. The count ``k`` is saved with checkpoints, so a resumed run draws exactly the directions
the uninterrupted run would have drawn.
"""

import hashlib

import torch

from ..sharding import shard_of
from .two_pass import TwoPassMethod

#: Added to the norm, as in SAM, so that the division never meets zero.
EPS = 1e-12
#: Version of the layout of this method's part of the flat state file.
STATE_VERSION = "1"


def direction_seed(seed: int, stream: str, index: int, part: int) -> int:
    """The seed of part `part` (a parameter) of random direction number `index` of `stream`: 63 bits
    of a SHA-256 hash, so that nearby seeds, streams, indices and parts give unrelated generators
    (and none equals `seed` itself, from which torch's global generator is seeded)."""
    digest = hashlib.sha256(f"hf_flat.avg_sam/{seed}/{stream}/{index}/{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class AverageSAM(TwoPassMethod):
    """Average SAM (``flat_method="avg_sam"``): ``e = rho * z / ||z||``, ``z ~ N(0, I)``, one pass at ``w + e``."""

    uses_gradient = False
    state_kind = "avg_sam"

    def __init__(self, rho: float = 0.5, seed: int = 42, process_index: int = 0, **schedule_and_scope):
        super().__init__(**schedule_and_scope)
        self.rho, self.seed, self.process_index = rho, seed, process_index
        self.draws = 0  # perturbations drawn so far in this run (k)

    def perturbation(self, names, params, grads=None):
        if not params:
            return []
        stream = "all" if self.scope == "step" else str(self.process_index)
        index, self.draws = self.draws, self.draws + 1

        z, norms = [], []
        for i, p in enumerate(params):  # drawn in float32, kept in the parameter's dtype: z takes one copy of w
            rows = self.rows[i] if self.rows is not None else None
            generator = torch.Generator(device=p.device).manual_seed(direction_seed(self.seed, stream, index, i))
            zi = torch.randn(rows.shape if rows else p.shape, generator=generator, device=p.device, dtype=torch.float32)
            norms.append(torch.linalg.vector_norm(zi).to(params[0].device))
            z.append(shard_of(zi, rows).to(p.dtype) if rows else zi.to(p.dtype))
        torch._foreach_mul_(z, self.rho / (torch.linalg.vector_norm(torch.stack(norms)) + EPS))
        return z

    def add_perturbation(self, params, e):
        """``w <- w + e``, parameter by parameter, each ``e`` released as its copy of ``w`` is made:
        the two together never take more than one copy of the weights (and one parameter)."""
        if not e:
            return None
        saved = []
        with torch.no_grad():
            for i, p in enumerate(params):
                saved.append(p.detach().clone())
                p.add_(e[i])
                e[i] = None
        return saved

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {"avg_sam_version": STATE_VERSION, "avg_sam_draws": str(self.draws)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.draws = int(meta["avg_sam_draws"])
