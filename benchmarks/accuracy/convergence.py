"""How long the study's task needs: the plain Trainer's held-out accuracy against the epoch budget.

For each setting (clean labels; 40% label noise) and each budget E of `--budgets`, the plain
Trainer (`flat_method="none"`) trains `examples/vit/run_vit.py` on digits for E epochs, its cosine
schedule spread over those E, for every seed, and is evaluated after every epoch on a held-out
`--holdout_fraction` of the training split (never on the test split). A budget's score is the
held-out accuracy at its end. The budget chosen is the smallest E within one standard error of
the best: with d_s the per-seed difference between E's and the best budget's accuracy, the
smallest E with mean(d) >= -SE(d) (the one-standard-error rule, on paired differences, since
each seed fixes the initialisation, the data order and the noisy labels for every budget).

    .venv/bin/python benchmarks/accuracy/convergence.py            # 2 settings x 5 budgets x 5 seeds, ~5 min on 2 cores

Writes `--output` (JSON: every run's per-epoch held-out accuracy, each budget's mean and SE, the
paired differences and the choice) and `--markdown`. Finished runs are reused.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from hf_flat.commands.compare import mean_and_se

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {"clean": [], "noise40": ["--label_noise", "0.4"]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", type=int, default=[8, 15, 30, 45, 60])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--holdout_fraction", type=float, default=0.2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--output_dir", default=os.path.join(ROOT, "out", "convergence"), help="the runs")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "accuracy", "convergence.json"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "benchmarks", "accuracy", "convergence.md"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run_vit.py arguments, after the others")
    return p.parse_args(argv)


def run(opts, setting, budget, seed):
    """One plain run; its held-out accuracy after each epoch (from the last checkpoint's log)."""
    out = os.path.join(opts.output_dir, setting, f"epochs{budget}-seed{seed}")
    if not os.path.isfile(os.path.join(out, "all_results.json")):
        command = [sys.executable, os.path.join(ROOT, "examples", "vit", "run_vit.py"), "--flat_method", "none",
                   "--num_train_epochs", str(budget), "--holdout_fraction", str(opts.holdout_fraction),
                   "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
                   "--seed", str(seed), "--output_dir", out, "--use_cpu", "true", "--dataloader_num_workers", "0",
                   *SETTINGS[setting], *opts.extra]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            sys.exit(f"{setting} epochs={budget} seed={seed} failed:\n{done.stderr[-3000:]}")
    [state] = glob.glob(os.path.join(out, "checkpoint-*", "trainer_state.json"))
    with open(state) as f:
        history = json.load(f)["log_history"]
    return [row["eval_accuracy"] for row in history if "eval_accuracy" in row]


def choose(final: dict[int, dict[int, float]]) -> dict:
    """The one-SE rule over `final[budget][seed]` (held-out accuracy at the budget's end)."""
    means = {b: mean_and_se(list(by_seed.values()))[0] for b, by_seed in final.items()}
    best = max(means, key=means.get)
    paired = {}
    for b, by_seed in final.items():
        seeds = sorted(set(by_seed) & set(final[best]))
        paired[b] = mean_and_se([by_seed[s] - final[best][s] for s in seeds])
    chosen = min(b for b in final if paired[b][0] >= -paired[b][1])
    return {"best": best, "chosen": chosen, "paired": paired}


def main(argv=None):
    opts = parse(argv)
    work = [(s, b, seed) for s in opts.settings for b in opts.budgets for seed in opts.seeds]
    with ThreadPoolExecutor(opts.jobs) as pool:
        curves = dict(zip(work, pool.map(lambda item: run(opts, *item), work)))
    results, lines = {}, ["# The plain Trainer's held-out accuracy against the epoch budget", ""]
    for setting in opts.settings:
        final = {b: {seed: curves[(setting, b, seed)][-1] for seed in opts.seeds} for b in opts.budgets}
        pick = choose(final)
        longest = max(opts.budgets)
        curve = [mean_and_se([curves[(setting, longest, seed)][e] for seed in opts.seeds])
                 for e in range(min(len(curves[(setting, longest, seed)]) for seed in opts.seeds))]
        results[setting] = {
            "final": {str(b): {str(s): a for s, a in v.items()} for b, v in final.items()},
            "budgets": {str(b): dict(zip(("mean", "se"), mean_and_se(list(v.values())))) for b, v in final.items()},
            "paired_to_best": {str(b): dict(zip(("mean", "se"), v)) for b, v in pick["paired"].items()},
            "best": pick["best"], "chosen": pick["chosen"],
            "curve_of_longest": [dict(zip(("mean", "se"), c)) for c in curve],
            "curves": {f"epochs{b}-seed{s}": curves[(setting, b, s)] for b in opts.budgets for s in opts.seeds},
        }
        lines += [f"## {setting}", "", "| epochs | held-out accuracy (%) | difference to the best budget, paired (%) |",
                  "|---|---|---|"]
        for b in opts.budgets:
            m, se = results[setting]["budgets"][str(b)].values()
            d, dse = pick["paired"][b]
            mark = " (chosen)" if b == pick["chosen"] else (" (best)" if b == pick["best"] else "")
            lines.append(f"| {b}{mark} | {100 * m:.2f} ± {100 * se:.2f} | {100 * d:+.2f} ± {100 * dse:.2f} |")
        lines += ["", f"Held-out accuracy after each epoch of the {longest}-epoch runs (mean over seeds): "
                  + ", ".join(f"{100 * c[0]:.1f}" for c in curve), ""]
    results["options"] = {k: v for k, v in vars(opts).items() if k not in ("output_dir", "output", "markdown")}
    with open(opts.output, "w") as f:
        json.dump(results, f, indent=1)
    with open(opts.markdown, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
