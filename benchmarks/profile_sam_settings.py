"""Where the time of a two-pass step goes, on the model `step_time.py` times (CPU or one GPU).

Runs one process per preset of `step_time.py` (same model and sizes, same options) and times,
inside the run, every piece of the step by wrapping it (hf_flat itself is not changed):

- ``fwd+bwd``: `FlatTrainer.forward_backward` (each forward/backward pass; the plain Trainer's
  `training_step` for ``plain``), with the number of passes per step;
- ``perturbation``: the method's ``e`` (SAM: the global norm and the in-place scaling; average SAM:
  ``randn``, the norm and the scaling);
- ``w+e``: `_add_perturbation` (the clone of ``w`` and the add; average SAM: the rest of its
  `perturb`, ``w + e`` in its buffer); ``restore``: `_restore`;
- ``other``: the rest of the optimizer step (data, clipping, AdamW, zero_grad, the Trainer's own work).

Then, outside any Trainer, the cost of single operations on the trainable weights (randn with a
generator, a clone, a foreach add / copy / norm) and of one forward/backward at the chunk size of
``sam_m`` against the whole micro-batch.

    python benchmarks/profile_sam_settings.py --presets plain sam avg_sam sam_m --steps 6
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["plain", "sam", "avg_sam", "sam_m"], choices=list(step_time.PRESETS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per preset (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="also time single operations on the weights")
    parser.add_argument("--torch_profile", action="store_true",
                        help="also print torch.profiler's top operators (self CPU time) of the first timed step")
    parser.add_argument("--live", action="store_true",
                        help="instead of timing: the tensors Python holds at the end of each forward / backward")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts, rest = parser.parse_known_args()
    sizes = step_time.parse(rest + ["--steps", str(opts.steps), "--warmup", str(opts.warmup)])
    sizes.torch_profile = opts.torch_profile
    return opts, sizes, rest


def build(sizes):
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=sizes.vocab, max_position_embeddings=sizes.seq + 2, num_labels=2,
                           hidden_size=sizes.hidden, num_hidden_layers=sizes.layers,
                           num_attention_heads=max(1, sizes.hidden // 64), intermediate_size=4 * sizes.hidden)
    model = RobertaForSequenceClassification(config)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            self.ids = torch.randint(5, sizes.vocab, (n, sizes.seq), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] % 2)}

    return model, Tokens


def profile_preset(name, sizes):
    """Train `name` for warmup + steps optimizer steps; the per-step breakdown of the timed ones."""
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback

    from hf_flat import FlatTrainer, TrainingArguments
    from hf_flat.methods import AverageSAM, two_pass
    from hf_flat.methods import sam as sam_module

    spent = defaultdict(float)
    counts = defaultdict(int)

    def timed(key, function):
        def wrapper(*a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = function(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - start
            counts[key] += 1
            return result

        return wrapper

    FlatTrainer.forward_backward = timed("fwd+bwd", FlatTrainer.forward_backward)
    if name == "plain":
        Trainer.training_step = timed("fwd+bwd", Trainer.training_step)
    two_pass._add_perturbation = timed("w+e", two_pass._add_perturbation)  # the module function (SAM, ASAM)
    two_pass._restore = timed("restore", two_pass._restore)
    # average SAM: `perturb` draws z and its norm (`_direction`, "perturbation") and then makes w + e
    AverageSAM._direction = timed("perturbation", AverageSAM._direction)
    perturb = timed("w+e and perturbation", AverageSAM.perturb)

    def average_sam_perturb(*a, **k):
        before = spent["perturbation"]
        result = perturb(*a, **k)
        spent["w+e"] += spent.pop("w+e and perturbation") - (spent["perturbation"] - before)
        counts["w+e"] += counts.pop("w+e and perturbation")
        return result

    AverageSAM.perturb = average_sam_perturb
    sam_module.SAM.perturbation = timed("perturbation", sam_module.SAM.perturbation)

    model, Tokens = build(sizes)
    if torch.cuda.is_available():
        model.cuda()
    flat, grad_accum = step_time.preset(name, sizes)

    class Steps(TrainerCallback):
        def __init__(self):
            self.rows = []
            self.start = None
            self.profiler = None
            self.table = None

        def on_step_begin(self, args, state, control, **kwargs):
            if sizes.torch_profile and state.global_step == sizes.warmup:  # the first timed step
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            if self.start is None:
                self.start = time.perf_counter()
            spent.clear()
            counts.clear()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            row = {k: 1000 * v for k, v in spent.items()}
            row["passes"] = counts["fwd+bwd"]
            row["step"] = 1000 * (now - self.start)
            row["perturbed"] = bool(counts["w+e"])
            self.rows.append(row)
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
                self.profiler = None
                now = time.perf_counter()  # (the profiled step's time includes the profiler's overhead)
            self.start = now
            spent.clear()
            counts.clear()

    steps = Steps()
    args_cls = TrainingArguments if flat else transformers.TrainingArguments
    args = args_cls(output_dir=tempfile.mkdtemp(), max_steps=sizes.warmup + sizes.steps, per_device_train_batch_size=sizes.batch,
                    gradient_accumulation_steps=grad_accum, learning_rate=1e-4, save_strategy="no", logging_steps=10,
                    report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, **flat)
    trainer = (FlatTrainer if flat else Trainer)(model=model, args=args, callbacks=[steps],
                                                 train_dataset=Tokens(sizes.epoch_steps * sizes.batch * grad_accum))
    trainer.train()
    rows = steps.rows[sizes.warmup:]
    keys = ["step", "fwd+bwd", "perturbation", "w+e", "restore"]
    out = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    out["other"] = statistics.median(r["step"] - sum(r.get(k, 0.0) for k in keys[1:]) for r in rows)
    out["passes"] = statistics.median(r["passes"] for r in rows)
    out["steps_ms"] = [round(r["step"], 1) for r in rows]
    out["torch_profile"] = steps.table
    return out


def live_tensors(sizes, name):
    """MB resident at the start of each forward, at its end, and right after each backward, at most
    over the timed steps, with glibc's mmap threshold fixed (`run_child` sets it) so that the
    resident size follows the live tensors: the same moments in two presets differ by what one of
    them holds beyond the other (a saved ``w``, an ``e``, a window of inputs)."""
    import transformers
    from transformers import Trainer, TrainerCallback

    from hf_flat import FlatTrainer, TrainingArguments

    model, Tokens = build(sizes)
    flat, grad_accum = step_time.preset(name, sizes)
    high = {"start of forward": 0.0, "end of forward": 0.0, "after backward": 0.0}
    on = [False]
    before = step_time.rss_mb()

    def measure(moment):
        if on[0]:
            high[moment] = max(high[moment], step_time.rss_mb() - before)

    model.register_forward_pre_hook(lambda *a: measure("start of forward"))
    # the moment w + e is set (the saved copy just made): outside any pass, so no activations
    from hf_flat.methods import two_pass

    def measured(function):
        def wrapper(*a, **k):
            result = function(*a, **k)
            measure("after w <- w + e")
            return result
        return wrapper

    two_pass._add_perturbation = measured(two_pass._add_perturbation)
    for cls in [two_pass.TwoPassMethod, *two_pass.TwoPassMethod.__subclasses__()]:
        for name in ("add_perturbation", "perturb"):  # (average SAM's own `perturb` makes w + e)
            if name in vars(cls) and (cls is not two_pass.TwoPassMethod or name == "add_perturbation"):
                setattr(cls, name, measured(vars(cls)[name]))
    high["after w <- w + e"] = 0.0
    model.register_forward_hook(lambda *a: measure("end of forward"))
    step = Trainer.training_step

    def training_step(*a, **k):
        result = step(*a, **k)
        measure("after backward")
        return result

    Trainer.training_step = training_step

    class After(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on[0] = state.global_step >= sizes.warmup

    args_cls = TrainingArguments if flat else transformers.TrainingArguments
    args = args_cls(output_dir=tempfile.mkdtemp(), max_steps=sizes.warmup + sizes.steps, per_device_train_batch_size=sizes.batch,
                    gradient_accumulation_steps=grad_accum, learning_rate=1e-4, save_strategy="no", logging_steps=10,
                    report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, **flat)
    trainer = (FlatTrainer if flat else Trainer)(model=model, args=args, callbacks=[After()],
                                                 train_dataset=Tokens(sizes.epoch_steps * sizes.batch * grad_accum))
    trainer.train()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return {**high, "trainable_mb": trainable}


def profile_ops(sizes):
    """Single operations on the trainable weights, and one pass at the sam_m chunk size."""
    import torch

    model, Tokens = build(sizes)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def t(f, k=10):
        f()
        start = time.perf_counter()
        for _ in range(k):
            f()
        return 1000 * (time.perf_counter() - start) / k

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(p.shape) for p in params]
    saved = [p.detach().clone() for p in params]
    out = {"parameters": n, "tensors": len(params)}
    with torch.no_grad():
        out["randn, generator, per tensor (avg_sam)"] = t(lambda: [torch.randn(p.shape, generator=g) for p in params])
        out["normal_ into a kept buffer"] = t(lambda: [b.normal_(generator=g) for b in z])
        # a possible change: the parameters split between torch.get_num_threads() generators, drawn in threads
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, torch.get_num_threads())
        generators = [torch.Generator().manual_seed(i) for i in range(workers)]
        parts = [params[i::workers] for i in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            def draw(i):
                return [torch.randn(p.shape, generator=generators[i]) for p in parts[i]]

            out[f"randn in {workers} threads, one generator each"] = t(lambda: list(pool.map(draw, range(workers))))
        out["foreach_norm + stack"] = t(lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(z))))
        out["foreach_mul_"] = t(lambda: torch._foreach_mul_(z, 1.0))
        out["clone (new memory)"] = t(lambda: [p.detach().clone() for p in params])
        out["foreach_copy_ into a kept buffer"] = t(lambda: torch._foreach_copy_(saved, params))
        out["foreach_add_ (w + e)"] = t(lambda: torch._foreach_add_(params, z))
        out["foreach_add_ with alpha (w + s z, fused scaling)"] = t(lambda: torch._foreach_add_(params, z, alpha=1.0))
        out["foreach_copy_ (restore)"] = t(lambda: torch._foreach_copy_(params, saved))
    data = Tokens(sizes.batch)
    batch = {"input_ids": data.ids, "labels": data.ids[:, 0] % 2}
    m = max(1, sizes.batch // 4)

    def fwd_bwd(size):
        def run():
            for begin in range(0, sizes.batch, size):
                loss = model(**{k: v[begin:begin + size] for k, v in batch.items()}).loss
                (loss * size / sizes.batch).backward()
        return run

    out[f"fwd+bwd, micro-batch {sizes.batch} in one pass"] = t(fwd_bwd(sizes.batch), 3)
    out[f"fwd+bwd, micro-batch {sizes.batch} in {sizes.batch // m} chunks of {m}"] = t(fwd_bwd(m), 3)
    return out


def run_child(name):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if name.startswith("LIVE:") else None
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name], capture_output=True, text=True,
                         env=env, check=False)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def main_live(opts):
    _, sizes, _ = parse()
    results = {name: run_child("LIVE:" + name) for name in opts.presets}
    moments = ["start of forward", "end of forward", "after backward", "after w <- w + e"]
    print("Resident MB over the resident size before train() (largest over the timed steps), and over the "
          "plain Trainer at the same gradient accumulation and the same moment (for 'after w <- w + e', which it "
          "lacks: its 'after backward') in copies of the trainable weights:\n")
    print("| preset | grad accum | " + " | ".join(f"{m} (MB) | copies" for m in moments) + " |")
    print("|---|---|" + "---|---|" * len(moments))
    bases = {}
    for name in step_time.PRESETS:
        flat, ga = step_time.preset(name, sizes)
        if "flat_method" not in flat:
            bases.setdefault(ga, name)
    for name, r in results.items():
        ga = step_time.preset(name, sizes)[1]
        base = results.get(bases[ga])
        cells = []
        for moment in moments:
            # the plain Trainer has no such moment: against what it holds after a backward
            other = "after backward" if moment == "after w <- w + e" else moment
            extra = f"{(r[moment] - base[other]) / r['trainable_mb']:+.2f}" if base and r[moment] else "-"
            cells += [f"{r[moment]:.1f}", extra]
        print(f"| {name} | {ga} | " + " | ".join(cells) + " |")


def main():
    opts, sizes, _ = parse()
    if opts.child:
        if opts.child == "OPS":
            result = profile_ops(sizes)
        elif opts.child.startswith("LIVE:"):
            result = live_tensors(sizes, opts.child[len("LIVE:"):])
        else:
            result = profile_preset(opts.child, sizes)
        print("RESULT " + json.dumps(result))
        return
    if opts.live:
        return main_live(opts)
    results = {}
    for name in opts.presets + (["OPS"] if opts.ops else []):
        results[name] = run_child(name)
        print(f"  {name}: {results[name]}", file=sys.stderr)
    print("| preset | step (ms) | fwd+bwd (ms) | passes | perturbation (ms) | w+e: clone + add (ms) | restore (ms) | other (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in opts.presets:
        r = results[name]
        print(f"| {name} | {r['step']:.1f} | {r['fwd+bwd']:.1f} | {r['passes']:g} | {r['perturbation']:.1f} | {r['w+e']:.1f} "
              f"| {r['restore']:.1f} | {r['other']:.1f} |")
    for name in opts.presets:
        if results[name].get("torch_profile"):
            print(f"\ntorch.profiler, first timed step of {name} (its step time includes the profiler):\n")
            print(results[name]["torch_profile"])
    if opts.ops:
        print("\n| operation on the trainable weights | ms |\n|---|---|")
        for k, v in results["OPS"].items():
            print(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
