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

**Random numbers.** ``z`` comes from dedicated `torch.Generator` objects on the parameters' device,
never from torch's global generators, so it is independent of the data order and of dropout and
leaves both untouched. Lay the trainable parameters (in ``model.named_parameters()`` order)
flattened end to end, N elements in all, and cut that layout into `SEGMENTS` consecutive segments
of ``ceil(N / SEGMENTS)`` elements. For perturbation number ``k`` (0-based, counted over the run),
segment ``j``'s generator is seeded with `direction_seed` ``(args.seed, stream, k, j)`` and fills
the pieces of the parameters that fall in the segment, in order, each with one float32
``normal_`` (`segment_pieces`). The segments do not depend on each other, so on the CPU they are
drawn side by side, one thread per core (a generator runs on one core). The stream is the process
index under ``sam_scope="micro"`` (each process draws its own directions) and ``all`` under
``sam_scope="step"`` (one direction per step, the same on every process). Under FSDP2 every
process draws each piece whole (the same on every process) and keeps the rows of it it holds:
``z`` and its norm are those of the unsharded run, at the cost of one whole piece's draw at a
time. The count ``k`` is saved with checkpoints, so a resumed run draws exactly the directions the
uninterrupted run would have drawn.

**Cost.** Nothing is read on the host: the norm stays a tensor on the device. ``z`` is drawn into
one float32 buffer of the trainable weights' size, kept for the run (allocating it every step
costs time), and `perturb` turns it into ``w + e = w + (rho / ||z||) z`` in place, in one pass,
for every parameter it can stand in for (float32 and contiguous): the parameter's data becomes
that part of the buffer and `restore` gives it ``w`` back, so ``w`` is never copied. The memory
beyond the plain Trainer is one float32 copy of the trainable weights.
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
#: Each parameter's part of the buffer starts at a multiple of this many elements (64 bytes), so
#: that kernels reading it as the parameter's weights find it aligned as a tensor of its own.
ALIGN = 16
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


def add_scaled(z: list[torch.Tensor], w: list[torch.Tensor], scale: torch.Tensor, one_pass: bool):
    """``z <- w + scale * z`` in place, for each pair: in one pass over memory per tensor
    (`one_pass`, for the CPU), or in two passes of a few kernels for all the tensors (for a GPU,
    where a kernel per tensor costs more than a pass)."""
    if one_pass:
        for zi, wi in zip(z, w):
            torch.addcmul(wi, zi, scale, out=zi)
    else:
        torch._foreach_mul_(z, scale)
        torch._foreach_add_(z, w)


