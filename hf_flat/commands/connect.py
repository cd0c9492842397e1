"""`hf-flat connect MODEL_A MODEL_B`: mode connectivity (Garipov, Izmailov, Podoprikhin, Vetrov,
Wilson, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018, arXiv
1802.10026; Kaddour et al. 2022, arXiv 2202.00661, section 4.2). Trains the bend of a polygonal
chain with one bend (``--curve polychain``) or of a quadratic Bezier curve (``--curve bezier``) from
model A to model B with the Hugging Face Trainer, on the training loss averaged over t ~ U(0, 1)
along the curve (one t per batch; the bend starts at the midpoint, AdamW), then evaluates the
train and test loss and accuracy along the curve at --points values of t, BatchNorm recomputed at
each, beside the straight line. Writes connect.png, results.json (every point, the barriers) and
the bend (bend.safetensors), and prints the barriers; `hf-flat report --curves` reads them.
"""

import os
import sys

from tqdm.auto import tqdm

from ..loading import has_batchnorm
from ._common import HelpFormatter, _f, check_models, data_arguments, finish, load_models, weights_argument


def add_parser(subparsers):
    p = subparsers.add_parser("connect", help="fit a low-loss curve between two models (mode connectivity)",
                              formatter_class=HelpFormatter,
                              description="Mode connectivity (Garipov et al., NeurIPS 2018, arXiv 1802.10026): "
                              "trains the bend of a polygonal chain or quadratic Bezier curve from model A to model "
                              "B with the Hugging Face Trainer, on the training loss averaged over t ~ U(0, 1) along "
                              "the curve, then evaluates train and test loss and accuracy along it (BatchNorm "
                              "recomputed at each point) beside the straight line. Writes connect.png, results.json "
                              "and the bend (bend.safetensors).")
    p.add_argument("model_a", help="model A (t = 0): a save_pretrained folder or checkpoint")
    p.add_argument("model_b", help="model B (t = 1), of the same architecture and size")
    p.add_argument("--curve", choices=("polychain", "bezier"), default="polychain",
                   help="polygonal chain with one bend, or quadratic Bezier curve")
    p.add_argument("--epochs", type=float, default=10, help="epochs of the bend's training")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW's learning rate for the bend")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's weight decay for the bend")
    p.add_argument("--train_batch_size", type=int, default=32, help="training batch (one t is drawn per batch)")
    p.add_argument("--points", type=int, default=21, help="evenly spaced t in [0, 1] where both paths are evaluated")
    weights_argument(p, two_models=True)
    data_arguments(p)


def run(args) -> dict:
    """Load both models, fit and evaluate the curve (`run_connect`), write results.json; return the results."""
    paths = [args.model_a, args.model_b]
    weights = check_models(args, paths)
    data, models, names, results = load_models(args, paths, weights)
    notes = data["notes"]
    summary = run_connect(args, models, names, data, results, notes)
    return finish(args.output_dir, results, notes, summary)


def run_connect(args, models, names, data, results, notes) -> list[str]:
    """`hf-flat connect`: fit the curve, evaluate it and the straight line, plot, save the bend."""
    from safetensors.torch import save_file
    from transformers import TrainingArguments, default_data_collator

    from ..analysis.connect import connect
    from ..analysis.plots import plot_connect

    model_a, model_b = models
    eval_sets = {"train": data["train"][1], "test": data["eval"][1]}
    bn = data["train"][1] if has_batchnorm(model_a) else None
    training = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "curve_training"), num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, per_device_train_batch_size=args.train_batch_size,
        save_strategy="no", report_to="none", seed=args.seed, logging_strategy="epoch", disable_tqdm=True,
        use_cpu=args.device == "cpu")
    dataset = data["train"][0]
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    print(f"training the {args.curve} curve's bend ({args.epochs:g} epochs) ...", file=sys.stderr)
    with tqdm(total=args.points, desc="curve") as bar:
        found, curve = connect(model_a, model_b, dataset, eval_sets, training, args.curve, args.points, bn,
                               default_data_collator, progress=lambda i, n: bar.update(1))
    results.update(models=[os.path.abspath(p) for p in (args.model_a, args.model_b)], names=names, **found)
    bend = {name: m.detach().cpu().contiguous() for name, m in zip(curve.names, curve.bend)}
    save_file(bend, os.path.join(args.output_dir, "bend.safetensors"), metadata={"curve": args.curve})
    plot_connect(found, os.path.join(args.output_dir, "connect.png"), names)
    summary = [f"A = {names[0]} (t 0), B = {names[1]} (t 1), {args.curve} curve"]
    for key, value in found["barriers"].items():
        where = "" if value["at"] is None else f" at t {value['at']:g}"
        summary.append(f"  barrier {key}: {_f(value['height'])}{where}")
    return summary
