"""`hf-flat interpolate MODEL_A MODEL_B`: the loss and metric (accuracy) on the training and test
data along the straight line ``theta(alpha) = (1 - alpha) A + alpha B`` between two models, alpha
from --alpha_min to --alpha_max (Kaddour, Liu, Silva, Kusner, "When Do Flat Minima Optimizers
Work?", NeurIPS 2022, arXiv 2202.00661, Figure 2), BatchNorm statistics recomputed at each point;
the two models themselves are always evaluated. Writes interpolation.png and results.json (every
point), and prints, per data set, the loss (and accuracy) at both models and the worst point
between them.
"""

import os

from tqdm.auto import tqdm

from ..loading import has_batchnorm
from ._common import HelpFormatter, _f, check_models, data_arguments, finish, load_models, weights_argument


def add_parser(subparsers):
    p = subparsers.add_parser("interpolate", help="loss and metric along (1 - alpha) A + alpha B",
                              formatter_class=HelpFormatter)
    p.add_argument("model_a", help="model A (alpha 0): a save_pretrained folder or checkpoint")
    p.add_argument("model_b", help="model B (alpha 1)")
    p.add_argument("--alpha_min", type=float, default=-1.0, help="first alpha")
    p.add_argument("--alpha_max", type=float, default=1.5, help="last alpha")
    p.add_argument("--points", type=int, default=26, help="evenly spaced alphas (26 puts 0 and 1 on the grid)")
    weights_argument(p, two_models=True)
    data_arguments(p)


def run(args) -> dict:
    """Evaluate both models and the points between them, plot, write results.json; return the results."""
    from ..analysis import interpolate
    from ..analysis.plots import plot_interpolation
    from ..analysis.surface import grid_points

    paths = [args.model_a, args.model_b]
    weights = check_models(args, paths)
    data, models, names, results = load_models(args, paths, weights)
    train_batches = data["train"][1]
    eval_sets = {"train": train_batches, "test": data["eval"][1]}
    notes = data["notes"]

    model_a, model_b = models
    bn = train_batches if has_batchnorm(model_a) else None
    # the two models themselves are always evaluated, whatever the spacing of the other points
    alphas = sorted(set(grid_points(args.alpha_min, args.alpha_max, args.points)) | {0.0, 1.0})
    with tqdm(total=len(alphas), desc="interpolation") as bar:
        rows = interpolate(model_a, model_b, eval_sets, alphas, bn, progress=lambda i, n: bar.update(1))
    results["interpolation"] = rows
    plot_interpolation(rows, os.path.join(args.output_dir, "interpolation.png"), names=names)
    summary = interpolation_summary(rows, names)
    return finish(args.output_dir, results, notes, summary)


def interpolation_summary(rows, names) -> list[str]:
    """Per data set: loss (and accuracy) at the two models and the worst point between them."""
    ends = [min(rows, key=lambda r: abs(r["alpha"] - x)) for x in (0, 1)]
    between = [r for r in rows if 0 <= r["alpha"] <= 1] or rows
    lines = [f"A = {names[0]} (alpha {ends[0]['alpha']:g}), B = {names[1]} (alpha {ends[1]['alpha']:g})"]
    for name in (k for k in rows[0] if k != "alpha"):
        top = max(between, key=lambda r: r[name]["loss"])
        line = (f"  {name}: loss A {_f(ends[0][name]['loss'])}, B {_f(ends[1][name]['loss'])}, highest between "
                f"{_f(top[name]['loss'])} at alpha {top['alpha']:g}")
        if "metric" in rows[0][name]:
            low = min(between, key=lambda r: r[name]["metric"])
            line += (f"; accuracy A {_f(ends[0][name]['metric'])}, B {_f(ends[1][name]['metric'])}, lowest between "
                     f"{_f(low[name]['metric'])} at alpha {low['alpha']:g}")
        lines.append(line)
    return lines
