"""`hf-flat compare`: run a training script over methods and seeds and print the paper's table.

    hf-flat compare --script examples/vit/run_vit.py --methods none swa sam wasam --seeds 0 1 2 \\
        --grid sam_rho=0.02,0.05,0.1 --grid average_start=0.5,0.75 --output_dir out/compare -- --num_train_epochs 10

Any script works that takes the `FlatTrainingArguments` flags (`--flat_method`, `--seed`,
`--output_dir`, `--sam_rho`, ...) and writes the Trainer's `all_results.json` or
`eval_results.json` into its output folder. Arguments after ``--`` go to every run.

With ``--grid``, each method's tunable values (``sam_rho`` for methods with a perturbation,
``average_start`` for methods with averaging) are chosen first on a held-out part of the training
data, as the paper does: one run per combination with ``--holdout_fraction`` and the first seed; the
best combination on the held-out metric is then run with every seed on the real evaluation set.

The table: the baseline (the first method) as mean +- standard error over seeds; every other
method as its difference to the baseline +- the standard error of that difference,
``sqrt(se_method^2 + se_baseline^2)``; in bold the best method and every method whose mean is
within one standard error (the best method's) of the best. A run that fails is reported in the
table (``n`` counts the runs that worked) and in ``failures``; finished runs are not run again when
the same command is repeated.
"""

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time

PERTURBATION_PARAMS = {"sam_rho"}
AVERAGING_PARAMS = {"average_start", "average_freq", "ema_decay"}


def parse(argv):
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="hf-flat compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="the training script (python file)")
    parser.add_argument("--methods", nargs="+", default=["none", "swa", "sam", "wasam"], help="the first is the baseline")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--metric", default="eval_accuracy", help="key in all_results.json / eval_results.json")
    parser.add_argument("--lower_is_better", action="store_true")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="values to choose from on held-out data, e.g. sam_rho=0.02,0.05,0.1 (repeatable)")
    parser.add_argument("--holdout_fraction", type=float, default=0.1)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    args.extra = extra
    args.grid = dict(_parse_grid(g) for g in args.grid)
    return args


def _parse_grid(text):
    name, _, values = text.partition("=")
    if not values:
        raise SystemExit(f"--grid {text!r}: expected NAME=V1,V2,...")
    return name, values.split(",")


def tunable(method, grid):
    """The grid entries that apply to `method` (via its perturbation / averaging parts)."""
    from .args import parse_flat_method

    perturbation, averaging = parse_flat_method(method)
    keep = {}
    for name, values in grid.items():
        if (name in PERTURBATION_PARAMS and perturbation) or (name in AVERAGING_PARAMS and averaging):
            keep[name] = values
        elif name not in PERTURBATION_PARAMS | AVERAGING_PARAMS and method != "none":
            keep[name] = values  # other flags: tuned for every flat method
    return keep


