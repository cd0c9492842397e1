"""SAF, Sharpness-Aware training for Free (Du et al., NeurIPS 2022, arXiv 2205.14083: Algorithm 1
lines 3-6 and eq. 9).

The target of a training sample is the logits the model produced for that same sample
`past_epochs` epochs earlier, recorded for free from the normal forward pass. The memory holds
`past_epochs` slots of float16 logits, one row per sample of `train_dataset`
(``past_epochs * N * C * 2`` bytes, in host memory), plus the epoch each row was written in, so a
row is only used when it really is from ``epoch - past_epochs``. The term can therefore first be
non-zero in epoch ``max(start_epoch, past_epochs)`` (epochs count from 0); if the run ends before,
nothing is allocated or recorded (`TrajectoryMethod.on_train_begin` warns).

Sample identity is the index in `train_dataset`: `IndexedDataset` adds it to each example and
`IndexedCollator` takes it out before the user's collator runs and puts it back into the batch,
so it survives column removal, custom collators and shuffling; `FlatTrainer` pops it before the
model's forward. Under several processes each step's (index, logits) pairs are gathered from all
ranks, so every rank can serve any sample in a later epoch.

**No host synchronisation in a step.** The memory stays in host memory, and a step never waits for
the device: the collator also hands over the batch's indices as a host tensor (`HostIndices`,
which no device placement moves), so targets are gathered on the host and copied to the device
without blocking (from pinned memory on a GPU); the step's logits are copied to pinned host
memory without blocking too, and written into the memory after the step (`flush`, at the end of
the next optimizer step, at each epoch's start, before a checkpoint and at the end of training),
always before an epoch that could read them.
"""

from collections.abc import Mapping

import torch
from transformers.utils import logging

from .trajectory import TrajectoryMethod, head_kind, student_logits, trajectory_loss

logger = logging.get_logger(__name__)

#: The batch key that carries each example's index in `train_dataset`.
INDEX_KEY = "__hf_flat_sample_index__"
#: The batch key that carries the same indices as a host tensor (`HostIndices`).
HOST_INDEX_KEY = "__hf_flat_sample_index_on_host__"


class HostIndices:
    """A batch's sample indices that stay in host memory: neither Accelerate's nor the Trainer's
    device placement moves an object that is not a tensor (and has no ``to``)."""

    def __init__(self, indices: torch.Tensor):
        self.indices = indices


