"""The flat state of a checkpoint: what hf-flat's methods must carry across a resume.

Every checkpoint folder of a run with stateful methods (an average, SAF's memory, MESA's teacher,
average SAM's count of directions) holds ``hf_flat_state.safetensors``: safetensors, so it loads
without running code. Each part's metadata carries a layout version, checked on load.

**Sharded training** (FSDP2): the average and the teacher are kept per process, for the rows of
each parameter that the process holds (`hf_flat.sharding`). Each process then writes its rows to
``hf_flat_state-shard-RRRRR-of-WWWWW.safetensors``, with the rows each tensor covers in its
metadata, and after all have written, the main process writes ``hf_flat_state.safetensors`` with
the rest and the list of shard files. Every file is written atomically (a temporary file, then a
rename), and the main file last: if it is there, the checkpoint's flat state is complete.

Rows are stored by their place in the whole tensor, so a checkpoint can be read in any layout: a
run with another number of processes, or without FSDP, takes the rows it needs from whichever
files hold them (`FlatState.rows`), reading only those rows from disk.
"""

import json
import os
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .sharding import Rows, ShardedTensor, shard_of

#: The layout of the file: "1", one file; "2", a main file and shard files (which an hf-flat without sharded training refuses).
STATE_VERSION, SHARDED_STATE_VERSION = "1", "2"

#: The layout versions of each part of the flat state file that this hf-flat reads.
READABLE_VERSIONS = {"hf_flat_state_version": (STATE_VERSION, SHARDED_STATE_VERSION), "averaging_version": ("1",),
                     "saf_version": ("1",), "mesa_version": ("1",), "avg_sam_version": ("1",),
                     "looksam_version": ("1",), "esam_version": ("1",)}


def shard_file_name(main_name: str, index: int, count: int) -> str:
    """``hf_flat_state.safetensors`` -> ``hf_flat_state-shard-00001-of-00002.safetensors``."""
    stem, extension = os.path.splitext(main_name)
    return f"{stem}-shard-{index:05d}-of-{count:05d}{extension}"


def is_sharded_state(parts) -> bool:
    """Whether any part (`(tensors, metadata)` pairs) holds a process's rows of a sharded tensor."""
    return any(isinstance(v, ShardedTensor) for tensors, _ in parts for v in tensors.values())


def _write(path, tensors, meta):
    temporary = f"{path}.tmp"
    save_file(tensors, temporary, metadata=meta)
    os.replace(temporary, path)


def save_shard_file(path, parts, index: int, count: int):
    """Write this process's rows of the sharded tensors of `parts` next to the main file `path`."""
    tensors, rows = {}, {}
    for part_tensors, _ in parts:
        for key, value in part_tensors.items():
            if isinstance(value, ShardedTensor):
                tensors[key] = value.tensor.detach().cpu().contiguous()
                rows[key] = [value.rows.start, value.rows.stop, list(value.rows.shape)]
    folder, name = os.path.split(path)
    _write(os.path.join(folder, shard_file_name(name, index, count)), tensors, {"rows": json.dumps(rows)})


def save_flat_state(path, parts, flat_method=None, shards: int | None = None):
    """Write the state of every flat component (`(tensors, metadata)` pairs) to `path`, atomically.
    With `shards`, the sharded tensors are in that many shard files (`save_shard_file`, written
    before) and `path` lists them."""
    tensors, meta = {}, {"hf_flat_state_version": STATE_VERSION}
    if flat_method is not None:
        meta["flat_method"] = str(flat_method)
    for part_tensors, part_meta in parts:
        tensors.update({k: v for k, v in part_tensors.items() if not isinstance(v, ShardedTensor)})
        meta.update(part_meta)
    if shards:
        meta["hf_flat_state_version"] = SHARDED_STATE_VERSION
        name = os.path.basename(path)
        meta["shard_files"] = json.dumps([shard_file_name(name, i, shards) for i in range(shards)])
    _write(path, tensors, meta)


