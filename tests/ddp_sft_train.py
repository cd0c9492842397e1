"""Run under `torchrun --nproc_per_node 2`: TRL's SFTTrainer with hf-flat's WASAM on a tiny Llama,
2 CPU processes (gloo). Each rank saves the micro-batches its SFT loss saw (pass 1, with the
`num_items_in_batch` the Trainer gave), its weights after each optimizer step and at the end.

Usage: torchrun --nproc_per_node 2 tests/ddp_sft_train.py OUT_DIR
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import LM_TEXTS, tiny_llama, tiny_lm_tokenizer  # noqa: E402

STEPS, RHO, LR = 3, 0.1, 0.5


def settings(output_dir, config_class, **overrides):
    """The arguments of the run (also the reference's helper trainer's, with a plain SFTConfig)."""
    values = dict(output_dir=output_dir, optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=0.0, per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    values.update(overrides)
    return config_class(**values)


def main(out_dir):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_flat import flat_arguments_class, flat_trainer_class

    class Recorder(TrainerCallback):
        def __init__(self):
            self.after = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.after.append({n: p.detach().clone() for n, p in model.named_parameters()})

    rank = int(os.environ["RANK"])
    initial = tiny_llama()
    recorder = Recorder()
    args = settings(os.path.join(out_dir, "wasam"), flat_arguments_class(SFTConfig), flat_method="wasam", sam_rho=RHO,
                    average_start=0.5, average_freq=1, ddp_backend="gloo")
    trainer = flat_trainer_class(SFTTrainer)(model=copy.deepcopy(initial), args=args,
                                             train_dataset=Dataset.from_dict({"text": LM_TEXTS}),
                                             processing_class=tiny_lm_tokenizer(), callbacks=[recorder])
    calls, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            items = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            calls.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, items))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    trainer.train()
    torch.save({"initial": initial.state_dict(), "final": {n: p.detach() for n, p in trainer.model.named_parameters()},
                "calls": calls, "after": recorder.after, "world_size": trainer.args.world_size,
                "average_tokens_across_devices": trainer.args.average_tokens_across_devices},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # (as tests/ddp_train.py: leave without the interpreter's shutdown)
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