class IndexedDataset(torch.utils.data.Dataset):
    """`dataset` whose examples (mappings: dicts, `BatchEncoding`s) also carry their index under
    `INDEX_KEY`, as plain dicts."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self._indexed(self.dataset[index], index)

    def __getitems__(self, indices):
        """A batch of examples in one call, as torch's DataLoader fetches them when the dataset can
        (a `datasets.Dataset` reads a whole batch at once: example by example, the fetch took a
        third of a small model's step)."""
        fetch = getattr(self.dataset, "__getitems__", None)
        examples = fetch(indices) if fetch else [self.dataset[i] for i in indices]
        return [self._indexed(example, i) for example, i in zip(examples, indices)]

    @staticmethod
    def _indexed(example, index):
        if not isinstance(example, Mapping):
            raise TypeError(
                f"flat_method='saf' needs examples that map names to values (a dict, as the Trainer uses), "
                f"got {type(example).__name__}."
            )
        return {**example, INDEX_KEY: index}


class IndexedCollator:
    """Runs `collator` on the examples without their index, then adds the indices to the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        indices = [f[INDEX_KEY] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
        batch[HOST_INDEX_KEY] = HostIndices(batch[INDEX_KEY].clone())
        return batch


class SAF(TrajectoryMethod):
    """The SAF memory and its trajectory loss (a `TrainerCallback`, for `on_train_begin`)."""

    prefix = "saf"

    def __init__(self, lam=0.3, tau=5.0, start_epoch=5, past_epochs=3):
        self.lam, self.tau, self.start_epoch, self.past_epochs = lam, tau, start_epoch, past_epochs
        self.logits = None  # (past_epochs, N, C) float16, on the CPU
        self.epochs = None  # (past_epochs, N) int32: the epoch each row was recorded in, -1 = never
        self._pending = []  # writes on their way to host memory: (step, event, slot, indices, logits, epoch)

    def first_epoch(self) -> int:
        """Targets come from ``epoch - past_epochs``, so none exists before epoch `past_epochs`."""
        return max(self.start_epoch, self.past_epochs)

    def binding_arguments(self) -> dict:
        names = {"saf_start_epoch": self.start_epoch, "saf_past_epochs": self.past_epochs}
        return {k: v for k, v in names.items() if v == self.first_epoch()}

    def release(self):
        self.logits = self.epochs = None
        self._pending = []

    def allocate(self, num_samples: int, num_classes: int):
        self.logits = torch.zeros(self.past_epochs, num_samples, num_classes, dtype=torch.float16)
        self.epochs = torch.full((self.past_epochs, num_samples), -1, dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        return 0 if self.logits is None else self.logits.nbytes + self.epochs.nbytes

    def term(self, trainer, seen, inputs, target=None):
        """The trajectory term for this training micro-batch of `trainer` (a flat trainer), from the
        model's outputs (`seen`, a `CapturedForward`); the targets come from the memory (`target` is unused)."""
        if not self.active:
            return None
        if seen.fused:
            raise ValueError(
                "flat_method='saf' records one row of logits per sample, but the model returned per-token "
                "log-probabilities (a language model under TRL). Use flat_method='mesa' for per-token outputs."
            )
        logits = student_logits(trainer, seen)
        indices = trainer._sample_indices
        if indices is None:
            raise ValueError(
                "flat_method='saf' found no sample indices in the batch: the training data loader must come "
                "from FlatTrainer.get_train_dataloader (do not override it), or use flat_method='mesa'."
            )
        if self.logits is None:
            self.allocate(len(trainer.train_dataset), logits.shape[-1])
            logger.info(f"SAF memory: {self.nbytes / 2**20:.1f} MB of host memory.")  # (information, not a warning)
        kind = head_kind(trainer.model, logits)
        host = trainer._sample_host_indices
        return self.loss(logits, indices, int(trainer.state.epoch or 0), trainer.accelerator.gather, kind,
                         host_indices=None if host is None else host.indices, step=trainer.state.global_step)

    def loss(self, logits, indices, epoch, gather, kind=None, host_indices=None, step=0):
        """Record this batch's logits (gathered from all processes) and return the trajectory term
        (``None`` before `start_epoch`). `host_indices`: `indices` in host memory (read from the
        device when not given); `step`: the optimizer step, for `flush`."""
        if logits.dim() != 2 or logits.shape[0] != indices.shape[0]:
            raise ValueError(
                f"flat_method='saf' records one row of logits per sample, but the model returns logits of "
                f"shape {tuple(logits.shape)} (one per token?). Use flat_method='mesa' for per-token outputs."
            )
        if self.logits is None:
            raise RuntimeError("SAF memory used before allocate()")
        slot = epoch % self.past_epochs  # holds epoch - past_epochs until overwritten below
        host_indices = indices.cpu() if host_indices is None else host_indices
        term = None
        if epoch >= self.start_epoch:
            has_target = _to_device(self.epochs[slot, host_indices] == epoch - self.past_epochs, logits.device)
            target = _to_device(self.logits[slot, host_indices], logits.device)
            term = trajectory_loss(logits, target, self.lam, self.tau, has_target=has_target, kind=kind)
        all_indices, all_logits = gather(indices), gather(logits.detach().to(torch.float16))
        on_host = [_to_host(all_indices), _to_host(all_logits)]
        event = None
        if all_logits.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending.append((step, event, slot, *on_host, epoch))
        return term

    def flush(self, before_step=None):
        """Write the logits copied to host memory into the memory (those of optimizer steps before
        `before_step`, or all): their copies were queued long before, so waiting for them costs
        nothing."""
        keep = []
        for step, event, slot, indices, logits, epoch in self._pending:
            if before_step is not None and step >= before_step:
                keep.append((step, event, slot, indices, logits, epoch))
                continue
            if event is not None:
                event.synchronize()
            self.logits[slot, indices] = logits
            self.epochs[slot, indices] = epoch
        self._pending = keep

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            self.flush(before_step=state.global_step - 1)  # the steps before this one (their copies are done)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._pending:
            self.flush()  # every row an epoch can read is in the memory before it starts

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending:
            self.flush()
        super().on_train_end(args, state, control, **kwargs)

    def state_dict(self):
        if self._pending:
            self.flush()
        if self.logits is None:
            return {}, {"saf_version": "1"}
        return {"saf.logits": self.logits, "saf.epochs": self.epochs}, {"saf_version": "1"}

    def load_state_dict(self, tensors, meta):
        if "saf.logits" in tensors:
            self.logits, self.epochs = tensors["saf.logits"], tensors["saf.epochs"]


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to `device` without the host waiting (from pinned memory on a GPU)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to pinned host memory without the host waiting (a CUDA event tells
    when it has arrived); a host tensor as it is."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