class FlatState(Mapping):
    """The tensors of a flat state file (and its shard files), read on demand.

    ``state[key]`` is the whole tensor; ``state.rows(key, rows)`` only the rows `rows` of it, read
    from the files that hold them. ``state.shape(key)`` is the whole tensor's shape.
    """

    def __init__(self, path: str, tensors: dict[str, torch.Tensor], shard_files: list[str]):
        self.path, self._tensors = path, tensors
        self._where: dict[str, list[tuple[str, int, int]]] = {}  # key -> (file, start, stop) of its rows
        self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        folder = os.path.dirname(path)
        for name in shard_files:
            file = os.path.join(folder, name)
            try:
                with safe_open(file, framework="pt") as f:
                    rows = json.loads((f.metadata() or {})["rows"])
            except Exception as error:  # missing, damaged, or not a shard file
                raise ValueError(
                    f"{path} lists the shard file {name}, which cannot be read ({error}): the checkpoint is "
                    "incomplete; resume from another checkpoint."
                ) from error
            for key, (start, stop, shape) in rows.items():
                self._where.setdefault(key, []).append((file, start, stop))
                self._shapes[key] = tuple(shape)

    def __iter__(self):
        return iter([*self._tensors, *(k for k in self._where if k not in self._tensors)])

    def __len__(self):
        return len(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key) -> tuple[int, ...]:
        return self._shapes[key]

    def __getitem__(self, key) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        shape = self._shapes[key]  # KeyError for a key the file does not hold
        return self.rows(key, Rows(0, shape[0] if shape else 1, shape))

    def rows(self, key, rows: Rows) -> torch.Tensor:
        """Rows ``[rows.start, rows.stop)`` of the whole tensor `key` (all of it for a 0-d tensor)."""
        if key in self._tensors:
            return shard_of(self._tensors[key], rows).clone()
        blocks, at = [], rows.start
        for file, start, stop in sorted(self._where[key], key=lambda w: w[1]):
            if stop <= at or start >= rows.stop:
                continue
            if start > at:
                break
            end = min(stop, rows.stop)
            with safe_open(file, framework="pt") as f:
                blocks.append(f.get_slice(key)[at - start : end - start])
            at = end
            if at == rows.stop:
                break
        if at < rows.stop and rows.stop > rows.start:
            raise ValueError(f"{self.path}: no shard file holds rows {at}-{rows.stop} of {key}.")
        if not blocks:
            full = self._shapes[key]
            return torch.empty((0, *full[1:]))
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def load_flat_state(path) -> tuple[FlatState, dict[str, str]]:
    """The tensors (a `FlatState`) and metadata of a flat state file, after checking that this
    hf-flat can read every part of it (its version keys); a damaged or foreign file is a clear error."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} cannot be read as a flat state file ({error}): resume from another checkpoint.") from error
    for key, value in meta.items():
        if key.endswith("_version") and value not in READABLE_VERSIONS.get(key, ()):
            readable = READABLE_VERSIONS.get(key)
            raise ValueError(
                f"{path} holds {key}={value!r}, which this hf-flat cannot read"
                + (f" (it reads versions {', '.join(map(repr, readable))})" if readable else " (a part it does not know)")
                + ": resume with the hf-flat version that wrote the checkpoint."
            )
    return FlatState(path, tensors, json.loads(meta.get("shard_files", "[]"))), meta


def rows_of_state(tensors, key, rows: Rows) -> torch.Tensor:
    """`FlatState.rows` for a `FlatState` or a plain dict of whole tensors."""
    if isinstance(tensors, FlatState):
        return tensors.rows(key, rows)
    return shard_of(tensors[key], rows)


def shape_in_state(tensors, key) -> tuple[int, ...]:
    """The whole shape of tensor `key` in a `FlatState` or a plain dict of whole tensors."""
    return tensors.shape(key) if isinstance(tensors, FlatState) else tuple(tensors[key].shape)
