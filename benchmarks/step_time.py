"""Step time and peak memory of the plain Trainer and of each flat method, in one run.

Every method trains the same small RoBERTa classifier (built from a config, random tokens) in
fresh child processes: one times the steps, one (a few steps long) reads the peak memory, so
each reading is its own. The table gives the median optimizer-step time, the mean over the whole
timed run, the ratio to the plain `transformers.Trainer` measured in the same run, and the memory
each method needs beyond the plain Trainer, in MB and in copies of the trainable weights. On CUDA
the memory is `torch.cuda.max_memory_allocated`; on CPU the peak resident set size (`ru_maxrss`)
minus the resident size just before `train()`, with glibc's mmap threshold fixed so that freed
tensors leave the resident set at once (that slows allocation, which is why the timing run is
another process).

**The timed run.** Each timing process first trains `--warmup` untimed steps with a Trainer of
its own (same method, same model), which warms up the thread pools, the allocator and every code
path of the method; it then builds a fresh Trainer with ``max_steps = --steps`` (T) and times all
T of its optimizer steps, from the first step's ``on_step_begin`` to the last step's
``on_step_end`` (the whole run), and each step on its own. Because the timed run *is* a whole run
of T steps, a schedule (``sam_start``, ``sam_interval``) is laid over exactly the timed steps, as
it would be over a real run of T steps, and no warmup step is counted or shifts the schedule.

**Which time the ratio uses.** For a setting that perturbs every step the ratio is the median
step time over the plain Trainer's median (robust to an occasional disturbed step). For a
schedule (``sam_start > 0`` or ``sam_interval > 1``) the median is meaningless (most steps are
plain steps), so the ratio is the whole-run time over the plain Trainer's whole-run time; with
``sam_interval = k`` T must be a multiple of k (the script refuses otherwise) so the run holds
whole intervals. ``sam_start = f`` perturbs steps ``max(1, ceil(f * T))`` to T, i.e.
``floor((1 - f) * T) + 1`` steps: 5 of T = 20 (25%), 21 of T = 100 (21%); the table gives the count.

**Noise.** The presets run round-robin, `--rounds` times, each in a fresh process; each keeps its
fastest round (the least disturbed one), and the ratios use those. The table also gives every
round's time and, for the targets, each round's ratio to the baseline's run of the same round,
with their median: a second estimate, and a view of how much the machine's load moved them.

**Memory.** A separate short run of ``--memory_steps`` steps (at least ``sam_interval + 1``, so that
a perturbed step comes after the first optimizer step, once AdamW's state exists) reads the peak.

**Gradient accumulation per preset.** A preset may fix its own ``grad_accum`` (``sam_step`` and
``sam_micro_ga`` use ``--step_grad_accum``, default 2, because ``sam_scope="step"`` equals
``"micro"`` without accumulation); every other preset uses ``--grad_accum``. Each ratio is taken
against the plain Trainer run at the same accumulation, which the script adds to the run when it
is not listed (``plain_ga`` is that baseline). Under ``sam_scope="step"`` the table also gives
the size of the inputs the step's window holds (`TwoPassMethod._window`); note that the plain
Trainer (transformers >= 4.46) prefetches every micro-batch of an optimizer step too, so those
inputs are alive in the plain run as well.

**Targets.** Presets with a target (`TARGETS`: the issue's table for the where-and-when settings)
get a second table: ratio, target, pass/fail and the extra memory. ``--methods sam_settings`` runs
those presets with their references (plain, sam, plain_ga, sam_micro_ga).

    python benchmarks/step_time.py                 # CPU or the first GPU, default sizes
    python benchmarks/step_time.py --steps 40 --hidden 768 --layers 6 --batch 32 --fp16
    python benchmarks/step_time.py --methods sam_settings --steps 20 --markdown results.md --output results.json
"""

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