def direction_seed(seed: int, stream: str, index: int, part: int) -> int:
    """The seed of segment `part` (`SEGMENTS`) of random direction number `index` of `stream`: 63
    bits of a SHA-256 hash, so that nearby seeds, streams, indices and segments give unrelated
    generators (and none equals `seed` itself, from which torch's global generator is seeded)."""
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
        self._buffer = None  # (unsharded) z, then w + e: one float32 tensor kept for the run
        self._views, self._layout = None, None  # the buffer's views, one per parameter; their shapes and device
        self._segments = None  # per segment of z, the views of the buffer that its generator fills in turn

    def perturbation(self, names, params, grads=None):
        """``e = rho z / ||z||`` for each of `params`, in their dtypes (training goes through
        `perturb`, which computes ``w + e`` without making ``e`` first)."""
        if not params:
            return []
        z, scale = self._direction(params)
        torch._foreach_mul_(z, scale)
        return [e.to(p.dtype) for e, p in zip(z, params)]

    def perturb(self, names, params, grads=None):
        """``w <- w + e``, keeping ``w``: where the buffer can stand in for a parameter, the buffer
        becomes ``w + (rho / ||z||) z`` in place and the parameter's data that part of it (no copy
        of ``w``); any other parameter gets a new tensor ``w + e``. Under FSDP2, whose rows are views
        into the sharded parameters, each parameter's rows are copied and ``e`` added to them in
        place, one parameter at a time, each part of ``z`` released once used. Returns what
        `restore` gives back."""
        if not params:
            return None
        z, scale = self._direction(params)
        with torch.no_grad():
            if self.group is not None:
                saved = []
                for i, p in enumerate(params):
                    saved.append(p.detach().clone())
                    p.add_(z[i].mul_(scale).to(p.dtype))
                    z[i] = None
                return saved
            saved = [p.data for p in params]
            fits = [p.dtype == torch.float32 and p.is_contiguous() for p in params]
            add_scaled([zi for zi, f in zip(z, fits) if f], [w for w, f in zip(saved, fits) if f], scale,
                       one_pass=params[0].device.type == "cpu")
            for p, zi, w, f in zip(params, z, saved, fits):
                p.data = zi if f else w + (zi * scale).to(p.dtype)
        return saved

    def restore(self, params, saved):
        if saved is None:
            return
        if self.group is not None:
            return super().restore(params, saved)
        for p, w in zip(params, saved):
            p.data = w

    def _stream(self) -> str:
        return "all" if self.scope == "step" else str(self.process_index)

    def _direction(self, params) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The next perturbation's ``z`` (float32, shaped like `params`: under FSDP2 this process's
        rows) and ``rho / (||z|| + EPS)``, a tensor on the device."""
        stream, index = self._stream(), self.draws
        self.draws += 1
        if self.group is not None:
            return self._sharded_direction(params, stream, index)
        z = self._buffer_views([tuple(p.shape) for p in params], params[0].device)
        self._draw(stream, index)
        # (the buffer's padding is zero; float32 suffices for the norm of Gaussian entries)
        return z, self.rho / (torch.linalg.vector_norm(self._buffer) + EPS)

    def _draw(self, stream: str, index: int):
        """Draw direction `index` of `stream` into the buffer, segment by segment."""
        device = self._buffer.device

        def draw(j, pieces):
            generator = self._generator(j, device).manual_seed(direction_seed(self.seed, stream, index, j))
            for piece in pieces:
                piece.normal_(generator=generator)

        work = list(enumerate(self._segments))
        if device.type == "cpu" and torch.get_num_threads() > 1:
            # on the CPU the segments are drawn side by side (`normal_` with a generator runs on one
            # core); the threads run nothing but `normal_` on views made beforehand, so no other
            # thread pool wakes up in them and they allocate nothing
            if self._pool is None:
                self._pool = ThreadPoolExecutor(torch.get_num_threads())
            list(self._pool.map(lambda item: draw(*item), work))
        else:
            for item in work:
                draw(*item)

    def _sharded_direction(self, params, stream: str, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`_direction` under FSDP2: this process holds rows of each parameter (`self.rows`), a
        contiguous range of its flattened whole. Each piece is drawn whole, to keep the stream, and
        this process keeps its rows of it; the norm is that of the whole pieces."""
        device = params[0].device
        rows = [r if r and r.shape else None for r in (self.rows or [None] * len(params))]
        sizes = [math.prod(r.shape) if r else p.numel() for r, p in zip(rows, params)]
        held = [(r.start * (n // r.shape[0]), r.stop * (n // r.shape[0])) if r else (0, n) for r, n in zip(rows, sizes)]
        z = [torch.empty(local(p).shape if r else p.shape, device=device, dtype=torch.float32) for p, r in zip(params, rows)]
        squares = []
        for j, pieces in enumerate(segment_pieces(sizes, SEGMENTS)):
            generator = self._generator(j, device).manual_seed(direction_seed(self.seed, stream, index, j))
            for i, begin, end in pieces:
                piece = torch.empty(end - begin, device=device, dtype=torch.float32).normal_(generator=generator)
                lo, start, stop = held[i][0], max(held[i][0], begin), min(held[i][1], end)
                if start < stop:
                    z[i].view(-1)[start - lo : stop - lo].copy_(piece[start - begin : stop - begin])
                squares.append(torch.dot(piece, piece).to(device, torch.float64))
        return z, self.rho / (torch.stack(squares).sum().sqrt() + EPS)

    def _buffer_views(self, shapes: list[tuple], device) -> list[torch.Tensor]:
        """Float32 views of the run's buffer shaped as `shapes`, each starting on a 64-byte boundary
        (the padding between them stays zero). The buffer is made once, or again when the shapes
        change (allocating it every step costs time), with the views of its pieces per segment
        (`segment_pieces`) that `_draw` fills."""
        if self._layout != (shapes, device):
            self._buffer = self._views = self._segments = None  # (the old buffer goes before the new one is made)
            sizes = [math.prod(shape) for shape in shapes]
            starts = [0]
            for size in sizes:
                starts.append(starts[-1] + -(-size // ALIGN) * ALIGN)
            self._buffer = torch.zeros(starts[-1], device=device, dtype=torch.float32)
            flats = [self._buffer[start : start + size] for start, size in zip(starts, sizes)]
            self._views = [flat.view(shape) for flat, shape in zip(flats, shapes)]
            self._segments = [[flats[i][begin:end] for i, begin, end in pieces] for pieces in segment_pieces(sizes, SEGMENTS)]
            self._layout = (shapes, device)
        return list(self._views)

    def _generator(self, segment: int, device) -> torch.Generator:
        """This run's generator of `segment` on `device` (made once: building generators every step
        costs time)."""
        key = (segment, device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {"avg_sam_version": STATE_VERSION, "avg_sam_draws": str(self.draws)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.draws = int(meta["avg_sam_draws"])
