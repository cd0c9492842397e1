"""The accuracy-and-cost study: every flat_method on digits, clean and with 40% label noise.

One command reruns it (finished runs are reused, so an interrupted study continues):

    .venv/bin/python benchmarks/accuracy/run_study.py            # ~75 min on 2 CPU cores

For each setting (clean labels; 40% symmetric label noise on the training split, as in Foret et
al. 2021, section 3.3) it runs `hf-flat compare` over every method with the same seeds, after
choosing each method's radius / start (and decay) on held-out data from the grids below. Then it
writes every number into `benchmarks/accuracy/results.json`, the page `docs/accuracy.md` (every
tuning run and every final run) and the plot `docs/images/accuracy_cost.png`: test accuracy
against training time relative to the plain Trainer, in the style of Figure 1 of Du et al.'s SAF
paper (NeurIPS 2022, arXiv 2205.14083).

The protocol:

- **Epoch budget per setting** (`EPOCHS`): the plain Trainer's, chosen on held-out data by
  `convergence.py` (30 epochs with clean labels, 15 with 40% noise), not by the time a demo may take.
- **Tuning that can choose:** every grid point runs once per tuning seed (`--tuning_seeds`, default
  100 and 101, none a final seed) on 80% of the training split and is scored on the other 20%
  (287 images; each seed draws its own split). The best mean held-out accuracy wins; `hf-flat
  compare` records for how many tuning seeds it was also their own best (the choice's stability).
- **Final runs:** the chosen point, with final seeds 0-4, on the test split; paired differences.

Grids (Kaddour et al., NeurIPS 2022, arXiv 2202.00661, section 5, for rho and the averaging start;
the methods' own papers where their radius lives on another scale), fitted to the run's length
by `grids(epochs)`:

- rho in {0.01, 0.02, 0.05, 0.1, 0.2} for sam, gsam, looksam, esam; asam {0.1, 0.2, 0.5, 1.0, 2.0}
  (Kwon et al. use 0.5-2.0); avg_sam {0.1, 0.2, 0.5, 1.0} (Boca et al. use 0.5 and 1.0);
- averaging start in {0.5, 0.6, 0.75, 0.9} of training for swa, ema, lawa, and for swa and lawa a
  snapshot once per epoch or every 10 steps (average_freq 0, 10);
- wasam: rho {0.02, 0.05, 0.1} x start {0.5, 0.75} x average_freq {0, 10} (12 points, where the full
  product would be 40: the cost of the study is its tuning runs);
- ema_decay and mesa_decay: windows 1 / (1 - decay) of a 16th and a quarter of the run's steps
  (0.98815, 0.99704 for 30 epochs of 45 steps; the defaults 0.999 and 0.9995 are windows longer than
  these runs); saf / mesa start epoch: the averaging fractions of the run's epochs ({15, 18, 22, 27}
  of 30, {8, 9, 11, 14} of 15);
- looksam_alpha 0.1 and esam_gamma 1.0, fixed: the 8-epoch study of 2026-11-26 tuned them too, and
  the papers' alpha 0.7 (and 0.3) kept LookSAM from learning at batch 32 while the paper's gamma
  0.5 lost at every rho (docs/accuracy.md keeps that study's summary).

Cost: each run's `train_runtime` over the plain Trainer's (`none`) with the same seed, in the same
study, runs going two at a time on one CPU thread each. The evaluation after training is not
included; the averaging methods' final BatchNorm pass would be (ViT has no BatchNorm).

**The pretrained regime** (`--task wordnet`): the same protocol on the WordNet task of
`examples/pretrain/wordnet_data.py` (`--data`: a synset's lexicographer file, 45 classes, from its
definition), fine-tuning with `examples/glue/run_glue.py` the masked LM that
`examples/pretrain/run_mlm.py` pretrained on the WordNet corpus (`--model`), as the papers fine-tune
RoBERTa and ViT: a few epochs (`WORDNET_EPOCHS`), on `--max_train_samples` training rows, at the
learning rate `benchmarks/accuracy/pretraining.py` found best for the pretrained start on the
validation split (`--learning_rate`). Tuning holds out 20% of the training split (each tuning
seed its own), the final runs are scored on the task's test split, and a second setting runs the
plain Trainer on the same architecture from scratch (`--from_scratch true`): the control that says
the pretraining helps. Grids: `coarse_grids`, a coarser version of the ones above (the runs are longer).

    .venv/bin/python benchmarks/accuracy/run_study.py --task wordnet --data data/wordnet --model out/wordnet-mlm
"""

