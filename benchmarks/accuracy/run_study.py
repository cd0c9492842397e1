"""The accuracy-and-cost study: every flat_method on digits, clean and with 40% label noise.

One command reruns it (finished runs are reused, so an interrupted study continues):

    .venv/bin/python benchmarks/accuracy/run_study.py            # ~30 min on 2 CPU cores

For each setting (clean labels; 40% symmetric label noise on the training split, as in Foret et
al. 2021, section 3.3) it runs `hf-flat compare` over every method with the same seeds, after
choosing each method's radius / start (and decay) on held-out data from the grids below. Then it
writes every number into `benchmarks/accuracy/results.json`, the page `docs/accuracy.md` (every
tuning run and every final run) and the plot `docs/images/accuracy_cost.png`: test accuracy
against training time relative to the plain Trainer, in the style of Figure 1 of Du et al.'s SAF
paper (NeurIPS 2022, arXiv 2205.14083).

Grids (Kaddour et al., NeurIPS 2022, arXiv 2202.00661, section 5, for rho and the averaging start;
the methods' own papers where their radius lives on another scale):

- rho in {0.01, 0.02, 0.05, 0.1, 0.2} for sam, gsam, looksam, esam, wasam; asam {0.1, 0.2, 0.5,
  1.0, 2.0} (Kwon et al. use 0.5-2.0); avg_sam {0.1, 0.2, 0.5, 1.0} (Boca et al. use 0.5 and 1.0);
- averaging start in {0.5, 0.6, 0.75, 0.9} of training for swa, ema, lawa, wasam, and for swa, lawa and
  wasam a snapshot once per epoch or every 10 steps (average_freq 0, 10); ema_decay also in
  {0.99, 0.999} (0.999 barely moves in a run of 360 steps);
- saf / mesa start epoch: the same fractions of the run's epochs (`grids`: {4, 5, 6, 7} of 8, {15, 18,
  22, 27} of 30); mesa_decay also in
  {0.99, 0.999} (its default 0.9995 is tuned for runs of hundreds of epochs);
- looksam_alpha in {0.1, 0.3, 0.7} (0.7 is the paper's; at batch 32 it keeps the model from learning
  at all, see docs/accuracy.md) and esam_gamma in {0.5, 1.0} (0.5 is the paper's; 1.0 keeps every
  sample for pass 2, and with esam_beta 1 ESAM is then SAM).

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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ["none", "sam", "asam", "avg_sam", "gsam", "looksam", "esam", "saf", "mesa", "swa", "ema", "lawa", "wasam"]
#: Starts, as fractions of the run (Kaddour et al.'s averaging grid), for averaging and for SAF / MESA.
START_FRACTIONS = (0.5, 0.6, 0.75, 0.9)


def grids(epochs: int) -> list[str]:
    """The grids for a run of `epochs` epochs: SAF's and MESA's start epochs are the averaging
    grid's fractions of the run (rounded, at least 1, without repeats), so they fit its length; the
    snapshot frequency joins the averaging grid, since a late start with one snapshot per epoch
    keeps a single snapshot (the 8-epoch study's SWA and LAWA were the plain runs for that reason)."""
    starts = ",".join(str(e) for e in dict.fromkeys(max(1, round(f * epochs)) for f in START_FRACTIONS))
    return [
        "sam_rho=0.01,0.02,0.05,0.1,0.2",
        "average_start=" + ",".join(map(str, START_FRACTIONS)),
        "average_freq=0,10",  # SWA / LAWA snapshots: once per epoch, or every 10 steps (about 4 an epoch here)
        "asam:sam_rho=0.1,0.2,0.5,1.0,2.0",
        "avg_sam:sam_rho=0.1,0.2,0.5,1.0",
        "ema:ema_decay=0.99,0.999",
        f"saf:saf_start_epoch={starts}",
        f"mesa:mesa_start_epoch={starts}",
        "mesa:mesa_decay=0.99,0.999",
        "looksam:looksam_alpha=0.1,0.3,0.7",
        "esam:esam_gamma=0.5,1.0",
    ]


SETTINGS = {"clean": [], "noise40": ["--label_noise", "0.4"]}
LABELS = {"clean": "clean labels", "noise40": "40% label noise"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=8)
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


def run_compare(opts, setting):
    """`hf-flat compare` for one setting; its comparison.json."""
    out = os.path.join(opts.output_dir, setting)
    flags = [x for g in grids(opts.epochs) if g.partition(":")[0] in opts.methods or ":" not in g for x in ("--grid", g)]
    command = [sys.executable, "-m", "hf_flat.cli", "compare", "--script", os.path.join(ROOT, "examples/vit/run_vit.py"),
               "--methods", *opts.methods, "--seeds", *map(str, opts.seeds), "--jobs", str(opts.jobs), "--quiet",
               *flags, "--output_dir", out, "--", "--num_train_epochs", str(opts.epochs), *SETTINGS[setting], *opts.extra]
    print("$", " ".join(command[2:]), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code not in (0, 1):  # 1: some runs failed, which the page reports
        sys.exit(f"compare failed with exit status {code}")
    with open(os.path.join(out, "comparison.json")) as f:
        return json.load(f), command


def mean_se(values):
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def summarise(result):
    """Per method: accuracy, paired difference, cost ratio (mean ± SE over seeds), the chosen setting."""
    runs = [r for r in result["runs"] if "metrics" in r]
    base = {r["seed"]: r["metrics"]["train_runtime"] for r in runs if r["method"] == "none"}
    rows = []
    for row in result["table"]:
        m = row["method"]
        mine = [r for r in runs if r["method"] == m]
        ratios = [r["metrics"]["train_runtime"] / base[r["seed"]] for r in mine if r["seed"] in base]
        ratio, ratio_se = mean_se(ratios)
        rows.append({"method": m, "chosen": result["chosen"].get(m), "n": row["n"], "accuracy": row["mean"],
                     "accuracy_se": row["se"], "paired_difference": row.get("paired_difference"),
                     "paired_difference_se": row.get("paired_difference_se"), "bold": row["bold"],
                     "time_ratio": ratio, "time_ratio_se": ratio_se,
                     "train_runtime_s": mean_se([r["metrics"]["train_runtime"] for r in mine])[0]})
    return rows


def fmt(x, spec=".2f", scale=100.0):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:{spec}}"


def page(opts, studies):
    lines = ["# Accuracy and cost of every method on digits", "",
             "Written by `benchmarks/accuracy/run_study.py` (rerun: `.venv/bin/python benchmarks/accuracy/run_study.py`); "
             "every number below is in `benchmarks/accuracy/results.json`.", "",
             f"Task: that of the README's main job. A ViT (hidden 64, 2 layers, patch 2) trained from scratch for {opts.epochs} "
             "epochs on scikit-learn's 8x8 digits (1,437 training images, 360 test images), AdamW at 2e-3, batch 32, "
             f"seeds {', '.join(map(str, opts.seeds))} (a seed fixes initialisation, data order and the noisy labels). "
             "With 40% label noise, 40% of the training labels are replaced by a different class drawn uniformly "
             "(symmetric noise, Foret et al. 2021, section 3.3); the test labels stay clean.", "",
             "Tuning: each method's hyper-parameters are chosen on held-out data: one run per grid point on 90% of the "
             "training split with seed 0, scored on the other 10% (144 images). The noise is applied after that split, to "
             "the training part only, so the held-out images keep their clean labels: a cleaner validation set than "
             "a user with noisy data usually has. The chosen point then runs with every seed on the test split. Grids "
             "are in the script's docstring; every tuning run is listed below.", "",
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
        lines += [f"## {LABELS[setting]}", "", "| method | chosen on held-out data | test accuracy (%) | paired "
                  "difference to none (points) | training time vs none |", "|---|---|---|---|---|"]
        for r in study["summary"]:
            acc = f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_se'])}"
            diff = "baseline" if r["method"] == "none" else (
                f"{fmt(r['paired_difference'], '+.2f')} ± {fmt(r['paired_difference_se'])}")
            if r["bold"]:
                acc = f"**{acc}**"
            chosen = "tuning failed" if r["chosen"] is None else (
                ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or "-")
            lines.append(f"| {r['method']} | {chosen} | {acc} | {diff} | {fmt(r['time_ratio'], '.2f', 1)}x "
                         f"± {fmt(r['time_ratio_se'], '.2f', 1)} |")
        lines += ["", "Bold: the best method and every method within one paired SE of it (as `hf-flat compare`).", ""]
        if study["failures"]:
            lines += ["Failed: " + ", ".join(f"{f['name']} ({f['failed']})" for f in study["failures"]), ""]
    for setting, study in studies.items():
        lines += [f"### Every tuning run, {LABELS[setting]} (held-out accuracy, %, seed {opts.seeds[0]})", "",
                  "| method | setting | held-out accuracy |", "|---|---|---|"]
        for method, results in study["tuning"].items():
            for t in results:
                setting_text = ", ".join(f"{k}={v}" for k, v in t["settings"].items())
                score = fmt(t["metrics"]["eval_accuracy"]) if "metrics" in t else f"failed ({t['failed']})"
                lines.append(f"| {method} | {setting_text} | {score} |")
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
        studies[setting] = {"command": command[2:], "summary": summarise(result), "chosen": result["chosen"],
                            "table": result["table"], "tuning": result["tuning"], "runs": result["runs"],
                            "failures": result["failures"], "threads": result["threads"], "jobs": result.get("jobs")}
    os.makedirs(os.path.dirname(opts.results), exist_ok=True)
    slim = {s: {**st, "runs": [{k: r.get(k) for k in ("method", "seed", "settings", "failed")}
                               | ({"eval_accuracy": r["metrics"]["eval_accuracy"], "eval_loss": r["metrics"]["eval_loss"],
                                   "train_runtime": r["metrics"]["train_runtime"]} if "metrics" in r else {})
                               for r in st["runs"]],
                    "tuning": {m: [{"settings": t["settings"], **({"eval_accuracy": t["metrics"]["eval_accuracy"]}
                                                                  if "metrics" in t else {"failed": t["failed"]})}
                                   for t in ts] for m, ts in st["tuning"].items()}}
            for s, st in studies.items()}
    with open(opts.results, "w") as f:
        json.dump({"epochs": opts.epochs, "seeds": opts.seeds, "grids": grids(opts.epochs), "studies": slim}, f, indent=1)
    text = page(opts, studies)
    os.makedirs(os.path.dirname(opts.page), exist_ok=True)
    with open(opts.page, "w") as f:
        f.write(text + "\n")
    plot(studies, opts.plot)
    print(f"wrote {opts.results}, {opts.page}, {opts.plot}")


if __name__ == "__main__":
    main()
