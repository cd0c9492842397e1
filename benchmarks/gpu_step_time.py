"""GPU step time of every flat method against the plain `transformers.Trainer`, with a noise check.

One command, for a GPU session's first minutes (estimated 7 minutes on an H100/H200, model builds
included; ``--budget_minutes``, default 8, caps it)::

    python benchmarks/gpu_step_time.py                 # -> benchmarks/results/gpu_step_time.{md,json}
    python benchmarks/gpu_step_time.py --dry_run       # the same code paths on the CPU, tiny models, ~30 s

It runs from a checkout without installing (it puts the repository root first on ``sys.path``).

**What is timed.** Each (model, method) run is one `trainer.train()` of ``W + T`` optimizer steps
(``--warmup`` W, default 5, and ``--steps`` T, default 30): the W untimed steps of the same method
and shapes warm up the allocator, cuBLAS/cuDNN's kernel selection, AdamW's state and the method's
own buffers; the T steps after them are timed. A step's time is the time from the end of the step
before to the end of this one, read from CUDA events recorded in a `TrainerCallback`'s
``on_step_end`` (no synchronisation is added inside or between steps; the events are read after a
``torch.cuda.synchronize()`` at the end of the run), so it holds everything a step costs on the
GPU's timeline, the method's callbacks, the data fetch and any wait for the host included. On the
CPU (``--dry_run``) the same points are read with ``time.perf_counter``.

**Rounds.** ``--rounds`` R (default 3) rounds, interleaved across methods and models: round 1
runs every method of every model of a process once, then round 2 again, in reverse order (so a
slow drift of the clocks or the machine falls on every method alike), and so on. For each method
the table gives the median over rounds of the per-round median step (the "step time"), the spread
of those per-round medians (min-max), and the same for the whole-run time (the mean step of each
round's T steps). Ratios are to the plain `transformers.Trainer` of the same model in the same
process: the ratio of those medians, and each round's ratio to the plain Trainer's run of the same
round (min-max, the noise a reader should allow).

**Noise check.** ``flat_method="none"`` is `FlatTrainer` on the same code path as the plain
Trainer. Its ratio to the plain Trainer, by median step and by whole run, must be within +-2%
(``--noise_tolerance``) in every model; if not, the Markdown says in bold that the figures are not
trustworthy, and the JSON has ``"trustworthy": false``.

**Models** (built from configs, random data of the real shape, kept on the GPU so that the data
pipeline costs the same few microseconds for every method; AdamW, torch's fused implementation on
CUDA, the same for every method; learning rate 1e-4, constant schedule; no logging):

- ``vit_b32``: ViT-B/16 (`ViTConfig` defaults: hidden 768, 12 layers, patch 16, 224x224 images,
  1000 classes), batch 32, bf16: every method, with the targets below.
- ``roberta``: RoBERTa-base (`RobertaConfig` defaults, 2 labels), batch 16 x 128 tokens, bf16: every
  method, with the targets.
- ``vit_b32_fp16``: the same ViT-B/16, batch 32, fp16 (GradScaler): plain, none, sam, mesa.
- ``vit_b100``: the same ViT-B/16, batch 100, bf16: the subset plain, none, sam, avg_sam, mesa, swa,
  wasam.
- ``lm``: a Llama-style causal LM of 124M parameters (`LlamaConfig`: hidden 768, 12 layers, 12
  heads, MLP 2560, vocabulary 32000, tied embeddings), batch 8 x 512 tokens, bf16: the same subset
  (SAF, refused by hf_flat for per-token logits, is not in it).
- ``lm_lora``: the same LM with a LoRA adapter (peft `get_peft_model`, r 16, alpha 32, on q, k, v
  and o projections), same batch: the same subset.

Every model is built once per process (one process per architecture: ViT, RoBERTa, the LM), kept
as a pristine copy, and each run trains a `copy.deepcopy` of it: every method starts from the same
initial weights and a model no earlier Trainer has touched (no accelerate autocast wrapper or hook
left over from a previous run).

**Methods** (`PRESETS`): plain (`transformers.Trainer`), none, sam (rho 0.05), asam (rho 0.5),
gsam, looksam (k 5), esam (beta 0.6, gamma 0.5), avg_sam (rho 0.5), saf (term from epoch 1:
``saf_start_epoch=0``, ``saf_past_epochs=1``), mesa (``mesa_start_epoch=0``), swa, ema, lawa and
wasam (``average_start=0``; swa, lawa and wasam take a snapshot every ``--epoch_steps`` steps). The
data set holds ``--epoch_steps`` E (default 5, at most W) batches, so epoch 0 lies inside the
warm-up: SAF's term (it needs each sample's logits from the epoch before, kept per index of the
map-style data set) is on in every timed step, and the averaging methods snapshot inside the timed
steps. LookSAM's SAM steps fall on every 5th step; T is a multiple of 5, so the timed steps hold
exactly T / 5 of them whatever W is.

**Targets** (the issue's, on ``vit_b32`` and ``roberta``): SAM and ASAM <= 2.05x, GSAM <= 2.15x,
ESAM <= 1.80x, average SAM <= 1.05x, SAF <= 1.03x, MESA <= 1.25x by median step; LookSAM (k = 5)
<= 1.30x and SWA / EMA / LAWA <= 1.02x over a run (the whole-run time, since their extra work
falls on some steps only); WASAM within 0.03 of SAM, both over a run. The table gives pass/fail and
by how much a miss is.

**Budget.** Before it starts, the script prints its estimate of the time on an H100-class GPU (the
assumed plain step times of `ASSUMED_H100_STEP_MS` x each method's assumed cost x the steps, plus
each Trainer's set-up and each process's start and model builds). With ``--budget_minutes`` B it
drops the optional models (``vit_b100``, then ``lm_lora``, ``lm``, ``vit_b32_fp16``) until the
estimate fits, and each process stops starting new rounds when another would pass its share of
B: a run cut short says so (fewer than 3 rounds are flagged). ``--cases``, ``--methods``,
``--steps``, ``--warmup`` and ``--rounds`` size it by hand.

**Output**: exactly one Markdown file and one JSON file (``--markdown``, ``--output``), with the
machine (GPU, CPU, versions of torch, CUDA, transformers, accelerate, peft, the hf_flat commit) and
the date.

**Dry run** (``--dry_run``): tiny versions of every model, W 2, T 5, E 2, 2 rounds, every model and
method, on the CPU (``use_cpu=True``) in bf16 autocast; the fp16 model runs with ``fp16=True`` on
the CPU too if this torch / accelerate accept it (CPU autocast in fp16 and a GradScaler), and in
float32 otherwise, which the output then says. Its figures are no measurement.
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # hf_flat from this checkout, without installing it

#: optimizer steps per epoch (the data set holds this many batches); SWA / LAWA / WASAM snapshot this often
EPOCH_STEPS = 5


def presets(epoch_steps):
    """name -> FlatTrainingArguments overrides (None: the plain `transformers.Trainer`)."""
    average = {"average_start": 0.0, "average_freq": epoch_steps}
    return {
        "plain": None,
        "none": {"flat_method": "none"},
        "sam": {"flat_method": "sam", "sam_rho": 0.05},
        "asam": {"flat_method": "asam", "sam_rho": 0.5},
        "gsam": {"flat_method": "gsam"},
        "looksam": {"flat_method": "looksam", "looksam_k": 5},
        "esam": {"flat_method": "esam", "esam_beta": 0.6, "esam_gamma": 0.5},
        "avg_sam": {"flat_method": "avg_sam", "sam_rho": 0.5},
        "saf": {"flat_method": "saf", "saf_start_epoch": 0, "saf_past_epochs": 1},
        "mesa": {"flat_method": "mesa", "mesa_start_epoch": 0},
        "swa": {"flat_method": "swa", **average},
        "ema": {"flat_method": "ema", "average_start": 0.0},
        "lawa": {"flat_method": "lawa", **average},
        "wasam": {"flat_method": "wasam", "sam_rho": 0.05, **average},
    }


ALL_METHODS = list(presets(EPOCH_STEPS))
#: methods whose cost is read over a whole run (their extra work falls on some steps only)
WHOLE_RUN = ("looksam", "swa", "ema", "lawa", "wasam")
#: method -> (what the issue asks, the largest ratio allowed, the measure); wasam: against sam
TARGETS = {
    "sam": ("SAM", 2.05, "median"),
    "asam": ("ASAM (rho 0.5)", 2.05, "median"),
    "gsam": ("GSAM", 2.15, "median"),
    "esam": ("ESAM (beta 0.6, gamma 0.5)", 1.80, "median"),
    "looksam": ("LookSAM (k = 5), over a run", 1.30, "whole run"),
    "avg_sam": ("average SAM (rho 0.5)", 1.05, "median"),
    "saf": ("SAF", 1.03, "median"),
    "mesa": ("MESA", 1.25, "median"),
    "swa": ("SWA, over a run", 1.02, "whole run"),
    "ema": ("EMA, over a run", 1.02, "whole run"),
    "lawa": ("LAWA, over a run", 1.02, "whole run"),
    "wasam": ("WASAM within 0.03 of SAM, over a run", 0.03, "whole run"),
}
SUBSET = ["plain", "none", "sam", "avg_sam", "mesa", "swa", "wasam"]  # (SAF: refused for an LM's per-token logits)

#: name -> the model, its batch and precision, its methods, and the process ("group") it runs in
CASES = {
    "vit_b32": dict(group="vit", model="vit", batch=32, precision="bf16", methods=ALL_METHODS, targets=True,
                    label="ViT-B/16, batch 32, 224x224, bf16"),
    "roberta": dict(group="roberta", model="roberta", batch=16, seq=128, precision="bf16", methods=ALL_METHODS,
                    targets=True, label="RoBERTa-base, batch 16 x 128 tokens, bf16"),
    "vit_b32_fp16": dict(group="vit", model="vit", batch=32, precision="fp16", methods=["plain", "none", "sam", "mesa"],
                         label="ViT-B/16, batch 32, 224x224, fp16"),
    "vit_b100": dict(group="vit", model="vit", batch=100, precision="bf16", methods=SUBSET,
                     label="ViT-B/16, batch 100, 224x224, bf16"),
    "lm": dict(group="lm", model="lm", batch=8, seq=512, precision="bf16", methods=SUBSET,
               label="Causal LM (Llama-style, 124M), batch 8 x 512 tokens, bf16"),
    "lm_lora": dict(group="lm", model="lm_lora", batch=8, seq=512, precision="bf16", methods=SUBSET,
                    label="The same LM with LoRA (r 16, q/k/v/o), batch 8 x 512 tokens, bf16"),
}
#: dropped in this order when the estimate passes --budget_minutes
OPTIONAL_CASES = ["vit_b100", "lm_lora", "lm", "vit_b32_fp16"]
GROUP_ORDER = ["vit", "roberta", "lm"]
#: tiny sizes for --dry_run (batch per case)
DRY_BATCH = {"vit_b32": 4, "roberta": 4, "vit_b32_fp16": 4, "vit_b100": 6, "lm": 2, "lm_lora": 2}
DRY_SEQ = 16

#: the estimate: the plain Trainer's step on an H100 (ms, guesses from the earlier H100/H200 runs and
#: the models' FLOPs), each method's cost in plain steps, and fixed costs (seconds)
ASSUMED_H100_STEP_MS = {"vit_b32": 30, "roberta": 25, "vit_b32_fp16": 33, "vit_b100": 70, "lm": 30, "lm_lora": 25}
ASSUMED_COST = {"plain": 1.0, "none": 1.0, "sam": 2.1, "asam": 2.2, "gsam": 2.3, "looksam": 1.3, "esam": 2.0,
                "avg_sam": 1.2, "saf": 1.05, "mesa": 1.5, "swa": 1.05, "ema": 1.05, "lawa": 1.05, "wasam": 2.15}
ASSUMED_RUN_SETUP_S = 0.5  # one Trainer: model copy, __init__, accelerate's prepare, the optimizer, teardown
ASSUMED_PROCESS_S = {"vit": 20.0, "roberta": 15.0, "lm": 20.0}  # interpreter, imports, CUDA context, builds
DRY_STEP_MS, DRY_RUN_SETUP_S, DRY_PROCESS_S = 8.0, 0.06, 7.0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="models to run (default: all)")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="only these methods (plain and none are always run: the baseline and the noise check)")
    p.add_argument("--steps", type=int, default=None, help="T: timed optimizer steps per run (default 30; dry run 5)")
    p.add_argument("--warmup", type=int, default=None, help="W: untimed steps before them (default 5; dry run 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds interleaved across methods (default 3; dry run 2)")
    p.add_argument("--epoch_steps", type=int, default=None,
                   help=f"batches in the data set, at most W (default {EPOCH_STEPS}; dry run 2)")
    p.add_argument("--budget_minutes", type=float, default=8.0,
                   help="drop optional models until the estimate fits, and stop starting rounds past it (0: no limit)")
    p.add_argument("--noise_tolerance", type=float, default=0.02, help="largest |none / plain - 1| that is trusted")
    p.add_argument("--dry_run", action="store_true",
                   help="tiny models on the CPU, few steps, 2 rounds: every code path, no measurement")
    p.add_argument("--markdown", default=None,
                   help="Markdown output (default benchmarks/results/gpu_step_time.md; dry run: ..._dry_run.md)")
    p.add_argument("--output", default=None,
                   help="JSON output (default benchmarks/results/gpu_step_time.json; dry run: ..._dry_run.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    dry = opts.dry_run
    opts.steps = opts.steps or (5 if dry else 30)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if dry else 5)
    opts.rounds = opts.rounds or (2 if dry else 3)
    opts.epoch_steps = opts.epoch_steps or (2 if dry else EPOCH_STEPS)
    suffix = "_dry_run" if dry else ""
    opts.markdown = opts.markdown or os.path.join(ROOT, "benchmarks", "results", f"gpu_step_time{suffix}.md")
    opts.output = opts.output or os.path.join(ROOT, "benchmarks", "results", f"gpu_step_time{suffix}.json")
    if opts.warmup < 1:
        p.error("--warmup must be at least 1 (the first timed step is timed from the end of the last warm-up step)")
    if opts.epoch_steps > opts.warmup:
        p.error("--epoch_steps must be at most --warmup: epoch 0 must lie in the warm-up, so that SAF's term is on "
                "in every timed step")
    if opts.steps % 5:
        p.error("--steps must be a multiple of 5 (LookSAM's k): the timed steps then hold exactly steps / 5 SAM steps")
    return opts


def plan(opts):
    """{case: its methods} in the order they run, after --cases and --methods."""
    out = {}
    for name in opts.cases:
        methods = CASES[name]["methods"]
        if opts.methods:
            methods = [m for m in methods if m in ("plain", "none") or m in opts.methods]
        out[name] = methods
    return out


def groups_of(cases):
    return [g for g in GROUP_ORDER if any(CASES[c]["group"] == g for c in cases)]


def estimate_s(cases, steps, warmup, rounds, dry=False):
    """(seconds, {process: seconds}) the run should take on an H100-class GPU (`dry`: on this CPU, tiny
    models): steps x assumed step times, each run's set-up, each process's start and its warm-up run."""
    total, per_group = 0.0, {}
    for case, methods in cases.items():
        step = DRY_STEP_MS if dry else ASSUMED_H100_STEP_MS[case]
        setup = DRY_RUN_SETUP_S if dry else ASSUMED_RUN_SETUP_S
        per_round = sum(ASSUMED_COST[m] * step / 1000 * (warmup + steps) + setup for m in methods)
        group = CASES[case]["group"]
        # + the process's untimed plain run of each model before round 1
        per_group[group] = per_group.get(group, 0.0) + per_round * rounds + step / 1000 * (warmup + steps) + setup
    for group in per_group:
        per_group[group] += DRY_PROCESS_S if dry else ASSUMED_PROCESS_S[group]
        total += per_group[group]
    return total, per_group


# --------------------------------------------------------------------------------------------------
# the child: one process per architecture
# --------------------------------------------------------------------------------------------------


def build_models(kinds, dry, device):
    """{kind: pristine model} (built once, on `device`), and their parameter counts."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    models = {}
    for kind in kinds:
        torch.manual_seed(0)
        with torch.device(device):
            if kind == "vit":
                cfg = (ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=10) if dry else ViTConfig(num_labels=1000))
                models[kind] = ViTForImageClassification(cfg)
            elif kind == "roberta":
                cfg = (RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=DRY_SEQ + 2, num_labels=2)
                       if dry else RobertaConfig(num_labels=2))
                models[kind] = RobertaForSequenceClassification(cfg)
            elif kind in ("lm", "lm_lora"):
                if "lm" not in models:
                    cfg = (LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True) if dry else
                           LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                                       tie_word_embeddings=True))
                    models["lm"] = LlamaForCausalLM(cfg)
                if kind == "lm_lora":
                    from peft import LoraConfig, get_peft_model

                    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
                    models[kind] = get_peft_model(copy.deepcopy(models["lm"]), lora)
    counts = {k: {"params": sum(p.numel() for p in m.parameters()),
                  "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                  "trainable_mb": sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad) / 2**20}
              for k, m in models.items()}
    return models, counts


def make_dataset(case, n, dry, device, vocab):
    """A map-style data set of `n` random examples of the case's shape, held on `device` (SAF keeps its
    memory per index of it)."""
    import torch

    spec = CASES[case]
    g = torch.Generator().manual_seed(0)
    seq = DRY_SEQ if dry else spec.get("seq")

    class Examples(torch.utils.data.Dataset):
        def __init__(self, columns):
            self.columns = {k: v.to(device) for k, v in columns.items()}

        def __len__(self):
            return n

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.columns.items()}

        def __getitems__(self, indices):
            return [self[i] for i in indices]

    if spec["model"] == "vit":
        size, classes = (32, 10) if dry else (224, 1000)
        return Examples({"pixel_values": torch.randn(n, 3, size, size, generator=g),
                         "labels": torch.randint(0, classes, (n,), generator=g)})
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    if spec["model"] == "roberta":
        return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "labels": torch.randint(0, 2, (n,), generator=g)})
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})