import argparse
import json
import math
import os
import subprocess
import sys

from hf_flat.commands.compare import mean_and_se

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ["none", "sam", "asam", "avg_sam", "gsam", "looksam", "esam", "saf", "mesa", "swa", "ema", "lawa", "wasam"]
#: Starts, as fractions of the run (Kaddour et al.'s averaging grid), for averaging and for SAF / MESA.
START_FRACTIONS = (0.5, 0.6, 0.75, 0.9)
#: Averaging windows of the EMA and of MESA's teacher, as fractions of the run's optimizer steps.
WINDOW_FRACTIONS = (1 / 16, 1 / 4)
#: Each setting's epoch budget: the plain Trainer's, chosen by benchmarks/accuracy/convergence.py (the
#: smallest budget within one paired SE of the best held-out accuracy; see its docstring and convergence.md).
EPOCHS = {"clean": 30, "noise40": 15}
#: Optimizer steps per epoch of a final run: 1,437 training images at batch 32.
STEPS_PER_EPOCH = 45
#: Fine-tuning epochs on the WordNet task, from a pretrained start (the papers fine-tune for a few epochs).
WORDNET_EPOCHS = 3


def decays(epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> str:
    """EMA decays whose window 1 / (1 - decay) is each `WINDOW_FRACTIONS` of the run's steps."""
    return ",".join(f"{1 - 1 / max(2.0, f * epochs * steps_per_epoch):.5g}" for f in WINDOW_FRACTIONS)


def grids(epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> list[str]:
    """The grids for a run of `epochs` epochs: SAF's and MESA's start epochs are the averaging
    grid's fractions of the run (rounded, at least 1, without repeats), and the EMA's and MESA's
    decays give windows of a 16th and a quarter of the run, so they fit its length; the snapshot
    frequency joins the averaging grid, since a late start with one snapshot per epoch keeps a
    single snapshot (the 8-epoch study's SWA and LAWA were the plain runs for that reason)."""
    starts = ",".join(str(e) for e in dict.fromkeys(max(1, round(f * epochs)) for f in START_FRACTIONS))
    return [
        "sam_rho=0.01,0.02,0.05,0.1,0.2",
        "average_start=" + ",".join(map(str, START_FRACTIONS)),
        "average_freq=0,10",  # SWA / LAWA / WASAM snapshots: once per epoch, or every 10 steps (4.5 an epoch)
        "asam:sam_rho=0.1,0.2,0.5,1.0,2.0",
        "avg_sam:sam_rho=0.1,0.2,0.5,1.0",
        "wasam:sam_rho=0.02,0.05,0.1",
        "wasam:average_start=0.5,0.75",
        f"ema:ema_decay={decays(epochs, steps_per_epoch)}",
        f"saf:saf_start_epoch={starts}",
        f"mesa:mesa_start_epoch={starts}",
        f"mesa:mesa_decay={decays(epochs, steps_per_epoch)}",
        "looksam:looksam_alpha=0.1",  # 0.3 and 0.7 (the paper's) did not learn at batch 32 (the 8-epoch study)
        "esam:esam_gamma=1.0",  # 0.5 (the paper's) lost at every rho in the 8-epoch study
    ]


def coarse_grids(epochs: int, steps_per_epoch: int) -> list[str]:
    """The WordNet study's grids: `grids` with three radii per method (its ends and middle), averaging
    starts at a half and three quarters of the run, and WASAM at rho 0.05 only (Foret et al.'s value for
    fine-tuning), so that 5,000-row fine-tuning runs, three times as long as the digits' ones, fit about
    75 minutes on 2 CPU cores. The decays and the snapshot frequencies are those of `grids`. SAF and MESA
    start at a half and three quarters of the run's epochs, numbered from 0 (epochs 1 and 2 of 0-2 for 3
    epochs), and SAF compares with the outputs of one epoch before (`saf_past_epochs=1`): with the
    paper's 3 past epochs, or a start at the last epoch's number + 1, a 3-epoch run never uses the term."""
    fractions = (0.5, 0.75)
    starts = ",".join(str(e) for e in dict.fromkeys(min(epochs - 1, max(1, math.floor(f * epochs))) for f in fractions))
    coarse = {"sam_rho": "0.01,0.05,0.2", "average_start": "0.5,0.75", "asam:sam_rho": "0.1,0.5,2.0",
              "avg_sam:sam_rho": "0.1,0.5,1.0", "wasam:sam_rho": "0.05", "wasam:average_start": "0.5,0.75",
              "saf:saf_start_epoch": starts, "mesa:mesa_start_epoch": starts}
    keys = [g.partition("=")[0] for g in grids(epochs, steps_per_epoch)]
    return [f"{k}={coarse[k]}" if k in coarse else g for k, g in zip(keys, grids(epochs, steps_per_epoch))] + [
        "saf:saf_past_epochs=1"]


SETTINGS = {"clean": [], "noise40": ["--label_noise", "0.4"]}
LABELS = {"clean": "clean labels", "noise40": "40% label noise",
          "pretrained": "from the pretrained model", "scratch": "from scratch (the control)"}
TASK_SETTINGS = {"digits": ["clean", "noise40"], "wordnet": ["pretrained", "scratch"]}


def wordnet_arguments(opts, setting):
    """run_glue.py's arguments for a WordNet setting: the task's training rows, scored on its test split."""
    task = os.path.join(opts.data, "task")
    return ["--model_name_or_path", opts.model, *(["--from_scratch", "true"] if setting == "scratch" else []),
            "--train_file", os.path.join(task, "train.csv"), "--validation_file", os.path.join(task, "test.csv"),
            "--text_column_names", "text", "--max_train_samples", str(opts.max_train_samples),
            "--learning_rate", opts.learning_rate, "--warmup_steps", "0.06", "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "256", "--eval_strategy", "no"]


def task_of(opts):
    """What differs between the tasks: script, each setting's arguments and methods, steps per epoch."""
    if opts.task == "digits":
        return {"script": "examples/vit/run_vit.py", "arguments": lambda s: SETTINGS[s], "methods": lambda s: opts.methods,
                "steps_per_epoch": STEPS_PER_EPOCH, "grids": grids}
    return {"script": "examples/glue/run_glue.py", "arguments": lambda s: wordnet_arguments(opts, s), "grids": coarse_grids,
            "methods": lambda s: [m for m in opts.methods if s == "pretrained" or m == "none"],  # the control: plain only
            "steps_per_epoch": math.ceil(opts.max_train_samples / 32)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="the final runs' seeds")
    p.add_argument("--tuning_seeds", nargs="+", type=int, default=[100, 101],
                   help="the tuning runs' seeds: each draws its own held-out split, initialisation, order and noise")
    p.add_argument("--holdout_fraction", type=float, default=0.2, help="the tuning runs' held-out share")
    p.add_argument("--epochs", type=int, default=None,
                   help="one budget for every setting (default: EPOCHS, or WORDNET_EPOCHS for --task wordnet)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--task", choices=list(TASK_SETTINGS), default="digits",
                   help="digits: the ViT from scratch; wordnet: fine-tuning the WordNet-pretrained masked LM")
    p.add_argument("--settings", nargs="+", default=None, choices=list(LABELS),
                   help="default: the task's (clean noise40 for digits, pretrained scratch for wordnet)")
    p.add_argument("--data", help="--task wordnet: the folder examples/pretrain/wordnet_data.py wrote")
    p.add_argument("--model", help="--task wordnet: the folder examples/pretrain/run_mlm.py wrote")
    p.add_argument("--max_train_samples", type=int, default=5000, help="--task wordnet: training rows")
    p.add_argument("--learning_rate", default="1e-3", help="--task wordnet: the fine-tuning learning rate")
    p.add_argument("--output_dir", default=None, help="the runs (default: out/accuracy, or out/accuracy-wordnet)")
    p.add_argument("--results", default=None, help="default: benchmarks/accuracy/results.json (results-wordnet.json)")
    p.add_argument("--page", default=None, help="default: docs/accuracy.md (accuracy-wordnet.md)")
    p.add_argument("--plot", default=None, help="default: docs/images/accuracy_cost.png (accuracy_cost_wordnet.png)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more script arguments, after everything else (e.g. --extra --max_train_samples 200)")
    opts = p.parse_args(argv)
    opts.settings = opts.settings or TASK_SETTINGS[opts.task]
    wrong = [s for s in opts.settings if s not in TASK_SETTINGS[opts.task]]
    if wrong:
        p.error(f"--settings {' '.join(wrong)}: --task {opts.task} has {' '.join(TASK_SETTINGS[opts.task])}")
    if opts.task == "wordnet" and not (opts.data and opts.model):
        p.error("--task wordnet needs --data (wordnet_data.py's folder) and --model (run_mlm.py's folder)")
    tail = "" if opts.task == "digits" else "-wordnet"
    opts.output_dir = opts.output_dir or os.path.join(ROOT, "out", "accuracy" + tail)
    opts.results = opts.results or os.path.join(ROOT, "benchmarks", "accuracy", f"results{tail}.json")
    opts.page = opts.page or os.path.join(ROOT, "docs", f"accuracy{tail}.md")
    opts.plot = opts.plot or os.path.join(ROOT, "docs", "images", f"accuracy_cost{tail.replace('-', '_')}.png")
    return opts


def epochs_of(opts, setting):
    return opts.epochs or (EPOCHS[setting] if opts.task == "digits" else WORDNET_EPOCHS)


def budgets_text(opts):
    return " / ".join(f"{epochs_of(opts, s)} ({LABELS[s]})" for s in opts.settings)


def run_compare(opts, setting):
    """`hf-flat compare` for one setting; its comparison.json."""
    out, task = os.path.join(opts.output_dir, setting), task_of(opts)
    methods = task["methods"](setting)
    tuned = [m for m in methods if m != "none"]  # (the plain Trainer has nothing to tune)
    flags = [x for g in task["grids"](epochs_of(opts, setting), task["steps_per_epoch"]) if tuned
             and (g.partition(":")[0] in methods or ":" not in g) for x in ("--grid", g)]
    command = [sys.executable, "-m", "hf_flat.cli", "compare", "--script", os.path.join(ROOT, task["script"]),
               "--methods", *methods, "--seeds", *map(str, opts.seeds), "--jobs", str(opts.jobs), "--quiet",
               "--tuning_seeds", *map(str, opts.tuning_seeds), "--holdout_fraction", str(opts.holdout_fraction),
               *flags, "--output_dir", out, "--", "--num_train_epochs", str(epochs_of(opts, setting)),
               *task["arguments"](setting), *opts.extra]
    print("$", " ".join(command[2:]), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 1):  # 1: some runs failed, which the page reports
        sys.exit(f"compare failed with exit status {code}")
    with open(os.path.join(out, "comparison.json")) as f:
        return json.load(f), command


def summarise(result):
    """Per method: accuracy, paired difference, cost ratio (mean ± SE over seeds), the chosen setting and
    for how many tuning seeds it was their own best (`agree`)."""
    runs = [r for r in result["runs"] if "metrics" in r]
    base = {r["seed"]: r["metrics"]["train_runtime"] for r in runs if r["method"] == "none"}
    rows = []
    for row in result["table"]:
        m = row["method"]
        mine = [r for r in runs if r["method"] == m]
        ratios = [r["metrics"]["train_runtime"] / base[r["seed"]] for r in mine if r["seed"] in base]
        ratio, ratio_se = mean_and_se(ratios)
        rows.append({"method": m, "chosen": result["chosen"].get(m), "n": row["n"],
                     "agree": result.get("stability", {}).get(m, {}).get("agree"), "accuracy": row["mean"],
                     "accuracy_se": row["se"], "paired_difference": row.get("paired_difference"),
                     "paired_difference_se": row.get("paired_difference_se"), "bold": row["bold"],
                     "time_ratio": ratio, "time_ratio_se": ratio_se,
                     "train_runtime_s": mean_and_se([r["metrics"]["train_runtime"] for r in mine])[0]})
    return rows


def fmt(x, spec=".2f", scale=100.0):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:{spec}}"


def wordnet_intro(opts):
    """The WordNet page's header: the task, the pretraining and the protocol."""
    config, pretraining = {}, {}
    for name, target in (("config.json", config), ("all_results.json", pretraining)):
        path = os.path.join(opts.model, name)
        if os.path.isfile(path):
            with open(path) as f:
                target.update(json.load(f))
    size = (f"RoBERTa of hidden size {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, a "
            f"{config.get('vocab_size')}-token vocabulary") if config else "RoBERTa"
    loss = f", held-out MLM loss {pretraining['eval_loss']:.2f}" if "eval_loss" in pretraining else ""
    return ["# Accuracy and cost of every method, fine-tuning a pretrained model (WordNet)", "",
            "Written by `benchmarks/accuracy/run_study.py --task wordnet` (its docstring gives the command); every "
            f"number below is in `benchmarks/accuracy/{os.path.basename(opts.results)}`.", "",
            "Task: a WordNet synset's lexicographer file (45 classes such as noun.animal, verb.motion) predicted from "
            "its definition (`examples/pretrain/wordnet_data.py`, splits fixed by synset). The model: a small "
            f"{size}, pretrained by masked-language modelling on the WordNet corpus, which holds no test text "
            f"(`examples/pretrain/run_mlm.py`, {pretraining.get('epoch', '?')} epochs{loss}; "
            "`benchmarks/accuracy/pretraining.md` shows that this start beats the same model from scratch). "
            f"Fine-tuning (`examples/glue/run_glue.py`): the first {opts.max_train_samples} training rows, AdamW at "
            f"{opts.learning_rate} (the pretrained start's best rate on the validation split), linear decay after 6% "
            f"warmup, batch 32, {budgets_text(opts)} epochs, as the papers fine-tune for a few epochs. Final seeds "
            + ", ".join(map(str, opts.seeds)) + " (a seed fixes the new classifier head, dropout and the data order; from "
            "scratch, every weight), scored on the task's test split.", "",
            "Tuning: each grid point runs once per tuning seed (" + ", ".join(map(str, opts.tuning_seeds)) + ", none "
            f"of them a final seed), scored on {100 * opts.holdout_fraction:.0f}% of the training split held out (each "
            f"seed its own; the first {opts.max_train_samples} of the other rows train); the best mean held-out accuracy "
            "is chosen and the tables say for how many tuning seeds it was also their own best. Grids are in "
            "`run_study.py`'s docstring, fitted to the run's length, and below as run.", "",
            "Cost: training time (`train_runtime`) over the plain Trainer's with the same seed, mean ± SE over seeds, "
            "runs going two at a time on one CPU thread each of a 2-core machine.", ""]


def page(opts, studies):
    if opts.task == "wordnet":
        return page_body(opts, studies, wordnet_intro(opts))
    lines = ["# Accuracy and cost of every method on digits", "",
             "Written by `benchmarks/accuracy/run_study.py` (rerun: `.venv/bin/python benchmarks/accuracy/run_study.py`); "
             "every number below is in `benchmarks/accuracy/results.json`.", "",
             "Task: that of [the main job](benchmarks/main-job.md). A ViT (hidden 64, 2 layers, patch 2) trained from scratch on "
             "scikit-learn's 8x8 digits (1,437 training images, 360 test images), AdamW at 2e-3 with a cosine schedule, "
             f"batch 32, for {budgets_text(opts)} epochs: each setting's budget is the one the plain Trainer needs on "
             "held-out data (the next section). Final seeds " + ", ".join(map(str, opts.seeds)) + " (a seed fixes "
             "initialisation, data order and the noisy labels). With 40% label noise, 40% of the training labels are "
             "replaced by a different class drawn uniformly (symmetric noise, Foret et al. 2021, section 3.3); the test "
             "labels stay clean.", "",
             "Tuning: each method's hyper-parameters are chosen on held-out data, never on the test split. Each grid "
             f"point runs once per tuning seed ({', '.join(map(str, opts.tuning_seeds))}, none of them a final seed) on "
             f"{100 * (1 - opts.holdout_fraction):.0f}% of the training split and is scored on the other "
             f"{100 * opts.holdout_fraction:.0f}% ({round(1437 * opts.holdout_fraction)} images); each tuning seed draws "
             "its own held-out split, initialisation, order and noise. The point with the best mean held-out accuracy "
             "is chosen, and the tables say for how many tuning seeds it was also their own best: how stable the choice "
             "is. The noise is applied after the split, to the training part only, so the held-out images keep their "
             "clean labels: a cleaner validation set than a user with noisy data usually has. The chosen point then "
             "runs with every final seed on the test split. Grids are in the script's docstring (and below, as "
             "run); every tuning run is listed below.", "",
             "Cost: training time (`train_runtime`) over the plain Trainer's with the same seed, mean ± SE over "
             "seeds, runs going two at a time on one CPU thread each of a 2-core machine.", ""]
    return page_body(opts, studies, lines)


def summary_table(summary, tuning_seeds: int) -> list[str]:
    """A setting's table in markdown: per method the chosen point (and for how many of the `tuning_seeds`
    it was their own best), test accuracy, paired difference to the plain Trainer and time ratio."""
    lines = ["| method | chosen on held-out data | test accuracy (%) | paired difference to none (points) "
             "| training time vs none |", "|---|---|---|---|---|"]
    for r in summary:
        acc = f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_se'])}"
        diff = "baseline" if r["method"] == "none" else (
            f"{fmt(r['paired_difference'], '+.2f')} ± {fmt(r['paired_difference_se'])}")
        if r["bold"]:
            acc = f"**{acc}**"
        chosen = "tuning failed" if r["chosen"] is None else (
            ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or "-")
        if r.get("agree") is not None:
            chosen += f" ({r['agree']} of {tuning_seeds})"
        lines.append(f"| {r['method']} | {chosen} | {acc} | {diff} | {fmt(r['time_ratio'], '.2f', 1)}x "
                     f"± {fmt(r['time_ratio_se'], '.2f', 1)} |")
    return lines


def page_body(opts, studies, lines):
    """The page after its header: the epoch budget (digits), the reading, the plot, then per setting the
    table of chosen points and results, every tuning run and every final run."""
    here = os.path.dirname(os.path.abspath(__file__))
    convergence = os.path.join(here, "convergence.md")
    if opts.task == "digits" and os.path.isfile(convergence):  # the epoch budget, from benchmarks/accuracy/convergence.py
        with open(convergence) as f:
            lines += ["## The epoch budget: how long the plain Trainer needs", "",
                      "From `benchmarks/accuracy/convergence.py` (its docstring gives the rule):", "",
                      "### " + f.read().strip().split("\n## ", 1)[1].replace("\n## ", "\n### "), ""]
    reading = os.path.join(here, "reading.md" if opts.task == "digits" else f"reading-{opts.task}.md")
    if os.path.isfile(reading):  # what the tables show, written by hand after the run that made them
        with open(reading) as f:
            lines += [f.read().strip(), ""]
    plot_path = os.path.relpath(opts.plot, os.path.dirname(os.path.abspath(opts.page)))
    lines += [f"![test accuracy against training time relative to the plain Trainer]({plot_path})", ""]
    for setting, study in studies.items():
        lines += [f"## {LABELS[setting]}, {epochs_of(opts, setting)} epochs", "",
                  "In brackets after each choice: for how many tuning seeds it was also their own best.", "",
                  *summary_table(study["summary"], len(opts.tuning_seeds))]
        lines += ["", "Bold: the best method and every method within one paired SE of it (as `hf-flat compare`).", ""]
        if study["failures"]:
            lines += ["Failed: " + ", ".join(f"{f['name']} ({f['failed']})" for f in study["failures"]), ""]
    for setting, study in studies.items():
        seeds = opts.tuning_seeds
        lines += [f"### Every tuning run, {LABELS[setting]} (held-out accuracy, %)", "",
                  "| method | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|---|" + "---|" * (len(seeds) + 1)]
        for method, results in study["tuning"].items():
            by_setting = {}
            for t in results:
                by_setting.setdefault(", ".join(f"{k}={v}" for k, v in t["settings"].items()), {})[t.get("seed")] = t
            for setting_text, runs in by_setting.items():
                cells = [fmt(runs[s]["metrics"]["eval_accuracy"]) if s in runs and "metrics" in runs[s] else
                         (f"failed ({runs[s]['failed']})" if s in runs else "-") for s in seeds]
                scores = [runs[s]["metrics"]["eval_accuracy"] for s in seeds if s in runs and "metrics" in runs[s]]
                mean = fmt(sum(scores) / len(scores)) if len(scores) == len(seeds) else "-"
                chosen = study["chosen"].get(method) or {}
                mark = " (chosen)" if setting_text == ", ".join(f"{k}={v}" for k, v in chosen.items()) else ""
                lines.append(f"| {method} | {setting_text}{mark} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    for setting, study in studies.items():
        lines += [f"### Every final run, {LABELS[setting]}", "", "| method | seed | test accuracy (%) | train_runtime (s) |",
                  "|---|---|---|---|"]
        for r in study["runs"]:
            if "metrics" in r:
                lines.append(f"| {r['method']} | {r['seed']} | {fmt(r['metrics']['eval_accuracy'])} | "
                             f"{r['metrics']['train_runtime']:.1f} |")
            else:
                lines.append(f"| {r['method']} | {r['seed']} | failed ({r['failed']}) | - |")
        lines.append("")
    return "\n".join(lines)


def plot(studies, path, task="digits"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(6.2 * len(studies), 4.6), squeeze=False)
    for ax, (setting, study) in zip(axes[0], studies.items()):
        for r in study["summary"]:
            if r["n"] == 0:
                continue
            averaging = r["method"] in ("swa", "ema", "lawa")
            color = "black" if r["method"] == "none" else ("tab:green" if averaging else "tab:blue")
            ax.errorbar(r["time_ratio"], 100 * r["accuracy"], xerr=r["time_ratio_se"], yerr=100 * r["accuracy_se"],
                        fmt="o", color=color, capsize=3)
            ax.annotate(r["method"], (r["time_ratio"], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xlabel("training time / plain Trainer's (same seed)")
        ax.set_ylabel("test accuracy (%), mean ± SE over seeds")
        ax.set_title(f"{task}, {LABELS[setting]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    opts = parse(argv)
    studies = {}
    for setting in opts.settings:
        result, command = run_compare(opts, setting)
        studies[setting] = {"command": command[2:], "epochs": epochs_of(opts, setting),
                            "stability": result.get("stability", {}), "summary": summarise(result), "chosen": result["chosen"],
                            "table": result["table"], "tuning": result["tuning"], "runs": result["runs"],
                            "failures": result["failures"], "threads": result["threads"], "jobs": result.get("jobs")}
    os.makedirs(os.path.dirname(opts.results), exist_ok=True)
    slim = {s: {**st, "runs": [{k: r.get(k) for k in ("method", "seed", "settings", "failed")}
                               | ({"eval_accuracy": r["metrics"]["eval_accuracy"], "eval_loss": r["metrics"]["eval_loss"],
                                   "train_runtime": r["metrics"]["train_runtime"]} if "metrics" in r else {})
                               for r in st["runs"]],
                    "tuning": {m: [{"settings": t["settings"], "seed": t.get("seed"),
                                    **({"eval_accuracy": t["metrics"]["eval_accuracy"]}
                                                                  if "metrics" in t else {"failed": t["failed"]})}
                                   for t in ts] for m, ts in st["tuning"].items()}}
            for s, st in studies.items()}
    with open(opts.results, "w") as f:
        json.dump({"task": opts.task, "epochs": {s: epochs_of(opts, s) for s in opts.settings}, "seeds": opts.seeds,
                   "tuning_seeds": opts.tuning_seeds, "holdout_fraction": opts.holdout_fraction,
                   "grids": {s: task_of(opts)["grids"](epochs_of(opts, s), task_of(opts)["steps_per_epoch"]) for s in opts.settings},
                   **({"max_train_samples": opts.max_train_samples, "learning_rate": opts.learning_rate}
                      if opts.task == "wordnet" else {}),
                   "studies": slim}, f, indent=1)
    text = page(opts, studies)
    os.makedirs(os.path.dirname(opts.page), exist_ok=True)
    with open(opts.page, "w") as f:
        f.write(text + "\n")
    plot(studies, opts.plot, opts.task)
    print(f"wrote {opts.results}, {opts.page}, {opts.plot}")


if __name__ == "__main__":
    main()
