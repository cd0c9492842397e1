"""`hf-flat report`: one table that sets several models side by side, as the tables of Kaddour,
Liu, Silva, Kusner, "When Do Flat Minima Optimizers Work?" (NeurIPS 2022, arXiv 2202.00661) do.

For each model: test loss and accuracy (`evaluate`), adversarial and average m-sharpness, the
asymmetry factor and the top Hessian eigenvalue (`hf-flat sharpness`'s `sharpness_measures`). For
each pair: the barrier on the straight line between them (`interpolate` at the interior points,
the ends taken from the models' own evaluations, `barrier` of hf_flat.analysis.connect) and, when
an `hf-flat connect` folder for the pair is given, the barrier on its fitted curve (read from its
results.json, not refitted). Each quantity is computed once. Writes the table to report.md and
every number to results.json.
"""

import itertools
import json
import os

from ..analysis.connect import barrier
from ..analysis.surface import evaluate, grid_points, interpolate, weights_at
from ..analysis.directions import trainable
from ..data import UsageError
from ..loading import has_batchnorm, load_weights, model_name, prepare
from ._common import HelpFormatter, check_counts, data_arguments, finish, weights_per_model
from .sharpness import sharpness_arguments, sharpness_measures


def add_parser(subparsers):
    p = subparsers.add_parser("report", help="one table comparing models: test metrics, sharpness, asymmetry, "
                              "Hessian, barriers between each pair", formatter_class=HelpFormatter,
                              description="For each model: test loss and accuracy, adversarial and average "
                              "sharpness, the asymmetry factor and the top Hessian eigenvalue (the functions of "
                              "`hf-flat sharpness`); for each pair of models: the loss barrier on the straight line "
                              "between them and, when `--curves` gives an `hf-flat connect` folder for that pair, on "
                              "its curve. Writes report.md and results.json.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="save_pretrained folders or checkpoints")
    p.add_argument("--curves", nargs="+", default=[], metavar="DIR",
                   help="output folders of `hf-flat connect` whose barriers join the table (matched to the pair by "
                        "the model paths in their results.json)")
    p.add_argument("--points", type=int, default=11, help="evenly spaced t in [0, 1] on each straight line")
    sharpness_arguments(p)
    p.add_argument("--weights", choices=("live", "averaged"), default="live", nargs="+",
                   help="'live' or 'averaged' (the SWA / EMA / LAWA / WASAM average in a checkpoint); one value for all "
                        "models, or one per model")
    data_arguments(p)


def _curve_results(folder):
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"--curves {folder}: no results.json there; give an output folder of `hf-flat connect`.")
    with open(path) as f:
        found = json.load(f)
    if found.get("command") != "connect" or len(found.get("models", [])) != 2:
        raise UsageError(f"--curves {folder}: its results.json was not written by `hf-flat connect`.")
    return found


def curve_weights(found) -> list[str]:
    """The weights (`live` / `averaged`) of the two ends of an `hf-flat connect` run, from its
    results.json (`--weights`: one value for both, or one each; a run from before --weights: live)."""
    weights = found.get("arguments", {}).get("weights") or ["live"]
    weights = [weights] if isinstance(weights, str) else list(weights)
    return (weights * 2)[:2] if len(weights) == 1 else weights[:2]


def _weights_text(which) -> str:
    return f"{which} weights"


