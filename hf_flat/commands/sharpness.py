"""`hf-flat sharpness MODEL`: four measures of how sharp the model's minimum is, all on the
training split (the first --max_train_samples examples): the adversarial m-sharpness over --n
batches of --m examples and the average (random-direction) m-sharpness over --n_average batches,
both at radius --rho (Boca, Cross, Holm, Korkmaz, "Towards an Even Better Understanding of
Sharpness-Aware Minimisation", University of Cambridge R252 report, 2023, section 4.3); the
asymmetry factor Omega over --directions random directions at distance --mu (section 4.4); and the
top Hessian eigenvalue by power iteration on exact Hessian-vector products. When the examples hold
fewer than --n (or --n_average) batches of --m, as many as fit are used, and a note says so.
Writes results.json and prints the measures. `hf-flat report` takes the same flags and measures.
"""

import sys

from ..data import UsageError
from ..loading import has_batchnorm
from ._common import HelpFormatter, check_models, data_arguments, finish, load_models, weights_argument


def add_parser(subparsers):
    p = subparsers.add_parser("sharpness", help="m-sharpness, asymmetry factor and top Hessian eigenvalue",
                              formatter_class=HelpFormatter)
    p.add_argument("model", help="a save_pretrained folder or checkpoint")
    sharpness_arguments(p)
    weights_argument(p)
    data_arguments(p)


def sharpness_arguments(parser):
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness perturbation")
    parser.add_argument("--m", type=int, default=128, help="batch size of the m-sharpness")
    parser.add_argument("--n", type=int, default=4, help="batches of the adversarial sharpness")
    parser.add_argument("--n_average", type=int, default=15, help="batches of the average (random-direction) sharpness")
    parser.add_argument("--mu", type=float, default=1.0, help="distance of the asymmetry factor")
    parser.add_argument("--directions", type=int, default=30, help="random directions of the asymmetry factor")
    parser.add_argument("--hessian_iterations", type=int, default=20, help="power iterations for the Hessian eigenvalue")


def run(args) -> dict:
    """Measure the model's sharpness, write results.json; return the results."""
    paths = [args.model]
    weights = check_models(args, paths)
    data, models, _, results = load_models(args, paths, weights, need_eval=False)
    notes = data["notes"]

    (model,) = models
    measures = sharpness_measures(args, model, data, notes)
    results.update(measures)
    summary = [f"training examples: {measures['training_examples']}"]
    for key in ("adversarial", "average", "asymmetry", "hessian"):
        shown = {k: v for k, v in results[key].items() if k != "rises"}
        summary.append(f"{key}: {shown}")
    return finish(args.output_dir, results, notes, summary)


def sharpness_measures(args, model, data, notes) -> dict:
    """`hf-flat sharpness`'s four measures of `model` on the training split: adversarial and
    average m-sharpness, the asymmetry factor and the top Hessian eigenvalue."""
    from ..analysis import asymmetry_factor, sharpness, top_hessian_eigenvalue
    from ..data import batches

    dataset = data["train"][0]
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    available = len(dataset)
    where = f" (--max_train_samples {args.max_train_samples})" if args.max_train_samples else ""
    if args.m > available:
        raise UsageError(f"--m {args.m} is larger than the {available} training examples{where}: lower --m "
                         "or use more training data.")

    def m_batches(count, option):
        """`count` batches of exactly m training examples, or as many as fit (then a note says so)."""
        used = min(count, available // args.m)
        if used < count:
            note = (f"{option} {count} batches of --m {args.m} need {count * args.m} training examples, "
                    f"{available} are available{where}: used {used} batches")
            if note not in notes:
                notes.append(note)
        loader = batches(dataset.shuffle(seed=args.seed), args.m, args.device, limit=used * args.m)
        return list(loader())

    train_batches = data["train"][1]
    results = {"training_examples": available}
    print("adversarial sharpness ...", file=sys.stderr)
    results["adversarial"] = {**sharpness(model, m_batches(args.n, "--n"), args.rho, "adversarial", args.seed),
                              "n_requested": args.n, "m": args.m}
    print("average sharpness ...", file=sys.stderr)
    results["average"] = {**sharpness(model, m_batches(args.n_average, "--n_average"), args.rho, "average", args.seed),
                          "n_requested": args.n_average, "m": args.m}
    print("asymmetry factor ...", file=sys.stderr)
    bn = train_batches if has_batchnorm(model) else None
    results["asymmetry"] = asymmetry_factor(model, train_batches, args.mu, args.directions, args.seed, bn)
    print("top Hessian eigenvalue ...", file=sys.stderr)
    results["hessian"] = top_hessian_eigenvalue(model, train_batches, args.hessian_iterations, seed=args.seed)
    return results
