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
"""

import argparse
import json
import math
import os
import subprocess
import sys

from hf_flat.compare import mean_and_se

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


def decays(epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> str:
    """EMA decays whose window 1 / (1 - decay) is each `WINDOW_FRACTIONS` of the run's steps."""
    return ",".join(f"{1 - 1 / max(2.0, f * epochs * steps_per_epoch):.5g}" for f in WINDOW_FRACTIONS)


def grids(epochs: int) -> list[str]:
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
        f"ema:ema_decay={decays(epochs)}",
        f"saf:saf_start_epoch={starts}",
        f"mesa:mesa_start_epoch={starts}",
        f"mesa:mesa_decay={decays(epochs)}",
        "looksam:looksam_alpha=0.1",  # 0.3 and 0.7 (the paper's) did not learn at batch 32 (the 8-epoch study)
        "esam:esam_gamma=1.0",  # 0.5 (the paper's) lost at every rho in the 8-epoch study
    ]


SETTINGS = {"clean": [], "noise40": ["--label_noise", "0.4"]}
LABELS = {"clean": "clean labels", "noise40": "40% label noise"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="the final runs' seeds")
    p.add_argument("--tuning_seeds", nargs="+", type=int, default=[100, 101],
                   help="the tuning runs' seeds: each draws its own held-out split, initialisation, order and noise")
    p.add_argument("--holdout_fraction", type=float, default=0.2, help="the tuning runs' held-out share")
    p.add_argument("--epochs", type=int, default=None, help="one budget for every setting (default: EPOCHS)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--output_dir", default=os.path.join(ROOT, "out", "accuracy"), help="the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "accuracy", "results.json"))
    p.add_argument("--page", default=os.path.join(ROOT, "docs", "accuracy.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "images", "accuracy_cost.png"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more run_vit.py arguments, after everything else (e.g. --extra --max_train_samples 200)")
    return p.parse_args(argv)


def epochs_of(opts, setting):
    return opts.epochs or EPOCHS[setting]


def budgets_text(opts):
    return " / ".join(f"{epochs_of(opts, s)} ({LABELS[s]})" for s in opts.settings)


def run_compare(opts, setting):
    """`hf-flat compare` for one setting; its comparison.json."""
    out = os.path.join(opts.output_dir, setting)
    flags = [x for g in grids(epochs_of(opts, setting)) if g.partition(":")[0] in opts.methods or ":" not in g for x in ("--grid", g)]
    command = [sys.executable, "-m", "hf_flat.cli", "compare", "--script", os.path.join(ROOT, "examples/vit/run_vit.py"),
               "--methods", *opts.methods, "--seeds", *map(str, opts.seeds), "--jobs", str(opts.jobs), "--quiet",
               "--tuning_seeds", *map(str, opts.tuning_seeds), "--holdout_fraction", str(opts.holdout_fraction),
               *flags, "--output_dir", out, "--", "--num_train_epochs", str(epochs_of(opts, setting)),
               *SETTINGS[setting], *opts.extra]
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


def page(opts, studies):
    lines = ["# Accuracy and cost of every method on digits", "",
             "Written by `benchmarks/accuracy/run_study.py` (rerun: `.venv/bin/python benchmarks/accuracy/run_study.py`); "
             "every number below is in `benchmarks/accuracy/results.json`.", "",
             "Task: that of the README's main job. A ViT (hidden 64, 2 layers, patch 2) trained from scratch on "
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
    convergence = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convergence.md")
    if os.path.isfile(convergence):  # the epoch budget, from benchmarks/accuracy/convergence.py
        with open(convergence) as f:
            lines += ["## The epoch budget: how long the plain Trainer needs", "",
                      "From `benchmarks/accuracy/convergence.py` (its docstring gives the rule):", "",
                      "### " + f.read().strip().split("\n## ", 1)[1].replace("\n## ", "\n### "), ""]
    reading = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reading.md")
    if os.path.isfile(reading):  # what the tables show, written by hand after the run that made them
        with open(reading) as f:
            lines += [f.read().strip(), ""]
    plot_path = os.path.relpath(opts.plot, os.path.dirname(os.path.abspath(opts.page)))
    lines += [f"![test accuracy against training time relative to the plain Trainer]({plot_path})", ""]
    for setting, study in studies.items():
        lines += [f"## {LABELS[setting]}, {epochs_of(opts, setting)} epochs", "",
                  "In brackets after each choice: for how many tuning seeds it was also their own best.", "",
                  "| method | chosen on held-out data | test accuracy (%) | paired "
                  "difference to none (points) | training time vs none |", "|---|---|---|---|---|"]
        for r in study["summary"]:
            acc = f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_se'])}"
            diff = "baseline" if r["method"] == "none" else (
                f"{fmt(r['paired_difference'], '+.2f')} ± {fmt(r['paired_difference_se'])}")
            if r["bold"]:
                acc = f"**{acc}**"
            chosen = "tuning failed" if r["chosen"] is None else (
                ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or "-")
            if r.get("agree") is not None:
                chosen += f" ({r['agree']} of {len(opts.tuning_seeds)})"
            lines.append(f"| {r['method']} | {chosen} | {acc} | {diff} | {fmt(r['time_ratio'], '.2f', 1)}x "
                         f"± {fmt(r['time_ratio_se'], '.2f', 1)} |")
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


def plot(studies, path):
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
        ax.set_title(f"digits, {LABELS[setting]}")
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
        json.dump({"epochs": {s: epochs_of(opts, s) for s in opts.settings}, "seeds": opts.seeds,
                   "tuning_seeds": opts.tuning_seeds, "holdout_fraction": opts.holdout_fraction,
                   "grids": {s: grids(epochs_of(opts, s)) for s in opts.settings}, "studies": slim}, f, indent=1)
    text = page(opts, studies)
    os.makedirs(os.path.dirname(opts.page), exist_ok=True)
    with open(opts.page, "w") as f:
        f.write(text + "\n")
    plot(studies, opts.plot)
    print(f"wrote {opts.results}, {opts.page}, {opts.plot}")


if __name__ == "__main__":
    main()
