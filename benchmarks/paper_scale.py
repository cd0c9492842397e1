"""The paper's architectures at their real size: step time against the plain Trainer, and peak memory.

Each reproduction command of the docs (docs/guides/reproducing-papers.md) trains one of three
architectures. This script builds each from a config (no download) at its real size, on random
data of the real shape, and trains a few optimizer steps with the plain `transformers.Trainer` and
with each flat method, in the same run:

- ``vit``: ViT-B/16 (`ViTForImageClassification`, hidden 768, 12 layers, 12 heads, patch 16) on
  224 x 224 images, 100 classes. Paper: batch 100, 12,500 steps (examples/vit/configs).
- ``roberta``: RoBERTa-base (`RobertaForSequenceClassification`, hidden 768, 12 layers, vocab
  50265) on 128 tokens, 2 labels. Paper: batch 16 (the RTE command of docs/guides/reproducing-papers.md; SST-2's config: 32),
  10 epochs.
- ``fid``: Fusion-in-Decoder (`FiDT5` of examples/fid/run_fid.py, built from a `T5Config` at
  T5-base size: d_model 768, 12 + 12 layers, 12 heads, d_ff 3072, vocab 32128) on 100 passages x
  250 tokens with 20 answer tokens. Paper (examples/fid/configs/fid_base_nq.json): batch 1 x
  gradient accumulation 64, 10,000 steps.

**Design** (that of benchmarks/step_time.py, whose helpers it imports): every reading is taken in a
fresh child process, one that times the steps and one that reads the peak memory, each with a
model of its own. The children are forked from this process after the imports (nothing has run
in torch yet), which saves the ~6 s import of each child: 3 architectures x 8 methods x 2
readings. The timing child first trains ``--warmup`` untimed steps with a Trainer of its own,
then times ``--steps`` (T) optimizer steps of a fresh Trainer, each from the end of the one before.
The step time is the median of steps 2..T (step 1 alone when T = 1): SAF's trajectory term starts
with the second epoch and an epoch is one optimizer step here (so SWA / WASAM snapshot every step,
an upper bound on their cost). The ``sam_interval`` row's ratio is the whole run over the plain
Trainer's whole run (T must be a multiple of the interval). Memory: on CPU the peak resident set
size (`ru_maxrss`) minus the resident size just before `train()`, with glibc's mmap threshold
fixed (`mallopt`, as MALLOC_MMAP_THRESHOLD_=65536 does in step_time.py) so that freed tensors leave
the resident set at once; on CUDA `torch.cuda.max_memory_allocated` minus the memory allocated
before `train()`, read in the timing child.

**Methods**: ``plain`` (transformers.Trainer), ``none``, ``sam`` (rho 0.05), ``wasam``
(average_start 0), ``saf`` (from the second epoch, 1 past epoch), ``mesa`` (from the first), and
the cheap SAM settings ``sam_interval2`` (SAM every second step; over T = 2 steps this is one
perturbed and one plain step, a whole interval; ``sam_interval=5`` needs T >= 6 for its memory
reading and is given as an estimate from the perturbed and plain step times) and ``avg_sam``
(rho 0.5). ``sam_start=0.8`` is meaningless over a few steps and is left out. ``saf`` is not run
on ``fid``: hf_flat refuses SAF for per-token outputs (T5's logits are one row per answer token)
and points to ``mesa``.

**Batch**: on a CPU the default batch is reduced (vit 2, roberta 4, fid 1 with 2 passages instead of
100); on CUDA the default is the paper's (100, 16, 1 x 100 passages) in bf16 (fp16 where bf16 is
not supported). The output states the batch used and the paper's.

**Extrapolation** to the paper's runs: seconds per sample at the measured batch (FiD: per
question, times 100 / passages) x the paper's samples; memory = weights + gradients + AdamW's two
moments (4 copies of the trainable weights, fixed) + the method's extra over plain (fixed) + the
activations (the rest of plain's peak), scaled linearly by batch (and passages). Both are linear
assumptions, from this machine.

    python benchmarks/paper_scale.py --tiny                  # the same code path, tiny configs (CI)
    python benchmarks/paper_scale.py --archs vit roberta --markdown benchmarks/results/paper_scale_cpu.md \\
        --output benchmarks/results/paper_scale_cpu.json
    python benchmarks/paper_scale.py --archs fid --methods plain sam --fid_passages 4
"""

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings

