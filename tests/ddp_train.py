"""Run under `torchrun --nproc_per_node 2`: trains TinyNet with FlatTrainer on 2 CPU processes
(gloo) and saves, per rank, the micro-batches it saw and the weights it ended with.

Usage: torchrun --nproc_per_node 2 tests/ddp_train.py OUT_DIR METHOD:GRAD_ACCUM:MAX_GRAD_NORM ...
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import RecordingCollator, TinyData, TinyNet, sgd_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_flat.trainer  # noqa: E402
from hf_flat import FlatTrainer  # noqa: E402

STATE_WRITES = []  # calls of save_flat_state on this rank
_save = hf_flat.trainer.save_flat_state
hf_flat.trainer.save_flat_state = lambda *a, **k: (STATE_WRITES.append(a[0]), _save(*a, **k))


class Recorder(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}


def main(out_dir, runs):
    rank = int(os.environ["RANK"])
    for run in runs:
        method, grad_accum, clip = run.split(":")
        initial = TinyNet()
        collator = RecordingCollator()
        recorder = Recorder()
        averaging = dict(num_train_epochs=2, average_start=0.5, average_freq=1, save_strategy="steps", save_steps=2)
        if method == "saf":  # epoch 1 reads the logits of epoch 0, recorded by whichever rank saw the sample
            averaging = dict(num_train_epochs=2, saf_past_epochs=1, saf_start_epoch=1)
        trainer = FlatTrainer(
            model=copy.deepcopy(initial),
            args=sgd_args(
                os.path.join(out_dir, run.replace(":", "_")),
                flat_method=method,
                sam_rho=0.5,
                gradient_accumulation_steps=int(grad_accum),
                max_grad_norm=float(clip),
                ddp_backend="gloo",
                **(averaging if method in ("swa", "ema", "wasam", "saf") or "+" in method else {}),
            ),
            train_dataset=TinyData(n=32),
            data_collator=collator,
            callbacks=[recorder],
        )
        STATE_WRITES.clear()
        found = []  # SAF: (epoch, indices, samples with a past target) per micro-batch
        if method == "saf":  # wraps the SAF object of the run: train() builds it when training starts

            class RecordSafLookups(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    saf = trainer.trajectory
                    saf_loss = saf.loss

                    def recording_loss(logits, indices, epoch, gather, kind=None):
                        slot = epoch % saf.past_epochs
                        if saf.logits is not None:
                            has = (saf.epochs[slot, indices.cpu()] == epoch - 1).sum().item()
                            found.append((epoch, indices.tolist(), has))
                        return saf_loss(logits, indices, epoch, gather, kind)

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
                "perturbed_loss": [h["perturbed_loss"] for h in trainer.state.log_history if "perturbed_loss" in h],
                "live": recorder.weights,
                "state_writes": len(STATE_WRITES),
                "saf_found": found,
                "saf_epochs": trainer.trajectory.epochs if method == "saf" else None,
                "saf_logits": trainer.trajectory.logits if method == "saf" else None,
            },
            os.path.join(out_dir, f"{run.replace(':', '_')}.rank{rank}.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
