"""Does the pretraining work? Fine-tuning from the pretrained model against the same model from scratch.

The control that issue 26 asks for before any method is studied on the pretrained regime: the
WordNet task of `examples/pretrain/wordnet_data.py` (a synset's lexicographer file, 45 classes,
from its definition) fine-tuned with the plain Trainer (`examples/glue/run_glue.py`,
`flat_method="none"`) from

- each checkpoint of a `examples/pretrain/run_mlm.py` run (`--model`: its output folder, whose
  `checkpoint-N` folders are the pretraining's epochs, and the folder itself, the last, when the
  run finished), and
- the same architecture and tokenizer with fresh weights (`--from_scratch true`): the control,

at every learning rate of `--learning_rates` (so that neither start wins for want of its own rate),
for every seed. Fine-tuning uses the first `--max_train_samples` training rows (a GLUE-sized task)
for `--epochs` epochs, and is scored on the task's validation split; its test split is left for
the method study. A seed fixes the new head, the data order and (from scratch) every weight.

    .venv/bin/python benchmarks/accuracy/pretraining.py --data data/wordnet --model out/wordnet-mlm

Writes `--output` (JSON: every run) and `--markdown` (the table: accuracy mean ± SE over seeds and
the paired difference to the scratch start at the same rate). Finished runs are reused.
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from hf_flat.commands.compare import mean_and_se

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the folder wordnet_data.py wrote (its task/ folder is used)")
    p.add_argument("--model", required=True, help="the folder run_mlm.py wrote")
    p.add_argument("--learning_rates", nargs="+", default=["1e-4", "3e-4", "1e-3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_train_samples", type=int, default=10000)
    p.add_argument("--checkpoints", choices=("all", "last"), default="all",
                   help="fine-tune from every pretraining checkpoint (all), or only from the final model (last)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--output_dir", default=os.path.join(ROOT, "out", "pretraining"), help="the runs")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "accuracy", "pretraining.json"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "benchmarks", "accuracy", "pretraining.md"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run_glue.py arguments, after the others")
    return p.parse_args(argv)


def starts(opts):
    """[(name, folder, pretraining epoch or None, its MLM eval loss or None)]: the checkpoints in
    order, the final model, then the scratch control."""
    found = []
    if opts.checkpoints == "all":
        for path in sorted(glob.glob(os.path.join(opts.model, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1])):
            with open(os.path.join(path, "trainer_state.json")) as f:
                state = json.load(f)
            loss = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
            found.append((os.path.basename(path), path, state["epoch"], loss[-1] if loss else None))
    results = os.path.join(opts.model, "all_results.json")  # absent when the pretraining was stopped early
    if os.path.isfile(results):
        with open(results) as f:
            final = json.load(f)
        if not found or found[-1][2] != final.get("epoch"):
            found.append(("final", opts.model, final.get("epoch"), final.get("eval_loss")))
    if not found:
        sys.exit(f"--model {opts.model}: neither a finished run_mlm.py folder nor one with checkpoint-N folders")
    return found + [("scratch", found[-1][1], None, None)]


def run(opts, name, folder, rate, seed):
    out = os.path.join(opts.output_dir, f"{name}-lr{rate}-seed{seed}")
    results = os.path.join(out, "all_results.json")
    if not os.path.isfile(results):
        task = os.path.join(opts.data, "task")
        command = [sys.executable, os.path.join(ROOT, "examples", "glue", "run_glue.py"), "--model_name_or_path", folder,
                   "--train_file", os.path.join(task, "train.csv"), "--validation_file", os.path.join(task, "validation.csv"),
                   "--text_column_names", "text", "--max_train_samples", str(opts.max_train_samples),
                   "--num_train_epochs", str(opts.epochs), "--learning_rate", rate, "--warmup_steps", "0.06",
                   "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256", "--eval_strategy", "no",
                   "--seed", str(seed), "--output_dir", out, "--use_cpu", "true", "--dataloader_num_workers", "0",
                   *(["--from_scratch", "true"] if name == "scratch" else []), *opts.extra]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            sys.exit(f"{name} lr={rate} seed={seed} failed:\n{done.stderr[-3000:]}")
    with open(results) as f:
        return json.load(f)


def markdown(result):
    lines = ["| start | pretraining epochs | MLM eval loss (perplexity) | learning rate | validation accuracy (%) | "
             "paired difference to scratch (points) |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        loss = "-" if row["mlm_eval_loss"] is None else f"{row['mlm_eval_loss']:.2f} ({math.exp(row['mlm_eval_loss']):.0f})"
        epochs = "-" if row["pretraining_epochs"] is None else f"{row['pretraining_epochs']:g}"
        diff = "baseline" if row["start"] == "scratch" else (
            f"{100 * row['paired_difference']:+.2f} ± {100 * row['paired_difference_se']:.2f}")
        lines.append(f"| {row['start']} | {epochs} | {loss} | {row['learning_rate']} | "
                     f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_se']:.2f} | {diff} |")
    return "\n".join(lines)


def main(argv=None):
    opts = parse(argv)
    todo = [(s, rate, seed) for s in starts(opts) for rate in opts.learning_rates for seed in opts.seeds]
    with ThreadPoolExecutor(opts.jobs) as pool:
        metrics = list(pool.map(lambda t: run(opts, t[0][0], t[0][1], t[1], t[2]), todo))
    accuracy = {(s[0], rate, seed): m["eval_accuracy"] for (s, rate, seed), m in zip(todo, metrics)}
    runtime = {(s[0], rate, seed): m["train_runtime"] for (s, rate, seed), m in zip(todo, metrics)}
    rows = []
    for name, _, epochs, loss in starts(opts):
        for rate in opts.learning_rates:
            mine = [accuracy[name, rate, seed] for seed in opts.seeds]
            diffs = [accuracy[name, rate, seed] - accuracy["scratch", rate, seed] for seed in opts.seeds]
            rows.append({"start": name, "pretraining_epochs": epochs, "mlm_eval_loss": loss, "learning_rate": rate,
                         "accuracy": mean_and_se(mine)[0], "accuracy_se": mean_and_se(mine)[1],
                         "paired_difference": mean_and_se(diffs)[0], "paired_difference_se": mean_and_se(diffs)[1],
                         "train_runtime_s": mean_and_se([runtime[name, rate, seed] for seed in opts.seeds])[0]})
    result = {"seeds": opts.seeds, "epochs": opts.epochs, "max_train_samples": opts.max_train_samples,
              "learning_rates": opts.learning_rates, "rows": rows,
              "runs": [{"start": s[0], "learning_rate": rate, "seed": seed, "eval_accuracy": accuracy[s[0], rate, seed],
                        "train_runtime": runtime[s[0], rate, seed]} for s, rate, seed in todo]}
    with open(opts.output, "w") as f:
        json.dump(result, f, indent=1)
    text = ["# Pretrained start against scratch on the WordNet task", "",
            f"Fine-tuned with the plain Trainer for {opts.epochs} epochs on the first {opts.max_train_samples} training "
            f"rows, seeds {', '.join(map(str, opts.seeds))}, scored on the validation split "
            "(`benchmarks/accuracy/pretraining.py`).", "", markdown(result), ""]
    with open(opts.markdown, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    return result


if __name__ == "__main__":
    main()