# The children are forked after `import torch`: CUDA must not be initialised before the fork, so
# torch.cuda.is_available() asks NVML (no cuInit) wherever it is called before the first kernel.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_flat from this checkout
from step_time import machine, rss_mb  # noqa: E402  (the same readings as step_time.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "plain": {},
    "none": {"flat_method": "none"},
    "sam": {"flat_method": "sam", "sam_rho": 0.05},
    "wasam": {"flat_method": "wasam", "sam_rho": 0.05, "average_start": 0.0},
    "saf": {"flat_method": "saf", "saf_start_epoch": 1, "saf_past_epochs": 1},
    "mesa": {"flat_method": "mesa", "mesa_start_epoch": 0},
    "sam_interval2": {"flat_method": "sam", "sam_rho": 0.05, "sam_interval": 2},
    "avg_sam": {"flat_method": "avg_sam", "sam_rho": 0.5},
}
METHODS = list(PRESETS)
ARCHS = ["vit", "roberta", "fid"]

#: the paper's settings (the commands of docs/guides/reproducing-papers.md and examples/*/configs), for the output and the extrapolation
PAPER = {
    "vit": {"batch": 100, "what": "ViT-B/16, 224x224, 100 classes",
            "source": "examples/vit/configs/vit_b16_cifar10_wasam.json: batch 100, max_steps 12,500",
            "runs": [("CIFAR-10/100, 12,500 steps x 100", 12500 * 100)]},
    "roberta": {"batch": 16, "what": "RoBERTa-base, 128 tokens",
                "source": "docs/guides/reproducing-papers.md RTE command / examples/glue/configs/roberta_base_rte.json: batch 16, 10 epochs "
                          "(roberta_base_sst2.json: batch 32)",
                "runs": [("RTE, 2,490 train x 10 epochs", 2490 * 10), ("SST-2, 67,349 train x 10 epochs", 67349 * 10)]},
    "fid": {"batch": 1, "passages": 100, "length": 250, "answer": 20, "what": "FiD, T5-base, 100 passages x 250 tokens",
            "source": "examples/fid/configs/fid_base_nq.json: batch 1 x grad accum 64, 10,000 steps, n_context 100, "
                      "text_maxlength 250",
            "runs": [("NQ, 10,000 steps x 64 questions", 10000 * 64)]},
}
#: methods hf_flat refuses for FiD (per-token logits): SAF keeps one row of logits per sample
FID_REFUSED = ["saf"]
CPU_BATCH = {"vit": 2, "roberta": 4, "fid": 1}

