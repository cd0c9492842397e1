"""Run under `torchrun --nproc_per_node 2`: trains TinyNet with FlatTrainer on 2 CPU processes
(gloo) and saves, per rank, the micro-batches it saw and the weights it ended with.

Usage: torchrun --nproc_per_node 2 tests/ddp_train.py OUT_DIR RUN ...

A RUN is ``METHOD:GRAD_ACCUM:MAX_GRAD_NORM``, optionally followed by ``:KEY=VALUE,KEY=VALUE...``
(see `parse_run`): training arguments such as ``sam_scope=step,sam_interval=2``, and the harness's
own ``overflow=RANK@CALL``: a CPU GradScaler (as accelerate builds for fp16 on a GPU), and on
process RANK the training forward call number CALL (1-based, counted on that process) returns its
loss x 1e36, so that its backward overflows float32 once the loss is scaled.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import RecordingCollator, TinyData, TinyNet, sgd_args  # noqa: E402

# (transformers' Trainer and hf_flat are imported in `main`: tests/test_ddp.py imports `parse_run`
# from here, and its process has no use for them)

STATE_WRITES = []  # calls of save_flat_state on this rank
INIT_SCALE = 2.0**14  # runs with `overflow`: the GradScaler's initial loss scale


def parse_run(run):
    """``"METHOD:GRAD_ACCUM:MAX_GRAD_NORM[:KEY=VALUE,...]"`` -> ``(method, grad_accum, clip, settings)``;
    a value is read as an int, else a float, else kept as a string."""
    method, grad_accum, clip, *rest = run.split(":")
    settings = {}
    for item in rest[0].split(",") if rest else []:
        key, value = item.split("=")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        settings[key] = value
    return method, int(grad_accum), float(clip), settings


class OverflowNet(TinyNet):
    """TinyNet whose training forward call number `overflow_call` returns its loss x 1e36 (finite;
    times the loss scale its backward is inf). 0: never."""

    def __init__(self, overflow_call):
        super().__init__()
        self.overflow_call, self.calls, self.overflows = overflow_call, 0, 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.calls += 1
            if self.calls == self.overflow_call:
                self.overflows += 1
                return {**out, "loss": out["loss"] * 1e36}
        return out


def main(out_dir, runs):
    from transformers import TrainerCallback

    import hf_flat.trainer
    from hf_flat import FlatTrainer

    save = hf_flat.trainer.save_flat_state
    hf_flat.trainer.save_flat_state = lambda *a, **k: (STATE_WRITES.append(a[0]), save(*a, **k))

    class Recorder(TrainerCallback):
        def __init__(self):
            self.weights = {}
            self.scales = {}
            self.scaler = None  # set for runs with a GradScaler

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}
            if self.scaler is not None:
                self.scales[state.global_step] = self.scaler.get_scale()

    rank = int(os.environ["RANK"])
    for run in runs:
        method, grad_accum, clip, settings = parse_run(run)
        overflow = settings.pop("overflow", None)
        initial = TinyNet()
        model = copy.deepcopy(initial)
        if overflow is not None:
            overflow_rank, overflow_call = map(int, overflow.split("@"))
            model = OverflowNet(overflow_call if rank == overflow_rank else 0)
            model.load_state_dict(initial.state_dict())
        collator = RecordingCollator()
        recorder = Recorder()
        averaging = dict(num_train_epochs=2, average_start=0.5, average_freq=1, save_strategy="steps", save_steps=2)
        if method == "saf":  # epoch 1 reads the logits of epoch 0, recorded by whichever rank saw the sample
            averaging = dict(num_train_epochs=2, saf_past_epochs=1, saf_start_epoch=1)
        trainer = FlatTrainer(
            model=model,
            args=sgd_args(
                os.path.join(out_dir, run.replace(":", "_")),
                flat_method=method,
                sam_rho=0.5,
                gradient_accumulation_steps=grad_accum,
                max_grad_norm=clip,
                ddp_backend="gloo",
                **(averaging if method in ("swa", "ema", "wasam", "saf") or "+" in method else {}),
                **settings,
            ),
            train_dataset=TinyData(n=32),
            data_collator=collator,
            callbacks=[recorder],
        )
        if overflow is not None:  # as tests/test_precision.py `scaler_trainer`
            scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10_000)
            trainer.accelerator.scaler = recorder.scaler = scaler
            trainer.accelerator.unscale_gradients = lambda optimizer=None: scaler.unscale_(trainer.optimizer.optimizer)
        STATE_WRITES.clear()
        found = []  # SAF: (epoch, indices, samples with a past target) per micro-batch
        if method == "saf":  # wraps the SAF object of the run: train() builds it when training starts

            class RecordSafLookups(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    saf = trainer.trajectory
                    saf_loss = saf.loss

                    def recording_loss(logits, indices, epoch, gather, kind=None, **host):
                        slot = epoch % saf.past_epochs
                        if saf.logits is not None:
                            has = (saf.epochs[slot, indices.cpu()] == epoch - 1).sum().item()
                            found.append((epoch, indices.tolist(), has))
                        return saf_loss(logits, indices, epoch, gather, kind, **host)

                    saf.loss = recording_loss

            trainer.add_callback(RecordSafLookups())
        trainer.train()
        torch.save(
            {
                "initial": initial.state_dict(),
                "final": trainer.model.state_dict(),
                "batches": collator.batches,
                "global_step": trainer.state.global_step,
                "world_size": trainer.args.world_size,
                "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "perturbed_loss": [h["perturbed_loss"] for h in trainer.state.log_history if "perturbed_loss" in h],
                "live": recorder.weights,
                "scales": recorder.scales,
                "forward_calls": getattr(trainer.model, "calls", None),
                "overflows": getattr(trainer.model, "overflows", None),
                "state_writes": len(STATE_WRITES),
                "saf_found": found,
                "saf_epochs": trainer.trajectory.epochs if method == "saf" else None,
                "saf_logits": trainer.trajectory.logits if method == "saf" else None,
            },
            os.path.join(out_dir, f"{run.replace(':', '_')}.rank{rank}.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    # Every rank has saved its results; leave without the interpreter's shutdown. In the full suite
    # (not alone) a process sometimes died there with "terminate called without an active
    # exception" (exit code -6), with or without destroy_process_group(), after every run had
    # finished and saved: a C++ thread of torch.distributed destroyed at exit. os._exit skips that.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