def match_curves(curves, paths, weights) -> dict:
    """{(i, j): (folder, found, reversed)} with i < j: each `hf-flat connect` folder matched to the
    pair of MODELs whose path *and* weights (live / averaged) are its ends (`reversed`: the curve runs
    from MODEL j to MODEL i); a curve whose ends are not two of the MODELs with those weights is
    refused, naming what differs and what to pass instead."""
    index = {(os.path.abspath(p), w): i for i, (p, w) in enumerate(zip(paths, weights))}
    given = {}
    for p, w in zip(paths, weights):
        given.setdefault(os.path.abspath(p), []).append(w)
    matched = {}
    for folder, found in curves.items():
        ends = list(zip(found["models"], curve_weights(found)))
        at = [index.get((os.path.abspath(m), w)) for m, w in ends]
        for (model, which), i in zip(ends, at):
            if i is not None:
                continue
            if os.path.abspath(model) not in given:
                raise UsageError(f"--curves {folder} joins {model}, which is not one of the MODELs.")
            here = " and ".join(given[os.path.abspath(model)])
            raise UsageError(
                f"--curves {folder} joins the {_weights_text(which)} of {model} (its `hf-flat connect --weights "
                f"{' '.join(curve_weights(found))}`), but this report has {model} with --weights {here}: its "
                f"barriers belong to other weights. Give {model} with --weights {which} here (one --weights value "
                "per MODEL), or run `hf-flat connect` again on the weights this report uses.")
        if at[0] == at[1]:
            raise UsageError(f"--curves {folder} joins {ends[0][0]} ({_weights_text(ends[0][1])}) to itself: "
                             "give a curve between two different MODELs.")
        pair = tuple(sorted(at))
        if pair in matched:
            raise UsageError(f"--curves {matched[pair][0]} and {folder} join the same pair of MODELs: give one.")
        matched[pair] = (folder, found, at[0] > at[1])
    return matched


def curve_barriers(found: dict, reversed_curve: bool) -> dict:
    """The ``curve/*`` barriers of a `hf-flat connect` result, with ``t`` running from the report's
    model A to its model B, as on the line: ``1 - t`` of the curve's own when it runs from B to A."""
    barriers = {}
    for key, value in found["barriers"].items():
        if key.startswith("curve/"):
            flip = reversed_curve and value.get("at") is not None
            barriers[key] = {**value, "at": 1.0 - value["at"]} if flip else value
    return barriers


def _row(value):
    return "-" if value is None else f"{value:.4g}"


def run(args) -> dict:
    """Measure every model and pair, write report.md and results.json; return the results."""
    paths = args.models
    weights = weights_per_model(paths, args.weights)
    check_counts(args)
    keys = [(os.path.abspath(p), w) for p, w in zip(paths, weights)]
    if len(set(keys)) != len(keys):
        raise UsageError("a model is given twice (with the same --weights): give each once.")
    curves = {folder: _curve_results(folder) for folder in args.curves}
    pairs_of_curves = match_curves(curves, paths, weights)

    os.makedirs(args.output_dir, exist_ok=True)
    import torch

    torch.manual_seed(args.seed)
    data = prepare(args, paths[0])
    notes = data["notes"] + ([f"every model's data is processed with {paths[0]}'s tokenizer / image processor"]
                             if len(paths) > 1 else [])
    eval_sets = {"train": data["train"][1], "test": data["eval"][1]}
    models, names, results = [], [], {"command": "report", "arguments": vars(args), "models": [], "pairs": []}
    for path, which in zip(paths, weights):
        model, described = load_weights(path, args.device, which)
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
        pair = {"a": paths[i], "weights_a": weights[i], "name_a": names[i], "b": paths[j], "weights_b": weights[j],
                "name_b": names[j], "line": rows, "barriers": {}}
        for name in eval_sets:
            for quantity in ("loss", "metric"):
                if quantity in rows[0][name]:
                    pair["barriers"][f"line/{name}/{quantity}"] = barrier(rows, name, quantity)
        if (i, j) in pairs_of_curves:
            folder, found, reversed_curve = pairs_of_curves[(i, j)]
            theirs = found.get("arguments", {})
            differ = [k for k in ("data", "data_config", "train_split", "eval_split", "max_train_samples",
                                  "max_eval_samples", "max_length") if theirs.get(k) != getattr(args, k)]
            if differ:
                notes.append(f"the curve of {folder} was evaluated with other data settings ("
                             + ", ".join(f"{k}={theirs.get(k)!r} there, {getattr(args, k)!r} here" for k in differ)
                             + "): its barriers are its own run's")
            pair["curve_from"] = folder
            pair["curve_kind"] = found.get("kind")
            pair["barriers"].update(curve_barriers(found, reversed_curve))
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
            lines.append(f"| {pair['name_a']} | {pair['name_b']} | " + " | ".join(cells) + " |")
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