REAL = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16, num_labels=100),
    "roberta": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=50265, max_position_embeddings=514, num_labels=2, seq=128),
    "fid": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=32128),
}
TINY = {
    "vit": dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                image_size=16, patch_size=8, num_labels=3),
    "roberta": dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                    vocab_size=32, max_position_embeddings=12, num_labels=2, seq=8),
    "fid": dict(d_model=4, d_kv=2, d_ff=4, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=32),
}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="'plain' (transformers.Trainer) is always added")
    parser.add_argument("--fid_methods", nargs="+", default=None, choices=METHODS,
                        help="methods for fid only (default: --methods)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs (a few hundred parameters), batch 2, 1+2 steps: the same code path, in seconds")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for every architecture (default: CPU vit 2, roberta 4, fid 1; CUDA the paper's)")
    parser.add_argument("--fid_passages", type=int, default=None, help="passages per question (CPU default 2, CUDA 100)")
    parser.add_argument("--fid_length", type=int, default=250)
    parser.add_argument("--steps", type=int, default=2, help="T: timed optimizer steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory_steps", type=int, default=3, help="steps of the memory reading (>= interval + 1)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: fp32 on CPU, bf16 (else fp16) on CUDA")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--output", default=None, help="JSON: every number")
    parser.add_argument("--markdown", default=None, help="Markdown: the tables and the extrapolation")
    opts = parser.parse_args(argv)
    if "plain" not in opts.methods:
        opts.methods.insert(0, "plain")
    # SAF records one row of logits per sample; FiD (T5) returns one per answer token, which hf_flat refuses
    opts.fid_methods = opts.fid_methods or [m for m in opts.methods if m not in FID_REFUSED]
    if set(opts.fid_methods) & set(FID_REFUSED):
        parser.error(f"fid: {FID_REFUSED} is refused for per-token outputs (hf_flat: use mesa)")
    if "plain" not in opts.fid_methods:
        opts.fid_methods.insert(0, "plain")
    for m in set(opts.methods) | set(opts.fid_methods):
        k = PRESETS[m].get("sam_interval", 1)
        if opts.steps % k:
            parser.error(f"{m}: --steps {opts.steps} must be a multiple of its interval {k}")
        if opts.memory_steps < k + 1:
            parser.error(f"{m}: --memory_steps must be at least {k + 1} (a perturbed step after AdamW's state exists)")
    if opts.tiny:
        opts.steps, opts.warmup = 2, 1
    return opts


def setup(opts, arch, cuda):
    """(batch, passages, precision) of this run."""
    batch = opts.batch or (2 if opts.tiny else PAPER[arch]["batch"] if cuda else CPU_BATCH[arch])
    passages = (opts.fid_passages or (2 if opts.tiny or not cuda else PAPER["fid"]["passages"])) if arch == "fid" else None
    precision = opts.precision
    if precision == "auto":
        import torch

        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    return batch, passages, precision


def build(arch, opts, batch, passages):
    """(model, dataset) of `arch`, from a config, with random data of the real shape."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification, T5Config, ViTConfig, ViTForImageClassification

    cfg = dict((TINY if opts.tiny else REAL)[arch])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = batch  # one optimizer step per epoch
    if arch == "vit":
        size, labels = cfg["image_size"], cfg["num_labels"]
        model = ViTForImageClassification(ViTConfig(**cfg))
        pixels = torch.randn(n, 3, size, size, generator=g)
        rows = [{"pixel_values": pixels[i], "labels": i % labels} for i in range(n)]
    elif arch == "roberta":
        seq = cfg.pop("seq")
        model = RobertaForSequenceClassification(RobertaConfig(**cfg))
        ids = torch.randint(5, cfg["vocab_size"], (n, seq), generator=g)
        rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": i % 2} for i in range(n)]
    else:
        sys.path.insert(0, os.path.join(ROOT, "examples", "fid"))
        from run_fid import FiDT5  # the example's model class, built the same way at T5-base size

        model = FiDT5(T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **cfg))
        length = 8 if opts.tiny else opts.fid_length
        answer = 4 if opts.tiny else PAPER["fid"]["answer"]
        ids = torch.randint(2, cfg["vocab_size"], (n, passages, length), generator=g)
        labels = torch.randint(2, cfg["vocab_size"], (n, answer), generator=g)
        rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for i in range(n)]
    return model, rows


def measure(opts, arch, method, what):
    """Train `method` on `arch` in this (child) process; return the readings as a dict."""
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback

    from hf_flat import FlatTrainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    batch, passages, precision = setup(opts, arch, cuda)
    if what == "memory" and not cuda:
        # what MALLOC_MMAP_THRESHOLD_=65536 does (step_time.py), set in this forked child: M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    model, rows = build(arch, opts, batch, passages)
    if cuda:
        model.cuda()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    flat = dict(PRESETS[method])

    class Timer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    def make_trainer(steps, callbacks=()):
        args = (TrainingArguments if flat else transformers.TrainingArguments)(
            output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
            save_strategy="no", logging_steps=1000, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            seed=0, bf16=precision == "bf16", fp16=precision == "fp16", remove_unused_columns=False,
            **({"gradient_checkpointing": True} if opts.gradient_checkpointing else {}), **flat)
        return (FlatTrainer if flat else Trainer)(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))

    out = {"arch": arch, "method": method, "flat": flat, "batch": batch, "passages": passages, "precision": precision,
           "params": params, "trainable_mb": trainable_mb,
           "device": torch.cuda.get_device_name() if cuda else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "transformers": transformers.__version__}
    if what == "memory":
        trainer = make_trainer(opts.memory_steps)
        before = rss_mb()
        trainer.train()
        out["peak_extra_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        return out
    if opts.warmup > 0:
        warm = make_trainer(opts.warmup)
        warm.train()
        del warm
        gc.collect()
    timer = Timer()
    trainer = make_trainer(opts.steps, [timer])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    trainer.train()
    if cuda:
        out["peak_extra_mb"] = torch.cuda.max_memory_allocated() / 2**20 - before
    starts = [timer.begins[0], *timer.ends[:-1]]
    times = [end - start for start, end in zip(starts, timer.ends)]
    perturbation = getattr(trainer, "perturbation", None)
    perturbed = [] if perturbation is None else [
        t for t in range(1, opts.steps + 1) if perturbation.perturbs_step(t, opts.steps)]
    steady = times[1:] or times
    out.update({
        "steps_s": times, "step_s": statistics.median(steady), "whole_run_s": timer.ends[-1] - timer.begins[0],
        "perturbed_steps": perturbed,
        "perturbed_step_s": statistics.mean([times[t - 1] for t in perturbed]) if perturbed else None,
        "unperturbed_step_s": statistics.mean([x for t, x in enumerate(times, 1) if t not in perturbed])
        if len(perturbed) < len(times) else None,
    })
    return out


def child(opts, arch, method, what):
    """Fork a fresh process (the imports are done, torch has run nothing) that takes one reading."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:  # end with the parent if it is killed (PR_SET_PDEATHSIG = 1, SIGKILL)
            ctypes.CDLL("libc.so.6").prctl(1, 9)
        except (OSError, AttributeError):
            pass
        os.close(read)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the Trainer's log lines; errors come back through the pipe
        code = 0
        try:
            payload = {"ok": measure(opts, arch, method, what)}
        except BaseException:  # noqa: BLE001  (reported to the parent)
            payload, code = {"error": traceback.format_exc()}, 1
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(payload))
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    payload = json.loads(text) if text else {"error": "the child died without a result (out of memory?)"}
    if "error" in payload:  # reported, and the other readings go on; main() exits non-zero at the end
        print(f"{arch} {method} ({what}) failed:\n{payload['error']}", file=sys.stderr)
        return None
    return payload["ok"]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def main(argv=None):
    opts = parse(argv)
    # the imports, once, before any fork (the children inherit them)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import hf_flat  # noqa: F401

    started = time.time()
    results, failed = [], []
    for arch in opts.archs:
        methods = opts.fid_methods if arch == "fid" else opts.methods
        for method in methods:
            load = os.getloadavg()[0]
            r = child(opts, arch, method, "time")
            if r is not None and "peak_extra_mb" not in r:
                memory = child(opts, arch, method, "memory")
                r = None if memory is None else {**r, "peak_extra_mb": memory["peak_extra_mb"]}
            if r is None:
                failed.append(f"{arch} {method}")
                if method == "plain":  # no baseline: the architecture's other readings mean nothing
                    break
                continue
            r["load_before"] = load
            results.append(r)
            print(f"  {arch} {method}: {r['step_s']:.3f} s/step, peak +{r['peak_extra_mb']:.0f} MB "
                  f"({time.time() - started:.0f} s so far)", file=sys.stderr)
    elapsed = time.time() - started

    if not results:
        sys.exit(f"every reading failed: {failed}")
    # ratios against the plain Trainer of the same architecture, measured in this run
    for r in results:
        base = next(b for b in results if b["arch"] == r["arch"] and b["method"] == "plain")
        scheduled = r["flat"].get("sam_interval", 1) > 1
        r["ratio"] = r["whole_run_s"] / base["whole_run_s"] if scheduled else r["step_s"] / base["step_s"]
        r["ratio_measure"] = "whole run" if scheduled else "median of steps 2..T"
        r["extra_over_plain_mb"] = r["peak_extra_mb"] - base["peak_extra_mb"]
        r["extra_copies"] = r["extra_over_plain_mb"] / r["trainable_mb"]
        if scheduled and r["perturbed_step_s"] and r["unperturbed_step_s"]:
            # sam_interval=5 over a long run: one perturbed step in five
            r["ratio_interval5_estimate"] = (r["perturbed_step_s"] + 4 * r["unperturbed_step_s"]) / 5 / base["step_s"]
        r["seconds_per_sample"] = r["step_s"] / r["batch"]
        # extrapolation to the paper's run (linear in the batch and, for FiD, in the passages)
        scale = PAPER[r["arch"]]["batch"] / r["batch"]
        if r["arch"] == "fid":
            scale *= PAPER["fid"]["passages"] / r["passages"]
        per_paper_sample = r["seconds_per_sample"] * (PAPER["fid"]["passages"] / r["passages"] if r["arch"] == "fid" else 1)
        r["extrapolation"] = {
            "seconds_per_paper_sample": per_paper_sample,
            "runs": [{"run": name, "samples": n, "hours": per_paper_sample * n / 3600}
                     for name, n in PAPER[r["arch"]]["runs"]],
            "activation_scale": scale,
        }
        fixed = 4 * r["trainable_mb"]  # weights, gradients, AdamW's two moments
        activations = base["peak_extra_mb"] + r["trainable_mb"] - fixed  # plain's peak over the weights, minus 3 copies
        r["extrapolation"].update({
            "fixed_mb": fixed, "method_extra_mb": r["extra_over_plain_mb"], "activations_measured_mb": activations,
            "paper_peak_mb": fixed + max(r["extra_over_plain_mb"], 0.0) + max(activations, 0.0) * scale,
        })

    first = results[0]
    lines = [f"Device: {first['device']}, torch {first['torch']}, transformers {first['transformers']}; "
             f"{'TINY configs (CI) ' if opts.tiny else 'real sizes '}; timed run of T={opts.steps} optimizer steps "
             f"after {opts.warmup} untimed, memory run of {opts.memory_steps} steps; {elapsed:.0f} s in all; "
             f"1-minute load average before the timing runs {min(r['load_before'] for r in results):.2f} to "
             f"{max(r['load_before'] for r in results):.2f}.", ""]
    lines.append("Batch used here vs the paper's: " + "; ".join(
        f"{a}: {next(r for r in results if r['arch'] == a)['batch']}"
        + (f" x {next(r for r in results if r['arch'] == a)['passages']} passages" if a == "fid" else "")
        + f" (paper: {PAPER[a]['batch']}{' x 100 passages x grad accum 64' if a == 'fid' else ''}; {PAPER[a]['source']})"
        for a in dict.fromkeys(r["arch"] for r in results)) + ".")
    lines += ["", "| architecture | method | params | batch | precision | step (s) | vs plain Trainer | measured by "
              "| peak memory over start of train() (MB) | over plain (MB) | in copies of the weights |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shape = f"{r['batch']}" + (f" x {r['passages']}p" if r["passages"] else "")
        note = f" (sam_interval=5 est. {r['ratio_interval5_estimate']:.2f}x)" if "ratio_interval5_estimate" in r else ""
        lines.append(f"| {r['arch']} | {r['method']} | {r['params'] / 1e6:.2f}M | {shape} | {r['precision']} "
                     f"| {r['step_s']:.3f} | {r['ratio']:.2f}x{note} | {r['ratio_measure']} | {r['peak_extra_mb']:.0f} "
                     f"| {r['extra_over_plain_mb']:+.0f} | {r['extra_copies']:+.2f} |")
    lines += ["", "Extrapolation to the paper's runs, from this machine (not a measurement): time = seconds per sample "
              "at the measured batch (FiD: x 100 / passages) x the paper's samples; memory = 4 copies of the weights "
              "(weights, gradients, AdamW) + the method's extra over plain + plain's activations x (paper batch / "
              "batch) (FiD: x 100 / passages). Linear assumptions: time per sample and activation memory independent "
              "of the batch (measured at a reduced batch, a CPU's time per sample does not fall with the batch as a GPU's does), FiD's cost linear in "
              "the passages (each passage is encoded on its own; the decoder's cross-attention is linear in them), "
              f"precision as measured ({', '.join(sorted({r['precision'] for r in results}))}"
              + ("; bf16/fp16 autocast roughly halves the activations)." if first["precision"] == "fp32" else ")."), "",
              "| architecture | method | s/sample here | arithmetic | hours | paper-batch peak (GB): arithmetic |",
              "|---|---|---|---|---|---|"]
    for r in results:
        e = r["extrapolation"]
        for run in e["runs"]:
            fid = f" x {PAPER['fid']['passages']}/{r['passages']}" if r["arch"] == "fid" else ""
            lines.append(
                f"| {r['arch']} | {r['method']} | {r['seconds_per_sample']:.4f} | {r['seconds_per_sample']:.4f}{fid} x "
                f"{run['samples']:,} ({run['run']}) / 3600 | {run['hours']:,.1f} | {e['fixed_mb']:.0f} + "
                f"{max(e['method_extra_mb'], 0):.0f} + {max(e['activations_measured_mb'], 0):.0f} x {e['activation_scale']:g} "
                f"= {e['paper_peak_mb'] / 1024:.1f} |")
    print("\n" + "\n".join(lines))
    if opts.markdown:
        model, cpus = machine()
        header = [f"# Paper-scale step time and memory ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})",
                  "", f"- command: `{shlex.join(['python', *sys.argv]) if argv is None else shlex.join(argv)}`",
                  f"- CPU: {model}, {cpus} CPU(s) (lscpu); device used: {first['device']}",
                  f"- torch {first['torch']}, transformers {first['transformers']}, Python {platform.python_version()}", ""]
        with open(opts.markdown, "w") as f:
            f.write("\n".join(header + lines) + "\n")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump({"options": vars(opts), "paper": PAPER, "elapsed_s": elapsed, "results": results}, f, indent=2)
    bad = [(r["arch"], r["method"]) for r in results if not (finite(r["ratio"]) and finite(r["peak_extra_mb"]))]
    if bad or failed:
        sys.exit(f"non-finite readings: {bad}; failed readings (their errors above): {failed}")
    return results


if __name__ == "__main__":
    main()
