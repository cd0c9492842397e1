"""`hf-flat report`: one table that sets several models side by side, as the tables of Kaddour,
Liu, Silva, Kusner, "When Do Flat Minima Optimizers Work?" (NeurIPS 2022, arXiv 2202.00661) do.

For each model: test loss and accuracy (`evaluate`), adversarial and average m-sharpness, the
asymmetry factor and the top Hessian eigenvalue (`hf-flat sharpness`'s `sharpness_measures`). For
each pair: the barrier on the straight line between them (`interpolate` at the interior points,
the ends taken from the models' own evaluations, `barrier` of hf_flat.analysis.connect) and, when
an `hf-flat connect` folder for the pair is given, the barrier on its fitted curve (read from its
results.json, not refitted). Each quantity is computed once.
"""

import itertools
import json
import os

from .analysis.connect import barrier
from .analysis.surface import evaluate, grid_points, interpolate, weights_at
from .analysis.directions import trainable
from .data import UsageError


def _curve_results(folder):
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"--curves {folder}: no results.json there; give an output folder of `hf-flat connect`.")
    with open(path) as f:
        found = json.load(f)
    if found.get("command") != "connect" or len(found.get("models", [])) != 2:
        raise UsageError(f"--curves {folder}: its results.json was not written by `hf-flat connect`.")
    return found


def _row(value):
    return "-" if value is None else f"{value:.4g}"


def run_report(args) -> dict:
    from .cli import check_counts, finish, has_batchnorm, load_average, load_model, model_name, prepare
    from .cli import sharpness_measures, weights_per_model

    paths = args.models
    weights = weights_per_model(paths, args.weights)
    check_counts(args)
    keys = [(os.path.abspath(p), w) for p, w in zip(paths, weights)]
    if len(set(keys)) != len(keys):
        raise UsageError("a model is given twice (with the same --weights): give each once.")
    curves = {folder: _curve_results(folder) for folder in args.curves}
    index = {os.path.abspath(p): i for i, p in enumerate(paths)}
    pairs_of_curves = {}
    for folder, found in curves.items():
        a, b = (index.get(m) for m in found["models"])
        if a is None or b is None:
            missing = [m for m in found["models"] if m not in index]
            raise UsageError(f"--curves {folder} joins {missing[0]}, which is not one of the MODELs.")
        pairs_of_curves[tuple(sorted((a, b)))] = (folder, found)

    os.makedirs(args.output_dir, exist_ok=True)
    import torch

    torch.manual_seed(args.seed)
    data = prepare(args, paths[0])
    notes = data["notes"] + ([f"every model's data is processed with {paths[0]}'s tokenizer / image processor"]
                             if len(paths) > 1 else [])
    eval_sets = {"train": data["train"][1], "test": data["eval"][1]}
    models, names, results = [], [], {"command": "report", "arguments": vars(args), "models": [], "pairs": []}
    for path, which in zip(paths, weights):
        model = load_model(path, args.device)
        described = load_average(model, path) if which == "averaged" else "live (as saved)"
        bn = eval_sets["train"] if has_batchnorm(model) else None
        # the model's own evaluation; with BatchNorm, its statistics recomputed on the training data,
        # as at every other point of a path, so that the evaluation is also the path's end
        with weights_at(model, [p.detach().float() for _, p in trainable(model)], bn):
            own = {name: evaluate(model, batches) for name, batches in eval_sets.items()}
        print(f"{path}: sharpness ...")
        measures = sharpness_measures(args, model, data, notes)
        models.append(model)
        names.append(model_name(path, which))
        results["models"].append({"model": path, "name": names[-1], "weights": described, "evaluation": own,
                                  **measures})

    interior = [t for t in grid_points(0.0, 1.0, args.points) if 0.0 < t < 1.0]
    for i, j in itertools.combinations(range(len(models)), 2):
        bn = eval_sets["train"] if has_batchnorm(models[i]) else None
        print(f"straight line {names[i]} -> {names[j]} ...")
        rows = [{"t": r.pop("alpha"), **r} for r in interpolate(models[i], models[j], eval_sets, interior, bn)]
        rows = ([{"t": 0.0, **results["models"][i]["evaluation"]}] + rows
                + [{"t": 1.0, **results["models"][j]["evaluation"]}])
        pair = {"a": paths[i], "b": paths[j], "line": rows, "barriers": {}}
        for name in eval_sets:
            for quantity in ("loss", "metric"):
                if quantity in rows[0][name]:
                    pair["barriers"][f"line/{name}/{quantity}"] = barrier(rows, name, quantity)
        if (i, j) in pairs_of_curves:
            folder, found = pairs_of_curves[(i, j)]
            theirs = found.get("arguments", {})
            differ = [k for k in ("data", "data_config", "train_split", "eval_split", "max_train_samples",
                                  "max_eval_samples", "max_length") if theirs.get(k) != getattr(args, k)]
            if differ:
                notes.append(f"the curve of {folder} was evaluated with other data settings ("
                             + ", ".join(f"{k}={theirs.get(k)!r} there, {getattr(args, k)!r} here" for k in differ)
                             + "): its barriers are its own run's")
            pair["curve_from"] = folder
            pair["curve_kind"] = found.get("kind")
            pair["barriers"].update({k: v for k, v in found["barriers"].items() if k.startswith("curve/")})
        results["pairs"].append(pair)

    lines = ["| model | test loss | test accuracy | adversarial sharpness | average sharpness | asymmetry factor "
             "| top Hessian eigenvalue |", "|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        test = m["evaluation"]["test"]
        lines.append(f"| {m['name']} | {_row(test['loss'])} | {_row(test.get('metric'))} "
                     f"| {_row(m['adversarial']['sharpness'])} | {_row(m['average']['sharpness'])} "
                     f"| {_row(m['asymmetry']['omega'])} | {_row(m['hessian']['eigenvalue'])} |")
    if results["pairs"]:
        lines += ["", "| model A | model B | straight line: train loss barrier | test loss barrier | test accuracy "
                  "drop | curve: train loss barrier | test loss barrier | test accuracy drop |",
                  "|---|---|---|---|---|---|---|---|"]
        for pair in results["pairs"]:
            b = pair["barriers"]
            cells = [_row(b.get(f"{path}/{name}/{quantity}", {}).get("height"))
                     for path in ("line", "curve") for name, quantity in
                     (("train", "loss"), ("test", "loss"), ("test", "metric"))]
            lines.append(f"| {model_name(pair['a'])} | {model_name(pair['b'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Sharpness: rho {args.rho}, m {args.m}, {args.n} (adversarial) and {args.n_average} (average) "
              f"batches; asymmetry: mu {args.mu}, {args.directions} directions; Hessian: {args.hessian_iterations} "
              f"power iterations; all on the training split. Barrier: max over t of the path's value above the "
              f"straight interpolation of the ends' values ({args.points} points on each line; a curve's own points "
              "from its `hf-flat connect` run); accuracy drop: the largest fall below it. '-': not measured (no "
              "curve fitted for the pair, or no class logits)."]
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    results["table"] = table
    return finish(args.output_dir, results, notes, [table], "wrote report.md and ")
