"""Run under `torchrun --nproc_per_node N`: trains TinyNet with FlatTrainer under FSDP2 on N CPU
processes (gloo) and saves, per rank, the micro-batches it saw and the whole weights it went through.

Usage: torchrun --nproc_per_node 2 tests/fsdp_train.py OUT_DIR RUN ...

A RUN is ``METHOD:GRAD_ACCUM:MAX_GRAD_NORM[:KEY=VALUE,...]`` as in tests/ddp_train.py, with the
harness's own keys:

- ``overflow=RANK@CALL``: an fp16 overflow on one process (a CPU `ShardedGradScaler`, as
  accelerate builds for FSDP with fp16 on GPUs);
- ``ddp=1``: the same run under DDP, for comparison;
- ``resume=STEP``: after training, train again in the same folder, resuming from checkpoint-STEP;
- ``resume_only=1`` (with ``resume``): do not train first; the checkpoint is already in the run's
  folder (`run_folder`), e.g. copied there from a run with another number of processes;
- ``eval=1``: evaluate every 2 steps (the averaged weights are swapped in and out);
- ``from_config=1``: no FSDP arguments; FSDP comes from the environment that ``accelerate launch
  --config_file examples/accelerate/fsdp.yaml`` sets up (the README's command);
- ``model=bert|gpt2|t5``: a tiny Hugging Face encoder classifier, decoder LM or seq2seq model
  (built from a config, dropout off) on random tokens, instead of TinyNet; FSDP wraps its layers.

**How FSDP runs on CPU here (test-only).** The Trainer turns FSDP on through accelerate, and
accelerate enables it only on accelerators: with ``use_cpu=True`` its `AcceleratorState` says
``MULTI_CPU`` and drops the FSDP plugin, so the run is DDP. `enable_fsdp_on_cpu` patches
`AcceleratorState.__init__` (nothing else) so that a state built with an FSDP plugin on CPU
processes says ``FSDP`` and keeps the plugin, as it does on GPUs. Everything after that is the
real code path: accelerate's `fsdp2_prepare_model` (``fully_shard``), its ``no_sync``,
``clip_grad_norm_`` and the Trainer's FSDP checkpoints (``SHARDED_STATE_DICT``).
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ddp_train import INIT_SCALE, OverflowNet, parse_run  # noqa: E402
from helpers import RecordingCollator, TinyData, TinyNet, sgd_args  # noqa: E402


def enable_fsdp_on_cpu():
    """Let accelerate run FSDP on CPU processes (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def whole(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` as a whole tensor (all-gathered from the shards:
    every rank must call this at the same point)."""
    from hf_flat.sharding import is_sharded, reshard

    reshard(model)
    state = {}
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        state[name] = (p.full_tensor() if is_sharded(p) else p).detach().clone()
    return state


def untied(model):
    """T5 with its own embedding per stack: FSDP2 (torch 2.13) refuses T5's one embedding shared by
    `shared`, the encoder and the decoder at its first forward pass, with or without hf-flat."""
    model.encoder.embed_tokens = copy.deepcopy(model.shared)
    model.decoder.embed_tokens = copy.deepcopy(model.shared)
    return model


#: model=... -> (its layer class for FSDP's wrap policy, how to build it, how to make a sample from a generator)
def hf_models():
    from transformers import (
        BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration,
    )

    def tokens(g, n=6):
        return torch.randint(3, 40, (n,), generator=g)

    return {
        "bert": ("BertLayer", lambda: BertForSequenceClassification(BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
            lambda g: {"input_ids": tokens(g), "labels": torch.randint(0, 3, (), generator=g)}),
        "gpt2": ("GPT2Block", lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)),
            lambda g: (lambda ids: {"input_ids": ids, "labels": ids.clone()})(tokens(g))),
        "t5": ("T5Block", lambda: untied(T5ForConditionalGeneration(T5Config(
            vocab_size=40, d_model=16, d_ff=24, d_kv=8, num_layers=1, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False))),
            lambda g: {"input_ids": tokens(g), "labels": tokens(g, 4)}),
    }


class TokenData(torch.utils.data.Dataset):
    def __init__(self, sample, n=32, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.samples = [sample(g) for _ in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def run_folder(run: str) -> str:
    """The name of a run's output folder (and of its result files)."""
    return run.replace(":", "_").replace("=", "-").replace(",", "_")


def main(out_dir, runs):
    from transformers import TrainerCallback

    from hf_flat import FlatTrainer
    from hf_flat.methods.mesa import SwapTeacher

    enable_fsdp_on_cpu()
    rank = int(os.environ["RANK"])

    class Recorder(TrainerCallback):
        def __init__(self):
            self.weights, self.scales, self.scaler, self.trainer = {}, {}, None, None
            self.average_bytes = self.restored_average = self.teacher_bytes = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            averaging = self.trainer.averaging
            if averaging is not None and averaging.average:  # resumed: the average as restored
                self.restored_average = {n: a.clone() for n, a in averaging.average.items()}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step] = whole(model)
            if self.scaler is not None:
                self.scales[state.global_step] = self.scaler.get_scale()
            averaging = self.trainer.averaging
            if averaging is not None and averaging.average:
                self.average_bytes = sum(a.nbytes for a in averaging.average.values())
            teacher = getattr(self.trainer.trajectory, "teacher", None)
            if teacher is not None:
                tensors = teacher.params.values() if isinstance(teacher, SwapTeacher) else teacher.parameters()
                self.teacher_bytes = sum(t.nbytes for t in tensors)

    def train(run, settings, resume_step=None):
        method, grad_accum, clip, _ = parse_run(run)
        settings = dict(settings)
        overflow = settings.pop("overflow", None)
        ddp = settings.pop("ddp", 0)
        evaluate = settings.pop("eval", 0)
        from_config = settings.pop("from_config", 0)
        model_name = settings.pop("model", None)
        layer, build, sample = hf_models()[model_name] if model_name else (None, None, None)
        torch.manual_seed(0)
        initial = build() if model_name else TinyNet()
        model = copy.deepcopy(initial)
        if overflow is not None:
            overflow_rank, overflow_call = map(int, overflow.split("@"))
            model = OverflowNet(overflow_call if rank == overflow_rank else 0)
            model.load_state_dict(initial.state_dict())
        collator, recorder = RecordingCollator(), Recorder()
        extra = dict(num_train_epochs=2, save_strategy="steps", save_steps=2)
        if method in ("swa", "ema", "lawa", "wasam") or "+" in method:
            extra.update(average_start=0.5, average_freq=1)
        if method == "saf":
            extra.update(saf_past_epochs=1, saf_start_epoch=1)
        if method.startswith("mesa"):
            extra.update(mesa_start_epoch=0, mesa_decay=0.9)
        if evaluate:
            extra.update(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
        if ddp:  # an FSDP run before leaves ACCELERATE_USE_FSDP and FSDP_* set, which would turn FSDP on again
            for key in [k for k in os.environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
                del os.environ[key]
        sharding = {} if ddp or from_config else dict(
            fsdp="full_shard",
            fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                         **({"transformer_layer_cls_to_wrap": [layer]} if layer else {})},
        )
        trainer = FlatTrainer(
            model=model,
            args=sgd_args(
                os.path.join(out_dir, run_folder(run)),
                flat_method=method, sam_rho=0.5, gradient_accumulation_steps=grad_accum, max_grad_norm=clip,
                ddp_backend="gloo", **sharding, **{**extra, **settings},
            ),
            train_dataset=TokenData(sample) if model_name else TinyData(n=32),
            eval_dataset=(TokenData(sample, n=8, seed=5) if model_name else TinyData(n=8, seed=5)) if evaluate else None,
            data_collator=collator,
            callbacks=[recorder],
        )
        recorder.trainer = trainer
        if overflow is not None:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10_000)
            trainer.accelerator.scaler = recorder.scaler = scaler
            trainer.accelerator.unscale_gradients = lambda optimizer=None: scaler.unscale_(trainer.optimizer.optimizer)
        checkpoint = None
        if resume_step is not None:
            checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{resume_step}")
        trainer.train(resume_from_checkpoint=checkpoint)
        from hf_flat.sharding import is_sharded

        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        return {
            "initial": initial.state_dict(),
            "final": whole(trainer.model),
            "batches": collator.batches,
            "global_step": trainer.state.global_step,
            "world_size": trainer.args.world_size,
            "sharded": all(is_sharded(p) for p in trainable),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "perturbed_loss": [h["perturbed_loss"] for h in trainer.state.log_history if "perturbed_loss" in h],
            "eval_loss": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
            "eval_avg_loss": [h["eval_avg_loss"] for h in trainer.state.log_history if "eval_avg_loss" in h],
            "live": recorder.weights,
            "scales": recorder.scales,
            "forward_calls": getattr(trainer.model, "calls", None),
            "overflows": getattr(trainer.model, "overflows", None),
            "average_bytes": recorder.average_bytes,
            "teacher_bytes": recorder.teacher_bytes,
            "whole_float32_bytes": sum(p.numel() * 4 for p in trainable),
            "restored_average": recorder.restored_average,
            "files": sorted(os.listdir(os.path.join(trainer.args.output_dir, "checkpoint-2")))
            if os.path.isdir(os.path.join(trainer.args.output_dir, "checkpoint-2")) else [],
        }

    for run in runs:
        settings = parse_run(run)[3]
        resume, resume_only = settings.pop("resume", None), settings.pop("resume_only", 0)
        result = {} if resume_only else {"run": train(run, settings)}
        if resume is not None:
            result["resumed"] = train(run, settings, resume)
        torch.save(result, os.path.join(out_dir, f"{run_folder(run)}.rank{rank}.pt"))


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
