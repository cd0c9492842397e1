"""Step time and peak memory of the plain Trainer and of each flat method, in one run.

Every method trains the same small RoBERTa classifier (built from a config, random tokens) in
fresh child processes: one times the steps, one (a few steps long) reads the peak memory, so
each reading is its own. The table gives the median
optimizer-step time, its ratio to the plain `transformers.Trainer` measured in the same run, and
the memory each method needs beyond the plain Trainer, in MB and in copies of the trainable
weights. On CUDA the memory is `torch.cuda.max_memory_allocated`; on CPU the peak resident set
size (`ru_maxrss`) minus the resident size just before `train()`, with glibc's mmap threshold
fixed so that freed tensors leave the resident set at once (that slows allocation, which is why
the timing runs in another process).

    python benchmarks/step_time.py                 # CPU or the first GPU, default sizes
    python benchmarks/step_time.py --steps 40 --hidden 768 --layers 6 --batch 32 --fp16
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

#: name -> FlatTrainingArguments overrides; "plain" is transformers.Trainer itself.
PRESETS = {
    "plain": None,
    "none": {"flat_method": "none"},
    "sam": {"flat_method": "sam"},
    "asam": {"flat_method": "asam", "sam_rho": 0.5},
    "swa": {"flat_method": "swa", "average_start": 0.0},  # one snapshot per epoch
    "swa_every_step": {"flat_method": "swa", "average_start": 0.0, "average_freq": 1},
    "ema": {"flat_method": "ema", "average_start": 0.0},
    "wasam": {"flat_method": "wasam", "average_start": 0.0},
    # the trajectory term is on from the second epoch (SAF) / the first step (MESA)
    "saf": {"flat_method": "saf", "saf_start_epoch": 1, "saf_past_epochs": 1},
    "mesa": {"flat_method": "mesa", "mesa_start_epoch": 0},
}
METHODS = list(PRESETS)


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="'plain' is transformers.Trainer")
    parser.add_argument("--epoch_steps", type=int, default=5, help="optimizer steps per epoch (SWA snapshots)")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps timed (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="roberta", choices=["roberta", "vit"],
                        help="roberta: random tokens, --seq long; vit: random 224x224 images, patch 16 (ViT-B/16 at "
                        "--hidden 768 --layers 12)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions; the fastest counts")
    parser.add_argument("--memory_steps", type=int, default=4, help="steps of the memory-reading run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    return parser.parse_args()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(opts):
    """Train with one method in this process and print a JSON line with the measurements."""
    import torch
    from transformers import (
        RobertaConfig, RobertaForSequenceClassification, Trainer, TrainerCallback, ViTConfig, ViTForImageClassification,
    )

    from hf_flat import FlatTrainer, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(5, opts.vocab, (n, opts.seq), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] % 2)}

    class Images(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.pixels = torch.randn(n, 3, 224, 224, generator=g)

        def __len__(self):
            return len(self.pixels)

        def __getitem__(self, i):
            return {"pixel_values": self.pixels[i], "labels": i % 10}

    torch.manual_seed(0)
    sizes = dict(hidden_size=opts.hidden, num_hidden_layers=opts.layers, num_attention_heads=max(1, opts.hidden // 64),
                 intermediate_size=4 * opts.hidden)
    if opts.model == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, num_labels=10, **sizes))
        Data = Images
    else:
        config = RobertaConfig(vocab_size=opts.vocab, max_position_embeddings=opts.seq + 2, num_labels=2, **sizes)
        model = RobertaForSequenceClassification(config)
        Data = Tokens
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    steps = opts.warmup + opts.steps if opts.measure == "time" else opts.memory_steps
    flat = PRESETS[opts.child] or {}
    args_cls = TrainingArguments if flat else __import__("transformers").TrainingArguments
    args = args_cls(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=1e-4, save_strategy="no",
        logging_steps=10, report_to="none", disable_tqdm=True, fp16=opts.fp16, bf16=opts.bf16,
        dataloader_num_workers=0, seed=0, **flat,
    )
    timer = Timer()
    trainer_cls = FlatTrainer if flat else Trainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Data(opts.epoch_steps * opts.batch * opts.grad_accum),
        callbacks=[timer],
    )
    # Time spent in the method's own per-step work, measured inside the run: the averaging
    # update, SAF's / MESA's trajectory term (MESA: the teacher's forward) and MESA's EMA update.
    own_seconds = [0.0]

    def timed(function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = function(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            own_seconds[0] += time.perf_counter() - start
            return result

        return wrapper

    class TimeTheMethods(TrainerCallback):
        """Wraps the method objects of this run: `train()` builds them when training starts."""

        def on_train_begin(self, args, state, control, **kwargs):
            if getattr(trainer, "averaging", None) is not None:
                trainer.averaging.on_step_end = timed(trainer.averaging.on_step_end)
            if getattr(trainer, "trajectory", None) is not None:
                trainer.trajectory.term = timed(trainer.trajectory.term)
                if hasattr(trainer.trajectory, "on_step_end"):
                    trainer.trajectory.on_step_end = timed(trainer.trajectory.on_step_end)

    trainer.add_callback(TimeTheMethods())
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if opts.measure == "memory":
        print("RESULT " + json.dumps({"peak_extra_mb": peak - before}))
        return
    times = [b - a for a, b in zip(timer.ends[opts.warmup - 1 :], timer.ends[opts.warmup :])]
    print("RESULT " + json.dumps({
        **({"peak_extra_mb": peak - before} if cuda else {}),  # on CUDA the timing run's own peak is exact
        "method": opts.child,
        "step_ms": 1000 * statistics.median(times),
        "saf_memory_mb": trainer.trajectory.nbytes / 2**20 if hasattr(getattr(trainer, "trajectory", None), "nbytes") else None,
        "own_work_ms_per_step": 1000 * own_seconds[0] / steps,
        "trainable_mb": trainable,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }))


def child(opts, method, measure, **env):
    argv = [a for a in sys.argv[1:] if a != "--output" and a != opts.output]
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", method, "--measure", measure],
        capture_output=True, text=True, check=False, env={**os.environ, **env},
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def main():
    opts = parse()
    if opts.child:
        return run_one(opts)
    # Round-robin over the methods, `--rounds` times; each method keeps its fastest round (the
    # one least disturbed by whatever else the machine was doing).
    runs = {method: [] for method in opts.methods}
    for round_ in range(opts.rounds):
        for method in opts.methods:
            runs[method].append(child(opts, method, "time"))
            print(f"  round {round_ + 1}, {method}: {runs[method][-1]['step_ms']:.1f} ms/step", file=sys.stderr)
    results = []
    for method, method_runs in runs.items():
        best = min(method_runs, key=lambda r: r["step_ms"])
        best["all_rounds_ms"] = [r["step_ms"] for r in method_runs]
        if best["device"].startswith("CPU"):
            # a fixed mmap threshold makes glibc return every large freed block at once, so the
            # resident size follows the live tensors and ru_maxrss is a true peak
            best.update(child(opts, method, "memory", MALLOC_MMAP_THRESHOLD_="65536"))
        elif "peak_extra_mb" not in best:
            best.update(child(opts, method, "memory"))
        results.append(best)

    base = next((r for r in results if r["method"] == "plain"), results[0])
    shape = f"seq={opts.seq}" if opts.model == "roberta" else "224x224 images, patch 16"
    print(f"\nDevice: {base['device']}, torch {base['torch']}; {opts.model} hidden={opts.hidden} layers={opts.layers} "
          f"{shape} batch={opts.batch} grad_accum={opts.grad_accum}"
          f"{' fp16' if opts.fp16 else ''}{' bf16' if opts.bf16 else ''}; trainable weights {base['trainable_mb']:.1f} MB; "
          f"median of {opts.steps} steps, fastest of {opts.rounds} rounds\n")
    print("| method | step time (ms) | vs plain Trainer | method's own work per step (ms, % of plain step) "
          "| peak memory over plain (MB) | in copies of the trainable weights |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["ratio"] = r["step_ms"] / base["step_ms"]
        r["extra_over_plain_mb"] = r["peak_extra_mb"] - base["peak_extra_mb"]
        r["extra_copies"] = r["extra_over_plain_mb"] / r["trainable_mb"]
        own = r["own_work_ms_per_step"]
        own = f"{own:.2f} ({100 * own / base['step_ms']:.2f}%)" if own else "-"
        print(f"| {r['method']} | {r['step_ms']:.1f} | {r['ratio']:.2f}x | {own} "
              f"| {r['extra_over_plain_mb']:+.1f} | {r['extra_copies']:+.2f} |")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump({"options": vars(opts), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