def fp16_on_cpu_works():
    """Whether this torch / accelerate train with fp16=True on the CPU (autocast in float16 + GradScaler)."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from hf_flat import FlatTrainer, TrainingArguments

    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

            def forward(self, x, labels=None):
                logits = self.net(x)
                return {"loss": torch.nn.functional.cross_entropy(logits.float(), labels), "logits": logits}

        data = [{"x": torch.randn(4), "labels": i % 2} for i in range(4)]
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=2, fp16=True,
                                 use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                                 flat_method="sam")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = FlatTrainer(model=Tiny(), args=args, train_dataset=data)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        return True, ""
    except Exception as e:  # noqa: BLE001 - any refusal means: not on this CPU
        return False, f"{type(e).__name__}: {str(e)[:200]}"


def child(opts):
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from hf_flat import FlatTrainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    started = time.time()
    cuda = torch.cuda.is_available() and not opts.dry_run
    device = "cuda" if cuda else "cpu"
    cases = {c: m for c, m in plan(opts).items() if CASES[c]["group"] == opts.child}
    kinds = []
    for c in cases:
        if CASES[c]["model"] not in kinds:
            kinds.append(CASES[c]["model"])
    models, counts = build_models(kinds, opts.dry_run, device)
    built_s = time.time() - started
    # what exists now (modules, the pristine models) lives to the end: out of the collector's sight, the
    # gc.collect() before each run (and accelerate's at each run's end) is milliseconds, not 0.2 s
    gc.collect()
    gc.freeze()
    precision_used, fp16_note = {}, ""
    for c in cases:
        precision = CASES[c]["precision"]
        if precision == "fp16" and not cuda:
            ok, why = fp16_on_cpu_works()
            if not ok:
                precision, fp16_note = "fp32", f"fp16 on the CPU refused here ({why}): run in float32"
        precision_used[c] = precision
    datasets = {}
    for c in cases:
        batch = DRY_BATCH[c] if opts.dry_run else CASES[c]["batch"]
        vocab = getattr(models[CASES[c]["model"]], "config", None)
        vocab = getattr(vocab, "vocab_size", 0) or 0
        datasets[c] = (batch, make_dataset(c, opts.epoch_steps * batch, opts.dry_run, device, vocab))

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.ends.append(event)
            else:
                self.ends.append(time.perf_counter())

        def step_ms(self, warmup):
            """The timed steps' times (ms): each from the end of the step before."""
            if cuda:
                torch.cuda.synchronize()
                return [a.elapsed_time(b) for a, b in zip(self.ends[warmup - 1:-1], self.ends[warmup:])]
            return [1000 * (b - a) for a, b in zip(self.ends[warmup - 1:-1], self.ends[warmup:])]

    def run(case, method):
        spec = CASES[case]
        flat = presets(opts.epoch_steps)[method]
        batch, dataset = datasets[case]
        precision = precision_used[case]
        model = copy.deepcopy(models[spec["model"]])
        args_cls = transformers.TrainingArguments if flat is None else TrainingArguments
        trainer_cls = Trainer if flat is None else FlatTrainer
        args = args_cls(
            output_dir=tempfile.mkdtemp(prefix="gpu_step_time_"), max_steps=opts.warmup + opts.steps,
            per_device_train_batch_size=batch, learning_rate=1e-4, lr_scheduler_type="constant",
            optim="adamw_torch_fused" if cuda else "adamw_torch", save_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, bf16=precision == "bf16", fp16=precision == "fp16",
            use_cpu=not cuda, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
            **(flat or {}),
        )
        clock = Clock()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's printer: the final metrics line
        trainer.train()
        times = clock.step_ms(opts.warmup)
        wall = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
        assert len(times) == opts.steps, (len(times), opts.steps)
        perturbation = getattr(trainer, "perturbation", None)
        perturbed = None
        if perturbation is not None and hasattr(perturbation, "perturbs_step"):
            total = opts.warmup + opts.steps
            perturbed = sum(bool(perturbation.perturbs_step(t, total)) for t in range(opts.warmup + 1, total + 1))
        trajectory = getattr(trainer, "trajectory", None)
        del trainer, model
        return {"steps_ms": times, "median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
                "peak_extra_mb": peak, "run_wall_s": wall, "perturbed_steps": perturbed,
                "trajectory_on": None if trajectory is None else bool(getattr(trajectory, "active", True))}

    runs = {c: {m: [] for m in ms} for c, ms in cases.items()}
    errors = {}
    info = {
        "group": opts.child, "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "cuda": cuda, "torch": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "transformers": transformers.__version__,
        "model_counts": counts, "precision_used": precision_used, "fp16_note": fp16_note, "build_s": built_s,
        "hf_flat_path": os.path.dirname(os.path.abspath(sys.modules["hf_flat"].__file__)),
    }
    warmed_s = None
    for name in ("accelerate", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    order = [(c, m) for c, ms in cases.items() for m in ms]
    round_s, rounds_done, stopped = [], 0, None

    def save():
        with open(opts.child_out, "w") as f:
            json.dump({"info": {**info, "warmed_s": warmed_s}, "runs": runs, "errors": errors, "rounds_done": rounds_done, "round_s": round_s,
                       "stopped": stopped, "process_s": time.time() - started}, f)

    # one untimed plain run per model before round 1: the process's first cuBLAS / cuDNN handles,
    # kernel choices and allocator pools are made here, not in round 1's first method
    for case in cases:
        try:
            run(case, "plain")
        except Exception as e:  # noqa: BLE001 - round 1 records the error
            print(f"  {case}: the untimed plain run failed: {type(e).__name__}: {e}", file=sys.stderr)
    warmed_s = time.time() - started
    for r in range(opts.rounds):
        if r and opts.child_seconds and time.time() - started + max(round_s) > opts.child_seconds:
            stopped = (f"stopped after {r} of {opts.rounds} rounds: another round ({max(round_s):.0f} s) would pass "
                       f"this process's share of --budget_minutes ({opts.child_seconds:.0f} s)")
            print("  " + stopped, file=sys.stderr)
            break
        t_round = time.time()
        for case, method in (order if r % 2 == 0 else order[::-1]):
            if f"{case}/{method}" in errors:
                continue
            try:
                result = run(case, method)
            except Exception as e:  # noqa: BLE001 - recorded, and the other methods go on
                errors[f"{case}/{method}"] = f"{type(e).__name__}: {e}"
                print(f"  {case} {method}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}",
                      file=sys.stderr)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            result["round"] = r + 1
            runs[case][method].append(result)
            print(f"  round {r + 1}, {case}, {method}: median {result['median_ms']:.2f} ms, mean "
                  f"{result['mean_ms']:.2f} ms ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
        round_s.append(time.time() - t_round)
        rounds_done = r + 1
        save()  # after every round: a process cut short still leaves its finished rounds
    save()


# --------------------------------------------------------------------------------------------------
# the parent: plan, estimate, one child per architecture, tables
# --------------------------------------------------------------------------------------------------


def spread(values):
    return [min(values), max(values)] if values else None


def summarise(case, methods, runs, opts):
    """Per method: step and whole-run times (median over rounds, min-max), ratios to plain, per round."""
    out = {}
    plain = runs.get("plain") or []
    plain_by_round = {r["round"]: r for r in plain}
    for method in methods:
        rs = runs.get(method) or []
        if not rs:
            continue
        medians = [r["median_ms"] for r in rs]
        means = [r["mean_ms"] for r in rs]
        row = {
            "method": method, "rounds": len(rs), "step_ms": statistics.median(medians), "step_ms_rounds": medians,
            "step_ms_spread": spread(medians), "whole_run_ms": statistics.median(means), "whole_run_ms_rounds": means,
            "whole_run_ms_spread": spread(means),
            "step_ms_iqr_within_rounds": [quartiles(r["steps_ms"]) for r in rs],
            "peak_extra_mb": statistics.median([r["peak_extra_mb"] for r in rs]) if rs[0]["peak_extra_mb"] is not None
            else None,
            "perturbed_steps": rs[0]["perturbed_steps"], "measure": "whole run" if method in WHOLE_RUN else "median",
            "flat": presets(opts.epoch_steps)[method],
        }
        if plain:
            base_step = statistics.median([r["median_ms"] for r in plain])
            base_whole = statistics.median([r["mean_ms"] for r in plain])
            row["ratio_median"] = row["step_ms"] / base_step
            row["ratio_whole_run"] = row["whole_run_ms"] / base_whole
            row["ratio_median_rounds"] = [r["median_ms"] / plain_by_round[r["round"]]["median_ms"]
                                          for r in rs if r["round"] in plain_by_round]
            row["ratio_whole_run_rounds"] = [r["mean_ms"] / plain_by_round[r["round"]]["mean_ms"]
                                             for r in rs if r["round"] in plain_by_round]
            row["ratio"] = row["ratio_whole_run"] if method in WHOLE_RUN else row["ratio_median"]
            if row["peak_extra_mb"] is not None and plain[0]["peak_extra_mb"] is not None:
                row["extra_over_plain_mb"] = row["peak_extra_mb"] - statistics.median(
                    [r["peak_extra_mb"] for r in plain])
        out[method] = row
    return out


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [q[0], q[2]]


def git_commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "hf_flat"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (hf_flat/ with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HF_FLAT_COMMIT", "unknown (no git here)")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def millions(n):
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def fmt_spread(values, unit="", digits=2):
    return f"{values[0]:.{digits}f}-{values[1]:.{digits}f}{unit}" if values else "-"


def main():
    opts = parse()
    if opts.child:
        return child(opts)
    started = time.time()
    cases = plan(opts)
    dropped = []
    # on a GPU: this run; in a dry run: the GPU run of the same cases and methods at the default sizes
    sizes = (30, 5, 3) if opts.dry_run else (opts.steps, opts.warmup, opts.rounds)
    estimate, per_group = estimate_s(cases, *sizes)
    if opts.budget_minutes and not opts.dry_run:
        for name in OPTIONAL_CASES:
            if estimate <= 60 * opts.budget_minutes:
                break
            if name in cases:
                del cases[name]
                dropped.append(name)
                estimate, per_group = estimate_s(cases, *sizes)
    here_estimate, here_groups = estimate_s(cases, opts.steps, opts.warmup, opts.rounds, dry=True)
    total_runs = sum(len(m) for m in cases.values()) * opts.rounds
    print(f"gpu_step_time: {len(cases)} models, {total_runs} runs of {opts.warmup} + {opts.steps} steps "
          f"({opts.rounds} rounds); estimated time on an H100-class GPU: {estimate / 60:.1f} min"
          + (" for the full run (30 timed steps, 3 rounds)" if opts.dry_run else "") + " ("
          + ", ".join(f"{g} {v:.0f} s" for g, v in per_group.items()) + ")"
          + (f"; this dry run: ~{here_estimate:.0f} s" if opts.dry_run else "")
          + (f"; dropped to fit --budget_minutes {opts.budget_minutes:g}: {', '.join(dropped)}" if dropped else ""),
          file=sys.stderr, flush=True)
    if estimate > 60 * opts.budget_minutes and opts.budget_minutes and not opts.dry_run:
        print(f"  the estimate still passes --budget_minutes {opts.budget_minutes:g}: rounds will be cut short",
              file=sys.stderr)
    budget_s = 60 * opts.budget_minutes if opts.budget_minutes and not opts.dry_run else 0.0
    groups = groups_of(cases)
    results, infos, failures = {}, {}, {}
    state = {"proc": None, "stop": False}

    def on_term(signum, frame):  # `timeout` or the device's limit: keep what was measured, write, and end
        state["stop"] = True
        if state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].terminate()

    signal.signal(signal.SIGTERM, on_term)

    def write():
        report = assemble(opts, cases, results, infos, failures, dropped, estimate, here_estimate,
                          time.time() - started)
        for path in (opts.markdown, opts.output):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(opts.markdown, "w") as f:
            f.write(markdown(report))
        with open(opts.output, "w") as f:
            json.dump(report, f, indent=1)
        return report

    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            if state["stop"]:
                failures[group] = "not run: the benchmark was stopped (SIGTERM)"
                continue
            out = os.path.join(tmp, f"{group}.json")
            # this process's share of the budget: its part of the estimate, scaled to the time left
            share = 0.0
            if budget_s:
                left = budget_s - (time.time() - started)
                rest = sum(per_group[g] for g in groups[groups.index(group):])
                share = max(60.0, left * per_group[group] / rest)
            argv = [sys.executable, os.path.abspath(__file__), "--child", group, "--child_out", out,
                    "--child_seconds", str(share), "--cases", *cases, "--steps", str(opts.steps),
                    "--warmup", str(opts.warmup), "--rounds", str(opts.rounds), "--epoch_steps", str(opts.epoch_steps)]
            if opts.methods:
                argv += ["--methods", *opts.methods]
            if opts.dry_run:
                argv.append("--dry_run")
            t0 = time.time()
            print(f"[{group}] {', '.join(c for c in cases if CASES[c]['group'] == group)} "
                  f"(estimated {here_groups[group] if opts.dry_run else per_group[group]:.0f} s"
                  + (f", its share of the budget {share:.0f} s" if share else "") + ")", file=sys.stderr, flush=True)
            state["proc"] = proc = subprocess.Popen(argv)
            try:
                # past 1.5 times its share the process is stopped; its finished rounds are kept
                proc.wait(timeout=1.5 * share + 30 if share else None)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
                failures[group] = f"stopped at 1.5 times its share of --budget_minutes ({1.5 * share + 30:.0f} s)"
            state["proc"] = None
            data = None
            if os.path.exists(out):
                with open(out) as f:
                    data = json.load(f)
            if group not in failures and (proc.returncode or data is None):
                failures[group] = f"exit status {proc.returncode}" + ("" if data else ", no results")
            if data:
                infos[group] = {**data["info"], "rounds_done": data["rounds_done"], "round_s": data["round_s"],
                                "stopped": data["stopped"], "process_s": data["process_s"], "errors": data["errors"]}
                for case, runs in data["runs"].items():
                    results[case] = summarise(case, cases[case], runs, opts)
            print(f"[{group}] done in {time.time() - t0:.0f} s ({time.time() - started:.0f} s so far)", file=sys.stderr,
                  flush=True)
            write()  # after every process: a run stopped later still leaves what was measured
    report = write()
    elapsed = report["elapsed_s"]
    print(f"gpu_step_time: {elapsed:.0f} s; wrote {opts.markdown} and {opts.output}; "
          + ("figures TRUSTWORTHY by the noise check" if report["trustworthy"] else
             "figures NOT TRUSTWORTHY (noise check failed or incomplete)"), file=sys.stderr)
    return 0 if not failures else 1


def assemble(opts, cases, results, infos, failures, dropped, estimate, here_estimate, elapsed):
    """Everything the two output files hold, as one dict (the JSON file)."""
    first = next(iter(infos.values()), {})
    noise = {}
    for case in cases:
        rows = results.get(case, {})
        none = rows.get("none")
        if none is None or "ratio_median" not in none:
            noise[case] = {"ok": False, "why": "no none/plain pair measured"}
            continue
        devs = [abs(none["ratio_median"] - 1), abs(none["ratio_whole_run"] - 1)]
        noise[case] = {"none_vs_plain_median": none["ratio_median"], "none_vs_plain_whole_run": none["ratio_whole_run"],
                       "rounds_median": none["ratio_median_rounds"], "rounds_whole_run": none["ratio_whole_run_rounds"],
                       "ok": max(devs) <= opts.noise_tolerance}
    rounds_done = {g: i["rounds_done"] for g, i in infos.items()}
    complete = all(CASES[c]["group"] in infos for c in cases) and not failures
    enough_rounds = all(v >= 3 for v in rounds_done.values()) and opts.steps >= 30
    targets = []
    for case in cases:
        if not CASES[case].get("targets"):
            continue
        rows = results.get(case, {})
        for method, (label, limit, measure) in TARGETS.items():
            row = rows.get(method)
            if method not in cases[case]:
                continue
            entry = {"case": case, "method": method, "target": label, "limit": limit, "measure": measure}
            if row is None or "ratio" not in row:
                entry.update(value=None, passed=False, miss=None, note="not measured")
            elif method == "wasam":
                sam = rows.get("sam")
                if sam is None:
                    entry.update(value=None, passed=False, miss=None, note="sam not measured")
                else:
                    gap = row["ratio_whole_run"] - sam["ratio_whole_run"]
                    entry.update(value=gap, wasam=row["ratio_whole_run"], sam=sam["ratio_whole_run"],
                                 passed=gap <= limit, miss=max(0.0, gap - limit))
            else:
                value = row["ratio"]
                per_round = row["ratio_whole_run_rounds"] if measure == "whole run" else row["ratio_median_rounds"]
                entry.update(value=value, passed=value <= limit, miss=max(0.0, value - limit),
                             rounds=per_round, other_measure=row["ratio_median"] if measure == "whole run"
                             else row["ratio_whole_run"])
            targets.append(entry)
    trustworthy = complete and enough_rounds and bool(noise) and all(n["ok"] for n in noise.values()) \
        and not opts.dry_run
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable if not sys.executable.startswith(ROOT) else
                               os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "dry_run": opts.dry_run,
        "machine": {"device": first.get("device"), "cpu": cpu_model(), "python": platform.python_version(),
                    "torch": first.get("torch"), "cuda": first.get("cuda_version"), "cudnn": first.get("cudnn"),
                    "transformers": first.get("transformers"), "accelerate": first.get("accelerate"),
                    "peft": first.get("peft"), "hf_flat_commit": git_commit()},
        "settings": {"warmup": opts.warmup, "steps": opts.steps, "rounds": opts.rounds, "epoch_steps": opts.epoch_steps,
                     "noise_tolerance": opts.noise_tolerance, "budget_minutes": opts.budget_minutes,
                     "cases": {c: {**{k: v for k, v in CASES[c].items() if k != "methods"}, "methods": m,
                                   **({"batch": DRY_BATCH[c]} if opts.dry_run else {})} for c, m in cases.items()},
                     "dropped_for_budget": dropped, "presets": presets(opts.epoch_steps), "whole_run_methods": WHOLE_RUN},
        "estimate_h100_s": estimate, "estimate_here_s": here_estimate, "elapsed_s": elapsed,
        "processes": infos, "failures": failures, "complete": complete, "enough_rounds": enough_rounds,
        "noise_check": noise, "trustworthy": trustworthy, "targets": targets, "results": results,
    }


def markdown(rep):
    s = rep["settings"]
    m = rep["machine"]
    lines = [f"# GPU step time of the flat methods ({rep['date']})", ""]
    if rep["dry_run"]:
        lines += ["**DRY RUN on the CPU: tiny models, few steps. It checks the code paths; its figures are no "
                  "measurement.**", ""]
    lines += [
        f"- command: `{rep['command']}`",
        f"- device: {m['device']}; CPU: {m['cpu']}",
        f"- torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}), transformers {m['transformers']}, accelerate "
        f"{m['accelerate']}, peft {m['peft']}, Python {m['python']}; hf_flat {m['hf_flat_commit']}",
        f"- each run: {s['warmup']} untimed warm-up steps, then {s['steps']} timed optimizer steps ("
        + ("`time.perf_counter` at each step's end, on the CPU" if rep["dry_run"] else
           "CUDA events at each step's end, no added synchronisation")
        + f"); {s['rounds']} rounds interleaved across methods (alternate "
        f"rounds in reverse order); data set of {s['epoch_steps']} batches (an epoch), on the device; AdamW "
        "(fused on CUDA), learning rate 1e-4 constant",
        f"- estimated on an H100-class GPU: {rep['estimate_h100_s'] / 60:.1f} min; took {rep['elapsed_s'] / 60:.1f} min "
        "here" + (f"; dropped to fit the budget: {', '.join(s['dropped_for_budget'])}" if s["dropped_for_budget"] else ""),
    ]
    for g, info in rep["processes"].items():
        notes = []
        if info.get("stopped"):
            notes.append(info["stopped"])
        if info.get("fp16_note"):
            notes.append(info["fp16_note"])
        if info.get("errors"):
            notes.append("errors: " + "; ".join(f"{k}: {v[:300]}" for k, v in info["errors"].items()))
        counts = ", ".join(f"{k} {millions(v['params'])} parameters ({millions(v['trainable'])} trainable)"
                           for k, v in info["model_counts"].items())
        lines.append(f"- process `{g}`: {info['rounds_done']} rounds, {info['process_s']:.0f} s after its imports (models built in "
                     f"{info['build_s']:.0f} s: {counts})" + (": " + "; ".join(notes) if notes else ""))
    for g, why in rep["failures"].items():
        lines.append(f"- **process `{g}` failed: {why}**")
    lines += ["", "## Noise check: `flat_method=\"none\"` against the plain Trainer", ""]
    if not rep["trustworthy"]:
        reasons = []
        if rep["dry_run"]:
            reasons.append("this is a dry run")
        outside = [c for c, n in rep["noise_check"].items() if not n["ok"] and "why" not in n]
        unmeasured = [c for c, n in rep["noise_check"].items() if "why" in n]
        if outside:
            reasons.append(f"none vs plain is outside +-{100 * s['noise_tolerance']:.0f}% on {', '.join(outside)}")
        if unmeasured:
            reasons.append(f"no noise check on {', '.join(unmeasured)} (not measured)")
        if not rep["enough_rounds"]:
            reasons.append("fewer than 3 rounds or 30 timed steps")
        if not rep["complete"]:
            reasons.append("a process failed or did not run")
        lines += [f"**These figures are NOT TRUSTWORTHY: {'; '.join(reasons)}.**", ""]
    else:
        lines += [f"none vs plain is within +-{100 * s['noise_tolerance']:.0f}% on every model (by median step and "
                  "by whole run): the figures below are trusted to about that much.", ""]
    lines += ["| model | none / plain (median step) | per round | none / plain (whole run) | per round | "
              f"within +-{100 * s['noise_tolerance']:.0f}% |", "|---|---|---|---|---|---|"]
    for case, n in rep["noise_check"].items():
        if "none_vs_plain_median" not in n:
            lines.append(f"| {case} | - | - | - | - | **no** ({n['why']}) |")
            continue
        lines.append(f"| {case} | {n['none_vs_plain_median']:.3f}x | {', '.join(f'{x:.3f}' for x in n['rounds_median'])} "
                     f"| {n['none_vs_plain_whole_run']:.3f}x | {', '.join(f'{x:.3f}' for x in n['rounds_whole_run'])} "
                     f"| {'yes' if n['ok'] else '**NO**'} |")
    lines += ["", "## Targets (ratio to the plain Trainer, same model, same run)", ""]
    lines += ["Median step time unless the row says over a run (the whole-run time: the mean of the timed steps, "
              "which holds LookSAM's SAM steps and the averaging snapshots). WASAM's row is its whole-run ratio "
              "minus SAM's.", ""]
    lines += ["| model | method | target | measured | rounds (min-max) | other measure | pass/fail | missed by |",
              "|---|---|---|---|---|---|---|---|"]
    for t in rep["targets"]:
        limit = f"<= {t['limit']:.2f}x" if t["method"] != "wasam" else f"<= +{t['limit']:.2f}"
        if t["value"] is None:
            lines.append(f"| {t['case']} | {t['method']} | {t['target']}: {limit} | - | - | - | **FAIL** | {t['note']} |")
            continue
        if t["method"] == "wasam":
            measured = f"{t['value']:+.3f} (wasam {t['wasam']:.3f}x, sam {t['sam']:.3f}x)"
            rounds, other = "-", "-"
            miss = f"{t['miss']:.3f}" if not t["passed"] else "-"
        else:
            measured = f"{t['value']:.3f}x"
            rounds = fmt_spread(spread(t["rounds"]), "x", 3)
            other = f"{t['other_measure']:.3f}x ({'median' if t['measure'] == 'whole run' else 'whole run'})"
            miss = f"{t['miss']:.3f}x ({100 * t['miss'] / t['limit']:.1f}%)" if not t["passed"] else "-"
        verdict = "pass" if t["passed"] else "**FAIL**"
        lines.append(f"| {t['case']} | {t['method']} | {t['target']}: {limit} | {measured} | {rounds} | {other} "
                     f"| {verdict} | {miss} |")
    for case, rows in rep["results"].items():
        spec = s["cases"][case]
        plain = rows.get("plain")
        used = next((i.get("precision_used", {}).get(case) for i in rep["processes"].values()
                     if case in i.get("precision_used", {})), None)
        lines += ["", f"## {spec['label']} (`{case}`)" + (f", dry-run batch {spec['batch']}" if rep["dry_run"] else "")
                  + (f", run in {used}" if used and used != spec["precision"] else ""), ""]
        if plain:
            lines += [f"Plain Trainer: {plain['step_ms']:.2f} ms per step (median), {plain['whole_run_ms']:.2f} ms over "
                      "the run.", ""]
        lines += ["| method | step, median (ms) | per-round medians (min-max) | within-round IQR (ms, median round) "
                  "| whole run, mean step (ms) | vs plain (median) | per round | vs plain (whole run) | per round "
                  "| SAM steps timed | peak memory over plain (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            iqr = sorted(r["step_ms_iqr_within_rounds"], key=lambda q: q[1] - q[0])[len(r["step_ms_iqr_within_rounds"]) // 2]
            lines.append(
                f"| {method} | {r['step_ms']:.2f} | {fmt_spread(r['step_ms_spread'])} | {iqr[0]:.2f}-{iqr[1]:.2f} "
                f"| {r['whole_run_ms']:.2f} | {r.get('ratio_median', float('nan')):.3f}x "
                f"| {fmt_spread(spread(r.get('ratio_median_rounds', [])), '', 3)} "
                f"| {r.get('ratio_whole_run', float('nan')):.3f}x "
                f"| {fmt_spread(spread(r.get('ratio_whole_run_rounds', [])), '', 3)} "
                f"| {'-' if r['perturbed_steps'] is None else str(r['perturbed_steps']) + '/' + str(s['steps'])} "
                f"| {'-' if r.get('extra_over_plain_mb') is None else format(r['extra_over_plain_mb'], '+.1f')} |")
        missing = [mm for mm in spec["methods"] if mm not in rows]
        if missing:
            lines += ["", f"Not measured: {', '.join(missing)} (see the errors above)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
