"""`hf-flat`: loss-surface analysis of saved models from the command line.

    hf-flat interpolate MODEL_A MODEL_B --data digits --output_dir out/interp
    hf-flat plane MODEL --data glue --data_config sst2 --output_dir out/plane
    hf-flat sharpness MODEL --data my_data/ --rho 0.05 --m 128 --n 4 --output_dir out/sharp
    hf-flat compare --script examples/vit/run_vit.py --methods none sam ... (see `hf-flat compare -h`)

MODEL is a `save_pretrained` folder or a Trainer checkpoint. --data is `digits` (built in), a
`datasets` name, a local CSV / JSON file or folder (train.csv, test.csv), or an image folder;
text and images are processed with the model folder's own tokenizer / image processor. Every
number goes to `<output_dir>/results.json`, the plots to PNG files beside it.
"""

import argparse
import json
import os
import sys

import torch
from tqdm.auto import tqdm


def load_model(path, device):
    from transformers import AutoConfig
    import transformers

    config = AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise ValueError(f"{path}: config.json names no transformers architecture ({config.architectures!r}).")
    return getattr(transformers, architecture).from_pretrained(path).to(device).eval()


def data_arguments(parser):
    parser.add_argument("--data", required=True, help="'digits', a datasets name, a local CSV/JSON file or folder, or an image folder")
    parser.add_argument("--data_config", default=None, help="the datasets configuration, e.g. 'sst2' for glue")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test", help="the test / validation split")
    parser.add_argument("--text_column", default=None)
    parser.add_argument("--text_pair_column", default=None)
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None, help="evaluate on the first N training examples")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-flat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("interpolate", help="loss and metric along (1 - alpha) A + alpha B")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--alpha_min", type=float, default=-1.0)
    p.add_argument("--alpha_max", type=float, default=1.5)
    p.add_argument("--points", type=int, default=26)
    data_arguments(p)

    p = commands.add_parser("plane", help="loss and metric on a 2-D plane of filter-normalised directions")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=20, help="grid points per axis")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span]^2")
    data_arguments(p)

    p = commands.add_parser("sharpness", help="m-sharpness, asymmetry factor and top Hessian eigenvalue")
    p.add_argument("model")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--m", type=int, default=128, help="batch size of the m-sharpness")
    p.add_argument("--n", type=int, default=4, help="batches for adversarial sharpness (average: --n_average)")
    p.add_argument("--n_average", type=int, default=15)
    p.add_argument("--mu", type=float, default=5.0, help="distance of the asymmetry factor")
    p.add_argument("--directions", type=int, default=30, help="random directions of the asymmetry factor")
    p.add_argument("--hessian_iterations", type=int, default=20)
    data_arguments(p)
    return parser


def prepare(args, model_dir):
    from .data import batches, load_splits, preprocess

    splits = load_splits(args.data, args.data_config, args.train_split, args.eval_split)
    prepared = {}
    for name, limit in (("train", args.max_train_samples), ("eval", args.max_eval_samples)):
        if splits.get(name) is None:
            raise ValueError(f"--data {args.data}: no '{args.train_split if name == 'train' else args.eval_split}' split.")
        dataset = preprocess(splits[name], model_dir, args.text_column, args.text_pair_column, args.label_column)
        prepared[name] = (dataset, batches(dataset, args.batch_size, args.device, limit))
    return prepared


def has_batchnorm(model):
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def main(argv=None) -> int:
    """Console entry point: `hf-flat compare ...` or an analysis command (results in the output folder)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from .compare import main as compare

        return compare(argv[1:])
    run(argv)
    return 0


def run(argv=None) -> dict:
    """Parse `argv`, run the analysis, write results.json and the plots; return the results."""
    from .analysis import asymmetry_factor, interpolate, plane, sharpness, top_hessian_eigenvalue
    from .analysis.plots import plot_interpolation, plot_plane
    from .analysis.surface import grid_points

    args = build_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    first = args.model_a if args.command == "interpolate" else args.model
    data = prepare(args, first)
    train_batches = data["train"][1]
    eval_sets = {"train": train_batches, "test": data["eval"][1]}
    results = {"command": args.command, "arguments": vars(args)}

    if args.command == "interpolate":
        model_a, model_b = load_model(args.model_a, args.device), load_model(args.model_b, args.device)
        bn = train_batches if has_batchnorm(model_a) else None
        alphas = grid_points(args.alpha_min, args.alpha_max, args.points)
        with tqdm(total=len(alphas), desc="interpolation") as bar:
            rows = interpolate(model_a, model_b, eval_sets, alphas, bn, progress=lambda i, n: bar.update(1))
        results["interpolation"] = rows
        plot_interpolation(rows, os.path.join(args.output_dir, "interpolation.png"))
    elif args.command == "plane":
        model = load_model(args.model, args.device)
        bn = train_batches if has_batchnorm(model) else None
        with tqdm(total=args.steps**2, desc="plane") as bar:
            result, _ = plane(model, eval_sets, args.steps, (-args.span, args.span), args.seed, bn,
                              progress=lambda i, n: bar.update(1))
        scored = [g for g in result["grid"] if "metric" in g["test"]]
        best = max(scored, key=lambda g: g["test"]["metric"]) if scored else None
        result["best_test_metric"] = best
        results["plane"] = result
        marker = (best["alpha"], best["beta"]) if best else None
        plot_plane(result, os.path.join(args.output_dir, "plane_test_loss.png"), "loss", "test", marker)
        if best:
            plot_plane(result, os.path.join(args.output_dir, "plane_test_metric.png"), "metric", "test", marker)
        plot_plane(result, os.path.join(args.output_dir, "plane_train_loss.png"), "loss", "train", marker)
    else:
        model = load_model(args.model, args.device)
        dataset = data["train"][0]
        from .data import batches

        def m_batches(count):
            """`count` batches of exactly m training examples (fewer if the data runs out)."""
            loader = batches(dataset.shuffle(seed=args.seed), args.m, args.device, limit=count * args.m)
            return [b for b in loader() if next(iter(b.values())).shape[0] == args.m][:count]

        print("adversarial sharpness ...", file=sys.stderr)
        results["adversarial"] = sharpness(model, m_batches(args.n), args.rho, "adversarial", args.seed)
        print("average sharpness ...", file=sys.stderr)
        results["average"] = sharpness(model, m_batches(args.n_average), args.rho, "average", args.seed)
        print("asymmetry factor ...", file=sys.stderr)
        bn = train_batches if has_batchnorm(model) else None
        results["asymmetry"] = asymmetry_factor(model, train_batches, args.mu, args.directions, args.seed, bn)
        print("top Hessian eigenvalue ...", file=sys.stderr)
        results["hessian"] = top_hessian_eigenvalue(model, train_batches, args.hessian_iterations, seed=args.seed)
        for key in ("adversarial", "average", "asymmetry", "hessian"):
            shown = {k: v for k, v in results[key].items() if k != "rises"}
            print(f"{key}: {shown}")

    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {os.path.join(args.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    sys.exit(main())
