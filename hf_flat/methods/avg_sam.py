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

**Random numbers.** ``z`` comes from a dedicated `torch.Generator` on the parameters' device (one
for the run, reseeded for each perturbation), never from torch's global generators, so it is
independent of the data order and of dropout and leaves both untouched. Perturbation number ``k``
(0-based, counted over the run) seeds it with `direction_seed` ``(args.seed, stream, k, 0)`` and
draws the parts of ``z`` in turn, for the trainable parameters in ``model.named_parameters()``
order: ``torch.randn`` of each parameter's shape, in float32. The stream is the process index under
``sam_scope="micro"`` (each process draws its own directions) and ``all`` under
``sam_scope="step"`` (one direction per step, the same on every process). Under FSDP2 every
process draws each parameter's whole part (the same on every process) and keeps the rows it
holds: ``z`` and its norm are those of the unsharded run, at the cost of one whole parameter's
draw at a time. The count ``k`` is saved with checkpoints, so a resumed run draws exactly the
directions the uninterrupted run would have drawn. Nothing is read on the host: the norm stays a
tensor on the device.
"""

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..sharding import local
from .two_pass import TwoPassMethod

#: Added to the norm, as in SAM, so that the division never meets zero.
EPS = 1e-12
#: ``z`` is drawn in this many segments of its flat layout, each from a generator of its own. A
#: constant, so that ``z`` is the same on every machine.
SEGMENTS = 8
#: Version of the layout of this method's part of the flat state file.
STATE_VERSION = "1"


def segment_pieces(sizes: list[int], segments: int) -> list[list[tuple[int, int, int]]]:
    """How ``z``'s flat layout (the parameters of `sizes` elements, flattened and concatenated in
    order) falls into `segments` consecutive segments of ``ceil(N / segments)`` elements: per
    segment, its pieces ``(parameter, begin, end)``, a range of that parameter's flattened elements."""
    total = sum(sizes)
    length = max(1, -(-total // segments))
    pieces, offset = [[] for _ in range(segments)], 0
    for i, size in enumerate(sizes):
        position = 0
        while position < size:
            j = (offset + position) // length
            end = min(size, (j + 1) * length - offset)
            pieces[j].append((i, position, end))
            position = end
        offset += size
    return pieces


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
        self._generators = {}  # (segment, device) -> the generator that segment of z is drawn from
        self._pool = None  # on the CPU: the threads that draw the segments side by side

    def perturbation(self, names, params, grads=None):
        if not params:
            return []
        stream = "all" if self.scope == "step" else str(self.process_index)
        index, self.draws = self.draws, self.draws + 1
        device = params[0].device
        # FSDP2: this process holds rows of a parameter (`rows`), a contiguous range of its flattened whole
        sharded = self.group is not None
        rows = [r if sharded and r and r.shape else None for r in (self.rows or [None] * len(params))]
        whole = [r.shape if r else tuple(p.shape) for r, p in zip(rows, params)]
        sizes = [math.prod(shape) for shape in whole]
        held = [(r.start * (n // r.shape[0]), r.stop * (n // r.shape[0])) if r else (0, n) for r, n in zip(rows, sizes)]
        z = [torch.empty(hi - lo, device=p.device, dtype=torch.float32) for (lo, hi), p in zip(held, params)]
        squares = []  # (FSDP) the sums of squares of the whole parameters' parts, drawn piece by piece

        def draw(j, pieces):
            generator = self._generator(j, device).manual_seed(direction_seed(self.seed, stream, index, j))
            for i, begin, end in pieces:
                lo, hi = held[i]
                if lo <= begin and end <= hi:  # drawn in place
                    piece = z[i][begin - lo : end - lo].normal_(generator=generator)
                else:  # (FSDP) drawn whole, to keep the stream; this process keeps its rows of it
                    piece = torch.empty(end - begin, device=device, dtype=torch.float32).normal_(generator=generator)
                    start, stop = max(lo, begin), min(hi, end)
                    if start < stop:
                        z[i][start - lo : stop - lo].copy_(piece[start - begin : stop - begin])
                if sharded:
                    squares.append(torch.dot(piece, piece).to(device, torch.float64))

        work = list(enumerate(segment_pieces(sizes, SEGMENTS)))
        if device.type == "cpu" and not sharded and torch.get_num_threads() > 1:
            # on the CPU the segments are drawn side by side (`normal_` with a generator runs on one
            # core); the threads run nothing else, so no other thread pool wakes up in them
            if self._pool is None:
                self._pool = ThreadPoolExecutor(torch.get_num_threads())
            list(self._pool.map(lambda item: draw(*item), work))
        else:
            for item in work:
                draw(*item)
        if sharded:
            norm = torch.stack(squares).sum().sqrt()
        else:  # (float32 suffices for Gaussian entries)
            norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in torch._foreach_norm(z)]))
        z = [zi.view(local(p).shape if r else p.shape).to(p.dtype) for zi, p, r in zip(z, params, rows)]
        torch._foreach_mul_(z, self.rho / (norm + EPS))
        return z

    def _generator(self, segment: int, device) -> torch.Generator:
        """This run's generator of `segment` on `device` (made once: building generators every step
        costs time)."""
        key = (segment, device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def add_perturbation(self, params, e):
        """``w <- w + e``, parameter by parameter, each ``e`` released as it is used: the weights
        ``w`` are kept as they are (the parameter gets the new tensor ``w + e``, and `restore` gives
        it ``w`` back: no copy is made either way); under FSDP2, whose rows are views into the
        sharded parameters, ``w`` is copied first. Never more than one copy of the weights (and one
        parameter) besides them."""
        if not e:
            return None
        saved = []
        with torch.no_grad():
            for i, p in enumerate(params):
                if self.group is None:
                    saved.append(p.data)
                    p.data = p.data + e[i]
                else:
                    saved.append(p.detach().clone())
                    p.add_(e[i])
                e[i] = None
        return saved

    def restore(self, params, saved):
        if saved is None:
            return
        if self.group is not None:
            return super().restore(params, saved)
        for p, w in zip(params, saved):
            p.data = w

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {"avg_sam_version": STATE_VERSION, "avg_sam_draws": str(self.draws)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.draws = int(meta["avg_sam_draws"])