def run_one(args, name, flags, log):
    """Run the script once into `<output_dir>/runs/<name>`; reuse a finished run. Returns its results or None."""
    out = os.path.join(args.output_dir, "runs", name)
    done = os.path.join(out, "hf_flat_compare_done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    command = [args.python, args.script, *flags, "--output_dir", out, *args.extra]
    start = time.time()
    with open(os.path.join(out, "log.txt"), "w") as logfile:
        code = subprocess.call(command, stdout=logfile, stderr=subprocess.STDOUT)
    metrics = _read_metrics(out)
    if code != 0 or args.metric not in metrics:
        reason = f"exit code {code}" if code else f"{args.metric!r} not in its results"
        log(f"  FAILED {name}: {reason}; see {os.path.join(out, 'log.txt')}")
        return {"name": name, "failed": reason, "log": os.path.join(out, "log.txt")}
    result = {"name": name, "flags": flags, "metrics": metrics, "seconds": round(time.time() - start, 1)}
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def _read_metrics(folder):
    for name in ("all_results.json", "eval_results.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {}


def mean_and_se(values):
    """Mean and standard error (sample standard deviation / sqrt(n)); SE is 0 for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def table(scores: dict, lower_is_better=False):
    """Rows of the paper's table from {method: [score per seed]} (first method = baseline)."""
    methods = list(scores)
    stats = {m: mean_and_se(v) for m, v in scores.items()}
    valid = [m for m in methods if scores[m]]
    sign = -1 if lower_is_better else 1
    best = max(valid, key=lambda m: sign * stats[m][0]) if valid else None
    base_mean, base_se = stats[methods[0]]
    rows = []
    for m in methods:
        mean, se = stats[m]
        bold = bool(scores[m]) and best is not None and sign * (stats[best][0] - mean) <= stats[best][1]
        row = {"method": m, "n": len(scores[m]), "mean": mean, "se": se, "bold": bold}
        if m != methods[0]:
            row["difference"] = mean - base_mean
            row["difference_se"] = math.sqrt(se**2 + base_se**2)
        rows.append(row)
    return rows


def markdown(rows, metric, scale=100.0):
    """The table as Markdown; scores shown x `scale` (percent) as in the paper."""
    lines = [f"| method | {metric} (baseline) / difference to baseline | n |", "|---|---|---|"]
    for i, r in enumerate(rows):
        if r["n"] == 0:
            cell = "all runs failed"
        elif i == 0:
            cell = f"{scale * r['mean']:.2f} ± {scale * r['se']:.2f}"
        else:
            cell = f"{scale * r['difference']:+.2f} ± {scale * r['difference_se']:.2f}"
        if r["bold"]:
            cell = f"**{cell}**"
        lines.append(f"| {r['method']} | {cell} | {r['n']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.output_dir, exist_ok=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    chosen, tuning = {}, {}
    for method in args.methods:
        grid = tunable(method, args.grid)
        chosen[method] = {}
        if not grid:
            continue
        names = list(grid)
        best = None
        for values in itertools.product(*grid.values()):
            setting = dict(zip(names, values))
            tag = "-".join(f"{k}{v}" for k, v in setting.items())
            flags = ["--flat_method", method, "--seed", str(args.seeds[0]), "--holdout_fraction", str(args.holdout_fraction)]
            flags += [x for k, v in setting.items() for x in (f"--{k}", v)]
            log(f"[tune] {method} {setting}")
            result = run_one(args, f"tune-{method}-{tag}", flags, log)
            tuning.setdefault(method, []).append({"setting": setting, **result})
            if "failed" in result:
                continue
            score = result["metrics"][args.metric] * (-1 if args.lower_is_better else 1)
            if best is None or score > best[0]:
                best = (score, setting)
        chosen[method] = best[1] if best else {}
        log(f"[tune] {method}: chose {chosen[method]}")

    scores, runs, failures = {m: [] for m in args.methods}, [], []
    total, done = len(args.methods) * len(args.seeds), 0
    for seed in args.seeds:
        for method in args.methods:
            done += 1
            log(f"[{done}/{total}] {method} seed {seed} {chosen[method] or ''}")
            flags = ["--flat_method", method, "--seed", str(seed)] + [
                x for k, v in chosen[method].items() for x in (f"--{k}", v)
            ]
            result = run_one(args, f"{method}-seed{seed}", flags, log)
            runs.append({"method": method, "seed": seed, **result})
            if "failed" in result:
                failures.append(runs[-1])
            else:
                scores[method].append(result["metrics"][args.metric])

    rows = table(scores, args.lower_is_better)
    text = markdown(rows, args.metric)
    print(text)
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + ", ".join(f"{f['name']} ({f['failed']})" for f in failures))
    with open(os.path.join(args.output_dir, "comparison.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as f:
        json.dump({"metric": args.metric, "table": rows, "chosen": chosen, "tuning": tuning, "runs": runs,
                   "failures": failures}, f, indent=2)
    with open(os.path.join(args.output_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "status", args.metric, "settings"])
        for r in runs:
            status = r.get("failed", "ok")
            writer.writerow([r["method"], r["seed"], status, r.get("metrics", {}).get(args.metric, ""),
                             json.dumps(chosen[r["method"]])])
    return 1 if failures and not any(scores.values()) else 0