#: name -> FlatTrainingArguments overrides (or a function of the options giving them). A preset
#: without "flat_method" is transformers.Trainer itself. "grad_accum" is the preset's own
#: gradient accumulation (default: --grad_accum); it never reaches the arguments.
PRESETS = {
    "plain": {},
    "none": {"flat_method": "none"},
    "sam": {"flat_method": "sam"},
    "asam": {"flat_method": "asam", "sam_rho": 0.5},
    "swa": {"flat_method": "swa", "average_start": 0.0},  # one snapshot per epoch
    "swa_every_step": {"flat_method": "swa", "average_start": 0.0, "average_freq": 1},
    "ema": {"flat_method": "ema", "average_start": 0.0},
    "lawa": {"flat_method": "lawa", "average_start": 0.0, "average_freq": 1},  # a snapshot every step, window 5
    "wasam": {"flat_method": "wasam", "average_start": 0.0},
    # the trajectory term is on from the second epoch (SAF) / the first step (MESA)
    "saf": {"flat_method": "saf", "saf_start_epoch": 1, "saf_past_epochs": 1},
    "mesa": {"flat_method": "mesa", "mesa_start_epoch": 0},
    # where and when a two-pass method perturbs (hf_flat.methods.two_pass)
    "avg_sam": {"flat_method": "avg_sam", "sam_rho": 0.5},
    "sam_interval5": {"flat_method": "sam", "sam_interval": 5},
    "sam_interval10": {"flat_method": "sam", "sam_interval": 10},
    "sam_start0.8": {"flat_method": "sam", "sam_start": 0.8},
    "sam_m": lambda opts: {"flat_method": "sam", "sam_m": opts.batch // 4},  # a quarter of the micro-batch
    "plain_ga": lambda opts: {"grad_accum": opts.step_grad_accum},
    "sam_micro_ga": lambda opts: {"flat_method": "sam", "grad_accum": opts.step_grad_accum},
    "sam_step": lambda opts: {"flat_method": "sam", "sam_scope": "step", "grad_accum": opts.step_grad_accum},
    # the SAF paper's comparison set (hf_flat.methods.gsam / looksam / esam), at the authors' defaults
    "gsam": {"flat_method": "gsam"},
    "looksam": {"flat_method": "looksam", "looksam_k": 5},
    "esam": {"flat_method": "esam", "esam_beta": 0.6, "esam_gamma": 0.5},
}
#: The original method table (the default of --methods).
METHODS = ["plain", "none", "sam", "asam", "swa", "swa_every_step", "ema", "wasam", "saf", "mesa"]
#: --methods sam_settings: the settings with a target, and their references.
SAM_SETTINGS = ["plain", "sam", "avg_sam", "sam_interval5", "sam_interval10", "sam_start0.8", "sam_m",
                "plain_ga", "sam_micro_ga", "sam_step"]
#: --methods family: GSAM, LookSAM and ESAM beside SAM, SAF and MESA.
FAMILY = ["plain", "sam", "saf", "mesa", "gsam", "looksam", "esam"]
#: preset -> (the setting as the issue writes it, the largest ratio to the plain Trainer allowed[,
#: the extra memory allowed in copies of the trainable weights, default MEMORY_TARGET_COPIES]).
TARGETS = {
    "gsam": ("`gsam`", 2.10, 2.0),
    "looksam": ("`looksam` (k = 5) over a whole run", 1.30, 2.0),
    "esam": ("`esam` (beta 0.6, gamma 0.5)", 1.75),
    "avg_sam": ("`avg_sam` (sam_rho 0.5)", 1.05),
    "sam_interval5": ("`sam_interval=5`", 1.25),
    "sam_interval10": ("`sam_interval=10`", 1.12),
    "sam_start0.8": ("`sam_start=0.8` over a whole run", 1.25),
    "sam_step": ("`sam_scope=\"step\"`, grad_accum {ga}", 2.05),
    "sam_m": ("`sam_m={m}` (micro-batch {batch} / 4)", 2.2),
}
#: Extra memory allowed, in copies of the trainable weights (sam_step: plus its window's inputs).
MEMORY_TARGET_COPIES = 1.0
#: ... give or take this much (the resident size is read in pages, and glibc keeps a little back).
MEMORY_TOLERANCE_COPIES = 0.05


def preset(name, opts):
    """`(FlatTrainingArguments overrides, gradient accumulation)` of preset `name`."""
    value = PRESETS[name]
    flat = dict(value(opts) if callable(value) else value)
    return flat, flat.pop("grad_accum", opts.grad_accum)


def scheduled(flat):
    return flat.get("sam_start", 0.0) > 0 or interval_of(flat) > 1


def interval_of(flat):
    """Optimizer steps from one perturbed step to the next (LookSAM: its k)."""
    return flat.get("looksam_k", 1) if flat.get("flat_method") == "looksam" else flat.get("sam_interval", 1)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*PRESETS, "sam_settings", "family"],
                        help="presets; 'plain' is transformers.Trainer; 'sam_settings' = " + " ".join(SAM_SETTINGS))
    parser.add_argument("--epoch_steps", type=int, default=5, help="optimizer steps per epoch (SWA snapshots)")
    parser.add_argument("--steps", type=int, default=15, help="T: optimizer steps of the timed run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the untimed run before it")
    parser.add_argument("--model", default="roberta", choices=["roberta", "vit"],
                        help="roberta: random tokens, --seq long; vit: random 224x224 images, patch 16 (ViT-B/16 at "
                        "--hidden 768 --layers 12)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--step_grad_accum", type=int, default=2,
                        help="gradient accumulation of the presets sam_step, sam_micro_ga and plain_ga")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None,
                        help="write the tables as Markdown here, with the command, versions, CPU/GPU and date")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions; the fastest counts")
    parser.add_argument("--memory_steps", type=int, default=4,
                        help="steps of the memory-reading run (at least sam_interval + 1)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    methods = []
    for name in opts.methods:
        for m in {"sam_settings": SAM_SETTINGS, "family": FAMILY}.get(name, [name]):
            if m not in methods:
                methods.append(m)
    opts.methods = methods
    return opts


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_mb(value):
    """MB of the tensors in a batch (a dict, list or tuple of tensors, nested)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() / 2**20
    if isinstance(value, dict):
        return sum(tensor_mb(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_mb(v) for v in value)
    return 0.0


def run_one(opts):
    """Train with one method in this process and print a JSON line with the measurements."""
    import torch
    import transformers
    from transformers import (
        RobertaConfig, RobertaForSequenceClassification, Trainer, TrainerCallback, ViTConfig, ViTForImageClassification,
    )

    from hf_flat import FlatTrainer, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.begins.append(time.perf_counter())

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
    flat, grad_accum = preset(opts.child, opts)
    args_cls = TrainingArguments if flat else transformers.TrainingArguments
    trainer_cls = FlatTrainer if flat else Trainer
    dataset = Data(opts.epoch_steps * opts.batch * grad_accum)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()

    def make_trainer(steps, callbacks=()):
        args = args_cls(
            output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=opts.batch,
            gradient_accumulation_steps=grad_accum, learning_rate=1e-4, save_strategy="no",
            logging_steps=10, report_to="none", disable_tqdm=True, fp16=opts.fp16, bf16=opts.bf16,
            dataloader_num_workers=0, seed=0, **flat,
        )
        return trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))

    if opts.measure == "memory":  # one short run, nothing before it
        # a schedule must perturb a step after the first (AdamW's state only exists from the first
        # optimizer step on, so a perturbed first step alone does not reach the peak)
        trainer = make_trainer(max(opts.memory_steps, interval_of(flat) + 1))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = rss_mb()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps({"peak_extra_mb": peak - before}))
        return

    # Untimed warmup: a whole run of its own, so that the timed run below is a whole run of T steps.
    if opts.warmup > 0:
        warm = make_trainer(opts.warmup)
        warm.train()
        del warm
        gc.collect()

    timer = Timer()
    trainer = make_trainer(opts.steps, [timer])
    # Time spent in the method's own per-step work, measured inside the run: the averaging
    # update, SAF's / MESA's trajectory term (MESA: the teacher's forward) and MESA's EMA update.
    own_seconds = [0.0]
    window_mb = [0.0]  # sam_scope="step": the most input MB its window held at once

    def timed(function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = function(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            own_seconds[0] += time.perf_counter() - start
            return result

        return wrapper

    def measuring_window(method):
        whole_step = method._whole_step

        def wrapper(trainer_, model_, inputs, num_items_in_batch=None):
            held = sum(tensor_mb(batch) for batch, _ in method._window) + tensor_mb(inputs)
            window_mb[0] = max(window_mb[0], held)
            return whole_step(trainer_, model_, inputs, num_items_in_batch)

        return wrapper

    class TimeTheMethods(TrainerCallback):
        """Wraps the method objects of this run: `train()` builds them when training starts."""

        def on_train_begin(self, args, state, control, **kwargs):
            if getattr(trainer, "averaging", None) is not None:
                trainer.averaging.on_step_end = timed(trainer.averaging.on_step_end)
            if getattr(trainer, "trajectory", None) is not None:
                trainer.trajectory.term = timed(trainer.trajectory.term)
                trainer.trajectory.before_forward = timed(trainer.trajectory.before_forward)  # MESA's teacher
                if hasattr(trainer.trajectory, "on_step_end"):
                    trainer.trajectory.on_step_end = timed(trainer.trajectory.on_step_end)
            perturbation = getattr(trainer, "perturbation", None)
            if perturbation is not None and perturbation.scope == "step":
                perturbation._whole_step = measuring_window(perturbation)

    trainer.add_callback(TimeTheMethods())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    assert len(timer.ends) == len(timer.begins) == opts.steps, (len(timer.begins), len(timer.ends))
    # step 1 from its on_step_begin (its batch is already fetched), each later one from the end of the one before
    starts = [timer.begins[0], *timer.ends[:-1]]
    times = [end - start for start, end in zip(starts, timer.ends)]
    perturbation = getattr(trainer, "perturbation", None)
    perturbed = [] if perturbation is None else [t for t in range(1, opts.steps + 1) if perturbation.perturbs_step(t, opts.steps)]
    on = [times[t - 1] for t in perturbed]
    off = [x for t, x in enumerate(times, 1) if t not in perturbed]
    print("RESULT " + json.dumps({
        **({"peak_extra_mb": peak - before} if cuda else {}),  # on CUDA the timing run's own peak is exact
        "method": opts.child,
        "flat": flat,
        "grad_accum": grad_accum,
        "scheduled": scheduled(flat),
        "step_ms": 1000 * statistics.median(times),
        "mean_step_ms": 1000 * statistics.mean(times),
        "whole_run_s": timer.ends[-1] - timer.begins[0],
        "steps_ms": [1000 * x for x in times],
        "two_pass": perturbation is not None,
        "perturbed_steps": perturbed,
        "perturbed_step_ms": 1000 * statistics.median(on) if on else None,
        "unperturbed_step_ms": 1000 * statistics.median(off) if off else None,
        "perturbed_mean_ms": 1000 * statistics.mean(on) if on else None,
        "unperturbed_mean_ms": 1000 * statistics.mean(off) if off else None,
        "window_input_mb": window_mb[0] if perturbation is not None and perturbation.scope == "step" else None,
        "saf_memory_mb": trainer.trajectory.nbytes / 2**20 if hasattr(getattr(trainer, "trajectory", None), "nbytes") else None,
        "own_work_ms_per_step": 1000 * own_seconds[0] / opts.steps,
        "trainable_mb": trainable,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


def parent_argv():
    """This run's arguments without those only the parent reads (--output, --markdown, --methods)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip and not a.startswith("--"):
            continue
        skip = False
        if a.split("=")[0] in ("--output", "--markdown", "--methods"):
            skip = "=" not in a
            continue
        argv.append(a)
    return argv


def child(opts, method, measure, **env):
    out = subprocess.run(
        [sys.executable, __file__, *parent_argv(), "--child", method, "--measure", measure],
        capture_output=True, text=True, check=False, env={**os.environ, **env},
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def timing_key(r):
    """The time a run is ranked and compared by: the whole run for a schedule, else the median step."""
    return r["whole_run_s"] * 1000 / len(r["steps_ms"]) if r["scheduled"] else r["step_ms"]


def machine():
    """The CPU model (lscpu) and the date, for the Markdown report."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
        cpus = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("CPU(s)")), "?")
    except OSError:
        model, cpus = platform.processor() or "?", str(os.cpu_count())
    return model, cpus


def main():
    opts = parse()
    if opts.child:
        return run_one(opts)
    for method in opts.methods:
        flat, _ = preset(method, opts)
        interval = interval_of(flat)
        if opts.steps % interval:
            sys.exit(f"{method}: --steps {opts.steps} is not a multiple of its perturbation interval {interval}: the "
                     "timed run must hold whole intervals.")
        if "sam_m" in flat and (flat["sam_m"] < 1 or opts.batch % flat["sam_m"]):
            sys.exit(f"{method}: sam_m={flat['sam_m']} must divide --batch {opts.batch}")
    # every preset is compared with the plain Trainer at its own gradient accumulation
    baselines = {}
    for name in PRESETS:
        flat, ga = preset(name, opts)
        if "flat_method" not in flat:
            baselines.setdefault(ga, name)
    methods = list(opts.methods)
    for method in opts.methods:
        base = baselines[preset(method, opts)[1]]
        if base not in methods:
            methods.insert(0, base)
    # Round-robin over the methods, `--rounds` times; each method keeps its fastest round (the
    # one least disturbed by whatever else the machine was doing).
    runs = {method: [] for method in methods}
    started = time.time()
    for round_ in range(opts.rounds):
        for method in methods:
            load = os.getloadavg()[0]  # what else the machine was doing (1-minute load average)
            r = child(opts, method, "time")
            r["load_before"] = load
            runs[method].append(r)
            print(f"  round {round_ + 1}, {method}: median {r['step_ms']:.1f} ms/step, mean {r['mean_step_ms']:.1f}, "
                  f"whole run {r['whole_run_s']:.2f} s ({time.time() - started:.0f} s so far)", file=sys.stderr)
    results = {}
    for method, method_runs in runs.items():
        best = dict(min(method_runs, key=timing_key))
        best["all_rounds_ms"] = [r["step_ms"] for r in method_runs]
        best["all_rounds_whole_run_s"] = [r["whole_run_s"] for r in method_runs]
        best["all_rounds_load"] = [r["load_before"] for r in method_runs]
        if best["device"].startswith("CPU"):
            # a fixed mmap threshold makes glibc return every large freed block at once, so the
            # resident size follows the live tensors and ru_maxrss is a true peak
            best.update(child(opts, method, "memory", MALLOC_MMAP_THRESHOLD_="65536"))
        elif "peak_extra_mb" not in best:
            best.update(child(opts, method, "memory"))
        results[method] = best
    elapsed = time.time() - started
    loads = [x for r in results.values() for x in r["all_rounds_load"]]

    for r in results.values():
        base = results[baselines[r["grad_accum"]]]
        r["baseline"] = base["method"]
        r["ratio_median"] = r["step_ms"] / base["step_ms"]
        r["ratio_whole_run"] = r["whole_run_s"] / base["whole_run_s"]
        r["ratio"] = r["ratio_whole_run"] if r["scheduled"] else r["ratio_median"]
        r["ratio_measure"] = "whole run" if r["scheduled"] else "median step"
        r["extra_over_plain_mb"] = r["peak_extra_mb"] - base["peak_extra_mb"]
        r["extra_copies"] = r["extra_over_plain_mb"] / r["trainable_mb"]
        times = r["all_rounds_whole_run_s"] if r["scheduled"] else r["all_rounds_ms"]
        r["round_spread"] = max(times) / min(times) - 1
        # each round against the baseline's run of the same round (run minutes apart, so under
        # much the same load): a second estimate of the ratio, and a view of the noise
        base_times = base["all_rounds_whole_run_s"] if r["scheduled"] else base["all_rounds_ms"]
        r["per_round_ratios"] = [a / b for a, b in zip(times, base_times)]

    lines = []
    first = next(iter(results.values()))
    shape = f"seq={opts.seq}" if opts.model == "roberta" else "224x224 images, patch 16"
    lines.append(
        f"Device: {first['device']}, torch {first['torch']}, transformers {first['transformers']}; {opts.model} "
        f"hidden={opts.hidden} layers={opts.layers} {shape} batch={opts.batch} grad_accum={opts.grad_accum} "
        f"(step presets: {opts.step_grad_accum}){' fp16' if opts.fp16 else ''}{' bf16' if opts.bf16 else ''}; "
        f"trainable weights {first['trainable_mb']:.1f} MB; timed run of T={opts.steps} optimizer steps after "
        f"{opts.warmup} untimed ones, fastest of {opts.rounds} rounds; {elapsed:.0f} s in all; 1-minute load average before the timing runs "
        f"{min(loads):.2f} to {max(loads):.2f}")
    lines.append("")
    lines.append("| method | grad accum | step time, median (ms) | mean over the run (ms) | perturbed steps "
                 "| vs plain Trainer (median) | vs plain Trainer (whole run) | rounds (spread) "
                 "| method's own work per step (ms, % of plain step) | peak memory over plain (MB) "
                 "| in copies of the trainable weights |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        base = results[r["baseline"]]
        own = r["own_work_ms_per_step"]
        own = f"{own:.2f} ({100 * own / base['step_ms']:.2f}%)" if own else "-"
        perturbed = f"{len(r['perturbed_steps'])}/{opts.steps}" if r["two_pass"] else "-"
        if r["scheduled"]:
            rounds = ", ".join(f"{x:.2f} s" for x in r["all_rounds_whole_run_s"])
        else:
            rounds = ", ".join(f"{x:.0f} ms" for x in r["all_rounds_ms"])
        lines.append(
            f"| {r['method']} | {r['grad_accum']} | {r['step_ms']:.1f} | {r['mean_step_ms']:.1f} | {perturbed} "
            f"| {r['ratio_median']:.2f}x | {r['ratio_whole_run']:.2f}x | {rounds} ({100 * r['round_spread']:.0f}%) | {own} "
            f"| {r['extra_over_plain_mb']:+.1f} | {r['extra_copies']:+.2f} |")
    with_target = [m for m in results if m in TARGETS]
    if with_target:
        sam = results.get("sam")
        lines.append("")
        lines.append("Targets: ratio to the plain Trainer at the same gradient accumulation (whole-run time for "
                     "a schedule, median step time otherwise); extra memory at most one copy of the trainable "
                     "weights (`gsam`, `looksam`: two; `sam_scope=\"step\"`: plus its window's inputs), give or take "
                     f"{MEMORY_TOLERANCE_COPIES} copies." +
                     (" Expected for a schedule: 1 + (perturbed fraction) x (sam's ratio - 1), from this run's "
                      f"`sam` ({sam['ratio']:.2f}x)." if sam else ""))
        lines.append("")
        lines.append("| setting | ratio | measured by | target | pass/fail | extra memory (MB) | in copies of the "
                     "trainable weights | memory pass/fail | notes |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m in with_target:
            r = results[m]
            label, target, *copies = TARGETS[m]
            copies = copies[0] if copies else MEMORY_TARGET_COPIES
            label = label.format(ga=r["grad_accum"], m=r["flat"].get("sam_m"), batch=opts.batch)
            notes = [f"vs `{r['baseline']}`; round by round "
                     + ", ".join(f"{x:.2f}" for x in r["per_round_ratios"])
                     + f" (median {statistics.median(r['per_round_ratios']):.2f}x)"]
            allowed_mb = copies * r["trainable_mb"]
            base_mean = results[r["baseline"]]["mean_step_ms"]
            if r["window_input_mb"] is not None:
                notes.append(f"window's inputs {r['window_input_mb']:.3f} MB ({r['grad_accum']} micro-batches; the "
                             "plain Trainer prefetches them too)")
                allowed_mb += r["window_input_mb"]
            if r["scheduled"]:
                fraction = len(r["perturbed_steps"]) / opts.steps
                notes.append(f"{len(r['perturbed_steps'])}/{opts.steps} steps perturbed")
                if sam:
                    notes.append(f"expected {1 + fraction * (sam['ratio'] - 1):.2f}x")
                notes.append(f"perturbed step {r['perturbed_step_ms']:.0f} ms, other {r['unperturbed_step_ms']:.0f} ms "
                             "(medians)")
                # a long run perturbs exactly 1/interval (or 1 - sam_start) of its steps
                share = 1 / interval_of(r["flat"]) * (1 - r["flat"].get("sam_start", 0.0))
                if r["perturbed_mean_ms"] and r["unperturbed_mean_ms"]:
                    long = (share * r["perturbed_mean_ms"] + (1 - share) * r["unperturbed_mean_ms"]) / base_mean
                    r["ratio_long_run"] = long
                    notes.append(f"a long run ({100 * share:.0f}% perturbed) from these means: ~{long:.2f}x")
            memory_ok = r["extra_over_plain_mb"] <= allowed_mb + MEMORY_TOLERANCE_COPIES * r["trainable_mb"]
            lines.append(
                f"| {label} | {r['ratio']:.2f}x | {r['ratio_measure']} | <= {target}x "
                f"| {'pass' if r['ratio'] <= target else 'FAIL'} | {r['extra_over_plain_mb']:+.1f} "
                f"| {r['extra_copies']:+.2f} | {'pass' if memory_ok else 'FAIL'} | {'; '.join(notes)} |")
            r["target"], r["pass"], r["memory_pass"] = target, r["ratio"] <= target, memory_ok
    print("\n" + "\n".join(lines))
    if opts.markdown:
        model, cpus = machine()
        header = [
            f"# Step time of flat methods ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})",
            "",
            f"- command: `{shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable, *sys.argv])}`",
            f"- CPU: {model}, {cpus} CPU(s) (lscpu); device used: {first['device']}",
            f"- torch {first['torch']}, transformers {first['transformers']}, Python {platform.python_version()}",
            "",
        ]
        with open(opts.markdown, "w") as f:
            f.write("\n".join(header + lines) + "\n")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump({"options": vars(opts), "elapsed_s": elapsed, "results": list(results.values())}, f, indent=2)


if __name__ == "__main__":
    main()
