"""`hf-flat plane MODEL`: the loss and metric (accuracy) on the training and test data on a grid
(--steps x --steps over [-span, span]^2) of ``MODEL + alpha delta + beta eta``, where `delta` and
`eta` are Gaussian, filter-normalised directions (Li, Xu, Taylor, Studer, Goldstein, "Visualizing
the Loss Landscape of Neural Nets", NeurIPS 2018, arXiv 1712.09913), `eta` made orthogonal to
`delta` filter by filter (Kaddour et al. 2022, arXiv 2202.00661, appendix A); BatchNorm statistics
are recomputed at each point. With an odd --steps the model itself, (0, 0), is a grid point.
Writes a contour plot per data set and quantity (plane_<set>_<quantity>.png, each starring the
best point of its own data set; with --plot3d also a 3-D surface, plane_<set>_<quantity>_3d.png)
and results.json (every grid point, the best ones), and prints the loss (and accuracy) at the
model and at the best point.
"""

import os

from tqdm.auto import tqdm

from ..data import UsageError
from ..loading import has_batchnorm
from ._common import HelpFormatter, _f, check_models, data_arguments, finish, load_models, weights_argument


def add_parser(subparsers):
    p = subparsers.add_parser("plane", help="loss and metric on a 2-D plane of filter-normalised directions",
                              formatter_class=HelpFormatter)
    p.add_argument("model", help="a save_pretrained folder or checkpoint")
    p.add_argument("--steps", type=int, default=21, help="grid points per axis (odd: the model itself is a grid point)")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span]^2")
    p.add_argument("--plot3d", action="store_true",
                   help="also draw each plot as a 3-D surface (plane_<set>_<quantity>_3d.png) next to the contour plot")
    weights_argument(p)
    data_arguments(p)


def run(args) -> dict:
    """Evaluate the model's plane, plot it, write results.json; return the results."""
    from ..analysis import plane
    from ..analysis.plots import best_point, plot_plane, plot_plane_3d

    paths = [args.model]
    weights = check_models(args, paths)
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: give at least 2 grid points per axis (odd: the model is on the grid).")
    data, models, names, results = load_models(args, paths, weights)
    train_batches = data["train"][1]
    eval_sets = {"train": train_batches, "test": data["eval"][1]}
    notes = data["notes"]

    if args.steps % 2 == 0:
        notes.append(f"--steps {args.steps} is even: the grid does not hold the model itself, (0, 0); "
                     "an odd --steps does")
    (model,), (name,) = models, names
    bn = train_batches if has_batchnorm(model) else None
    with tqdm(total=args.steps**2, desc="plane") as bar:
        result, _ = plane(model, eval_sets, args.steps, (-args.span, args.span), args.seed, bn,
                          progress=lambda i, n: bar.update(1))
    for eval_set in eval_sets:  # each plot marks the best point of its own data set
        point, what = best_point(result["grid"], eval_set)
        result[f"best_{eval_set}"] = {"point": point, "what": what}
    best_test = result["best_test"]
    result["best_test_metric"] = best_test["point"] if "metric" in best_test["what"] else None
    results["plane"] = result
    for eval_set, quantity in (("test", "loss"), ("test", "metric"), ("train", "loss")):
        best = result[f"best_{eval_set}"]
        if quantity == "metric" and "metric" not in best["what"]:
            continue
        plot_plane(result, os.path.join(args.output_dir, f"plane_{eval_set}_{quantity}.png"), quantity, eval_set,
                   (best["point"]["alpha"], best["point"]["beta"]), name, best["what"])
        if args.plot3d:
            plot_plane_3d(result, os.path.join(args.output_dir, f"plane_{eval_set}_{quantity}_3d.png"), quantity,
                          eval_set, name)
    summary = plane_summary(result, name)
    return finish(args.output_dir, results, notes, summary)


def plane_summary(result, name) -> list[str]:
    """Per data set: loss (and accuracy) at the model (the grid point nearest (0, 0)) and the best point."""
    centre = min(result["grid"], key=lambda g: abs(g["alpha"]) + abs(g["beta"]))
    lines = [f"plane around {name} (model at ({centre['alpha']:g}, {centre['beta']:g}))"]
    for eval_set in (k for k in centre if k not in ("alpha", "beta")):
        line = f"  {eval_set}: loss {_f(centre[eval_set]['loss'])}"
        if "metric" in centre[eval_set]:
            line += f", accuracy {_f(centre[eval_set]['metric'])}"
        best, label = result[f"best_{eval_set}"]["point"], result[f"best_{eval_set}"]["what"]
        value = best[eval_set]["metric" if "metric" in label else "loss"]
        lines.append(line + f"; {label} {_f(value)} at ({best['alpha']:g}, {best['beta']:g})")
    return lines
