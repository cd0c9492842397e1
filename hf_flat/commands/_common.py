"""What the `hf-flat` analysis commands share: the help layout, the data and --weights flags, the
checks of the model folders and counts they are given, the loading of the models and data of
interpolate / plane / sharpness / connect, and the writing of results.json."""

import argparse
import json
import os

import torch

from ..data import UsageError
from ..loading import flat_state_file, has_batchnorm, load_weights, model_folder, model_name, prepare


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every flag's default (a help text that names its
    default in words, or a flag without one, shows none)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DATA_HELP = ("'digits', a local CSV/JSON file (both train and test set) or folder of train.*/test.* files, an image "
             "folder, or a datasets name")


def data_arguments(parser, data_required=True, data_help=DATA_HELP, output_help="where results.json and the plots go"):
    parser.add_argument("--data", required=data_required, default=None, help=data_help)
    parser.add_argument("--data_config", default=None, help="the datasets configuration, e.g. 'sst2' for glue (default: none)")
    parser.add_argument("--train_split", default="train", help="the split used as the training set")
    parser.add_argument("--eval_split", default="test", help="the test split ('validation' is taken if there is no test)")
    parser.add_argument("--text_column", default=None, help="the text column (default: the first column of strings)")
    parser.add_argument("--text_pair_column", default=None, help="the second text column of sentence pairs (default: none)")
    parser.add_argument("--label_column", default="label",
                        help="the label column: class ids, or strings found in the model config's label2id")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens per text (default and cap: the tokenizer's model_max_length and the model's "
                             "max_position_embeddings)")
    parser.add_argument("--batch_size", type=int, default=128, help="examples per evaluation batch")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use the first N training examples (default: all)")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use the first N test examples (default: all)")
    parser.add_argument("--output_dir", required=True, help=output_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions and batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def weights_argument(parser, two_models=False):
    """--weights: the live weights or the average a checkpoint keeps (one value per model, or one for both)."""
    help = ("'live': the weights as saved; 'averaged': the SWA / EMA / LAWA / WASAM average in a checkpoint's "
            "hf_flat_state.safetensors" + ("; one value for both models, or one for A and one for B" if two_models else ""))
    parser.add_argument("--weights", choices=("live", "averaged"), default="live", nargs="+" if two_models else None,
                        help=help)


def weights_per_model(paths, weights) -> list[str]:
    """--weights as one value per model (one value given: for all), each model folder checked, and
    each 'averaged' one checked for the flat state file that holds its average."""
    weights = weights if isinstance(weights, list) else [weights]
    if len(weights) not in (1, len(paths)):
        raise UsageError(f"--weights {' '.join(weights)}: give one value for all models, or one per model ({len(paths)}).")
    weights = weights * len(paths) if len(weights) == 1 else weights
    for path, which in zip(paths, weights):
        model_folder(path)
        if which == "averaged":
            flat_state_file(path)
    return weights


def check_counts(args):
    """Refuse, in one line, a count that is not positive (and connect's and report's own bounds)."""
    counts = [("--batch_size", args.batch_size), ("--max_train_samples", args.max_train_samples),
              ("--max_eval_samples", args.max_eval_samples)]
    if args.command in ("sharpness", "report"):
        counts += [("--m", args.m), ("--n", args.n), ("--n_average", args.n_average),
                   ("--directions", args.directions), ("--hessian_iterations", args.hessian_iterations)]
    if args.command == "connect":
        counts += [("--train_batch_size", args.train_batch_size)]
    for option, value in counts:
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: give a positive number.")
    if args.command in ("connect", "report") and args.points < 2:
        raise UsageError(f"--points {args.points}: give at least 2 (t = 0 and t = 1).")
    if args.command == "connect" and not (args.epochs > 0 and args.learning_rate > 0 and args.weight_decay >= 0):
        raise UsageError(f"--epochs {args.epochs}, --learning_rate {args.learning_rate}, --weight_decay "
                         f"{args.weight_decay}: epochs and learning rate must be positive, weight decay at least 0.")


def check_models(args, paths) -> list[str]:
    """--weights of interpolate / plane / sharpness / connect as one value per model (one value
    given: for all), each model folder checked, and each 'averaged' one checked for the flat state
    file that holds its average; then `check_counts`."""
    weights = args.weights if isinstance(args.weights, list) else [args.weights]
    if len(weights) > len(paths):
        raise UsageError(f"--weights {' '.join(weights)}: give one value, or one per model ({len(paths)}).")
    weights = (weights * len(paths))[: len(paths)]
    for path, which in zip(paths, weights):
        model_folder(path)
        if which == "averaged":
            flat_state_file(path)
    check_counts(args)
    return weights


def load_models(args, paths, weights, need_eval=True):
    """(data, models, names, results) of interpolate / plane / sharpness / connect: the output
    folder made, the seed set, the --data prepared (`prepare`, with the first model's processor)
    and each model loaded with its --weights (an average with BatchNorm: its statistics recomputed
    on the training data); `results` is results.json's start."""
    from ..averaging import recompute_batchnorm

    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    data = prepare(args, paths[0], need_eval=need_eval)
    train_batches = data["train"][1]
    models, names = [], []
    results = {"command": args.command, "arguments": vars(args), "max_length": data["max_length"], "weights": {}}
    for path, which in zip(paths, weights):
        model, results["weights"][path] = load_weights(path, args.device, which)
        if which == "averaged" and has_batchnorm(model):
            recompute_batchnorm(model, train_batches)
        models.append(model)
        names.append(model_name(path, which))
        print(f"weights of {path}: {results['weights'][path]}")
    return data, models, names, results


def finish(output_dir, results, notes, summary, wrote="wrote ") -> dict:
    """Print the notes and the summary, write `results` (with the notes) to results.json."""
    results["notes"] = notes
    for line in [f"note: {note}" for note in notes] + summary:
        print(line)
    path = os.path.join(output_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{wrote}{path}")
    return results


def _f(x):
    return f"{x:.4g}"
