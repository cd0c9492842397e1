"""What the flat methods need to work on FSDP2's sharded parameters.

Under FSDP2 (``fsdp`` with ``fsdp_config={"version": 2}``, the default of transformers 5) every
parameter is a `DTensor` sharded along its first dimension: process ``r`` of ``W`` holds rows
``[r * c, min((r + 1) * c, n))`` of a parameter with ``n`` rows, ``c = ceil(n / W)`` (torch.chunk's
rule; HSDP's replica groups each hold the same split). ``p.to_local()`` is that block, a view into
the storage the optimizer updates in place; the flat methods work on it directly:

- an average (SWA, EMA) or the MESA teacher is kept for the local rows only, updated with no
  communication;
- a perturbation ``w + e`` is added to the local rows; the next forward all-gathers it;
- a norm over all parameters is the square root of the all-reduced sum of the shards' squares.

FSDP2 keeps a module's all-gathered (unsharded) parameters after a forward pass that is not
followed by a backward one (the root module always, in evaluation): such a module reads neither
the sharded values nor changes to them. `reshard` hands every module back its shards; call it
before the local rows are written or `named_parameters()` is read.
"""

import math
from typing import NamedTuple

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch without torch.distributed
    DTensor = Replicate = Shard = None


class Rows(NamedTuple):
    """Rows ``[start, stop)`` of a tensor whose whole has `shape`."""

    start: int
    stop: int
    shape: tuple[int, ...]


class ShardedTensor(NamedTuple):
    """A process's rows of a sharded tensor, as a method hands it over for a checkpoint."""

    tensor: torch.Tensor
    rows: Rows


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The process's block of a `DTensor` (a view into its storage); any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def reshard(model: nn.Module):
    """Reshard every FSDP2 module of `model` (a no-op for an unsharded model): afterwards each module
    reads its parameters from the shards again, and `named_parameters()` yields the sharded ones."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_dim(tensor) -> int | None:
    """The mesh dimension along which a `DTensor` is split by its first dimension (None: a plain
    tensor). Only FSDP2's layouts are accepted: ``Shard(0)`` on one mesh dimension, ``Replicate``
    on the others (HSDP)."""
    if not is_sharded(tensor):
        return None
    dims = [i for i, p in enumerate(tensor.placements) if isinstance(p, Shard) and p.dim == 0]
    others = [p for i, p in enumerate(tensor.placements) if i not in dims]
    if len(dims) != 1 or not all(isinstance(p, Replicate) for p in others):
        raise ValueError(
            f"hf-flat works on FSDP2 parameters split along their first dimension (placements (Shard(0),) or "
            f"(Replicate(), Shard(0))), not {tensor.placements}: leave fully_shard's shard_placement_fn unset."
        )
    return dims[0]


def rows_of(tensor) -> Rows:
    """The rows of the whole tensor that this process holds (all of them for a plain tensor)."""
    shape = tuple(tensor.shape)
    dim = shard_dim(tensor)
    if dim is None or not shape:
        return Rows(0, shape[0] if shape else 1, shape)
    size, index = tensor.device_mesh.size(dim), tensor.device_mesh.get_local_rank(dim)
    chunk = math.ceil(shape[0] / size)
    start, stop = min(index * chunk, shape[0]), min((index + 1) * chunk, shape[0])
    held = tensor.to_local().shape[0]
    if held != stop - start:  # FSDP2 changed its rule: fail loudly rather than mix up rows
        raise RuntimeError(
            f"A parameter of shape {shape} split over {size} processes holds {held} rows on process {index}, "
            f"not the {stop - start} of torch.chunk's rule that hf-flat expects; please report this."
        )
    return Rows(start, stop, shape)


def shard_group(tensors):
    """The process group over which `tensors` (DTensors) are split, or None if none is sharded."""
    for t in tensors:
        dim = shard_dim(t)
        if dim is not None:
            return t.device_mesh.get_group(dim)
    return None


def sum_over_shards(value: torch.Tensor, group) -> torch.Tensor:
    """The sum of a per-process 0-dim tensor over the processes of `group`, all-reduced on the
    tensor's device (read by no one on the host); `value` itself when `group` is None. Pass squares
    of norms in float64, so that they do not overflow."""
    if group is None:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total, group=group)
    return total


def shard_of(whole: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows `rows` of `whole` (a view)."""
    return whole if not rows.shape else whole[rows.start : rows.stop]
