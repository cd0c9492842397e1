"""`hf-flat`: loss-surface analysis of saved models from the command line.

    hf-flat interpolate MODEL_A MODEL_B --data digits --output_dir out/interp
    hf-flat plane MODEL --data glue --data_config sst2 --eval_split validation --output_dir out/plane
    hf-flat sharpness MODEL --data my_data.csv --rho 0.05 --m 128 --n 4 --output_dir out/sharp
    hf-flat connect MODEL_A MODEL_B --data digits --curve bezier --output_dir out/connect
    hf-flat report MODEL_1 MODEL_2 [...] --data digits [--curves out/connect] --output_dir out/report
    hf-flat soup MODEL_1 MODEL_2 MODEL_3 [--greedy --data my_data --metric accuracy] --output_dir out/soup
    hf-flat compare --script examples/vit/run_vit.py --methods none sam ... (see `hf-flat compare -h`)

MODEL is a `save_pretrained` folder or a Trainer checkpoint (with `--weights averaged`, the SWA /
EMA / LAWA / WASAM average a checkpoint holds; LAWA's: the mean of its window), or the output folder
or a checkpoint of a PEFT (LoRA) run: the adapter is loaded over the base model its
adapter_config.json names (a local folder, or a Hub model already in the cache: nothing is
downloaded) and merged into it. --data is `digits` (built in), a local CSV / JSON file
(used as both the train and the test set) or folder (train.csv, test.csv), an image folder, or a
`datasets` name; text and images are processed with the model folder's own tokenizer / image
processor. Every number goes to `<output_dir>/results.json`, the plots to PNG files beside it;
`soup` also saves the averaged model there (a save_pretrained folder with the first model's
tokenizer / image processor).
"""

import argparse
import json
import os
import sys

import torch
from tqdm.auto import tqdm

from .data import UsageError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every flag's default (a help text that names its
    default in words, or a flag without one, shows none)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def model_folder(path):
    """Refuse, in one line, a MODEL that is no saved model folder (a save_pretrained folder, a Trainer
    checkpoint, or a PEFT adapter folder, whose adapter_config.json names its base model)."""
    from .data import ADAPTER_CONFIG, adapter_base

    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such model folder; pass a folder written by save_pretrained or a Trainer "
                         "checkpoint (OUTPUT_DIR/checkpoint-N).")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        adapter_base(path)  # (a base that cannot be loaded is refused here, before any work)
    elif not os.path.isfile(os.path.join(path, "config.json")):
        checkpoints = sorted((n for n in os.listdir(path) if n.startswith("checkpoint-")),
                             key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)
        hint = f"; its checkpoints: {', '.join(checkpoints)}" if checkpoints else ""
        raise UsageError(f"{path} has no config.json (nor {ADAPTER_CONFIG} of a PEFT adapter), so it holds no saved "
                         f"model: pass a save_pretrained folder or a checkpoint-N folder{hint}.")
    return path


#: A PEFT adapter's ``task_type`` -> the transformers class it was trained on, over its base model.
ADAPTER_TASK_MODELS = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _load_transformers_model(path, task=None, num_labels=None):
    """The transformers model saved in `path` (a folder, or a Hub name in the cache): of the
    architecture its config.json names, or with the head of a PEFT adapter's `task` (``SEQ_CLS``,
    ...; with `num_labels` classes when given: a head the adapter itself holds)."""
    from transformers import AutoConfig
    import transformers

    from .data import from_pretrained_kwargs

    offline = from_pretrained_kwargs(path)
    if task in ADAPTER_TASK_MODELS:
        extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
        return getattr(transformers, ADAPTER_TASK_MODELS[task]).from_pretrained(path, **offline, **extra)
    config = AutoConfig.from_pretrained(path, **offline)
    architecture = (config.architectures or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise UsageError(f"{path}: config.json names no transformers architecture ({config.architectures!r}).")
    return getattr(transformers, architecture).from_pretrained(path, **offline)


def load_weights(path, device, weights="live"):
    """(model, description): the model saved in `path` with its live weights, or with the average its
    checkpoint keeps (`weights="averaged"`, `load_average`), in eval mode on `device`.

    A PEFT adapter folder (a LoRA run's output folder or checkpoint) is loaded over its base model
    (`adapter_base`: a local folder, or a Hub model in the cache) with `peft.PeftModel.from_pretrained`,
    its average (which holds the adapter's trainable weights, by their PEFT names) copied in, and
    merged into the base (`merge_and_unload`): the commands then see a plain transformers model whose
    every weight is analysed, as for a model saved whole."""
    from .data import adapter_base, adapter_task

    base = adapter_base(model_folder(path))
    if base is None:
        model = _load_transformers_model(path)
        described = load_average(model, path) if weights == "averaged" else "live (as saved)"
        return model.to(device).eval(), described
    from peft import PeftModel

    # the model the adapter was trained on: the base with its task's head (get_peft_model(AutoModelFor...(base)))
    model = PeftModel.from_pretrained(_load_transformers_model(base, *adapter_task(path)), path)
    described = load_average(model, path) if weights == "averaged" else "live (as saved)"
    try:
        merged = model.merge_and_unload()
    except (AttributeError, ValueError, TypeError) as error:
        raise UsageError(f"{path}: its {model.peft_config[model.active_adapter].peft_type} adapter cannot be merged "
                         f"into its base model ({error}); the commands analyse the merged weights, so they take "
                         "adapters that merge (LoRA and its variants).") from None
    merged.requires_grad_(True)  # as a model saved whole: every weight is analysed
    return merged.to(device).eval(), f"{described}; a PEFT adapter merged into its base model {base}"


def load_model(path, device):
    """The model saved in `path` with its live weights (a PEFT adapter: merged into its base model)."""
    return load_weights(path, device)[0]


def flat_state_file(path) -> str:
    """The checkpoint's hf_flat_state.safetensors (or, from `WeightAveraging` used as a callback on its
    own, hf_flat_averaging.safetensors), which --weights averaged reads."""
    from .averaging import AVERAGING_STATE_NAME
    from .trainer import FLAT_STATE_NAME

    for name in (FLAT_STATE_NAME, AVERAGING_STATE_NAME):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    raise UsageError(f"{path} has no {FLAT_STATE_NAME} (nor {AVERAGING_STATE_NAME}): --weights averaged needs a "
                     "Trainer checkpoint of an averaging run (swa, ema, lawa, wasam, ...); the final model such a run "
                     "saves already holds the average, so use --weights live for it.")


def load_average(model, path) -> str:
    """Copy the averaged weights that the checkpoint `path` keeps in its flat state file into `model`;
    return a description. The file is read as the trainer reads it on resume
    (`WeightAveraging.load_state_dict`, one file or an FSDP run's shard files), and the value put
    into each parameter is `WeightAveraging.value`: the SWA mean or the EMA, and for LAWA the mean of
    the window of the latest snapshots (``averaging.<slot>.<name>``), exactly what the trainer puts
    into the model at the end of training."""
    from .args import AVERAGING_METHODS
    from .averaging import WeightAveraging
    from .state_file import load_flat_state, shape_in_state

    file = flat_state_file(path)
    tensors, meta = load_flat_state(file)
    method = meta.get("averaging")
    keys = [k for k in tensors if k.startswith("averaging.")]
    if method is None or not keys:
        raise UsageError(f"{file} holds no averaged weights (flat_method={meta.get('flat_method')!r}: no averaging, "
                         "or no snapshot taken yet); use --weights live.")
    if method not in AVERAGING_METHODS:
        raise UsageError(f"{file} holds averaging={method!r}, which this hf-flat does not know (it reads "
                         f"{', '.join(AVERAGING_METHODS)}): use the hf-flat version that wrote it, or --weights live.")
    slots = int(meta["averaging_window"]) if "averaging_window" in meta else None
    if "averaging_names" in meta:
        names = json.loads(meta["averaging_names"])
    else:  # a file written without the list: the names from the keys
        names = sorted({k.split(".", 2)[-1] if slots is not None else k[len("averaging."):] for k in keys})
    if slots == 0 or not names:
        raise UsageError(f"{file} holds no averaged weights yet (no snapshot taken); use --weights live.")
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise UsageError(f"{file}: the average holds parameter {unknown[0]}, which the model in {path} lacks "
                         f"({len(unknown)} such); --weights averaged needs the checkpoint of the model that was trained.")
    for name in names:
        key = f"averaging.{name}" if slots is None else f"averaging.0.{name}"
        if key not in tensors:
            raise UsageError(f"{file} lists {name} among the averaged weights but holds no {key}: the file is "
                             "incomplete; use another checkpoint.")
        if tuple(shape_in_state(tensors, key)) != tuple(params[name].shape):
            raise UsageError(f"{file}: the averaged {name} has shape {tuple(shape_in_state(tensors, key))} but the "
                             f"model in {path} has {tuple(params[name].shape)}.")
    averaging = WeightAveraging(method, k=max(1, slots or 1), on_cpu=True)
    averaging.restore(params, tensors, {**meta, "averaging_names": json.dumps(names),
                                        "averaging_count": meta.get("averaging_count", "0")})
    with torch.no_grad():
        for name in averaging.names():
            params[name].copy_(averaging.value(name).to(params[name].device, params[name].dtype))
    count = meta.get("averaging_count", "?")
    if slots is not None:
        return f"averaged (lawa, the mean of its window of the latest {slots} of {count} snapshots, from {file})"
    return f"averaged ({method}, {count} snapshots/updates, from {file})"


def model_name(path, weights="live") -> str:
    """A short name for plots and summaries: the folder, with its parent for a checkpoint."""
    parts = os.path.normpath(path).split(os.sep)
    name = os.sep.join(parts[-2:]) if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]
    return f"{name} (averaged weights)" if weights == "averaged" else name


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


def sharpness_arguments(parser):
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness perturbation")
    parser.add_argument("--m", type=int, default=128, help="batch size of the m-sharpness")
    parser.add_argument("--n", type=int, default=4, help="batches of the adversarial sharpness")
    parser.add_argument("--n_average", type=int, default=15, help="batches of the average (random-direction) sharpness")
    parser.add_argument("--mu", type=float, default=1.0, help="distance of the asymmetry factor")
    parser.add_argument("--directions", type=int, default=30, help="random directions of the asymmetry factor")
    parser.add_argument("--hessian_iterations", type=int, default=20, help="power iterations for the Hessian eigenvalue")


#: --metric of `hf-flat soup`, as `evaluate` reports them: accuracy (higher is better), loss (lower is better).
SOUP_METRICS = ("accuracy", "loss")


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-flat", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("interpolate", help="loss and metric along (1 - alpha) A + alpha B", formatter_class=HelpFormatter)
    p.add_argument("model_a", help="model A (alpha 0): a save_pretrained folder or checkpoint")
    p.add_argument("model_b", help="model B (alpha 1)")
    p.add_argument("--alpha_min", type=float, default=-1.0, help="first alpha")
    p.add_argument("--alpha_max", type=float, default=1.5, help="last alpha")
    p.add_argument("--points", type=int, default=26, help="evenly spaced alphas (26 puts 0 and 1 on the grid)")
    weights_argument(p, two_models=True)
    data_arguments(p)

    p = commands.add_parser("plane", help="loss and metric on a 2-D plane of filter-normalised directions",
                            formatter_class=HelpFormatter)
    p.add_argument("model", help="a save_pretrained folder or checkpoint")
    p.add_argument("--steps", type=int, default=21, help="grid points per axis (odd: the model itself is a grid point)")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span]^2")
    p.add_argument("--plot3d", action="store_true",
                   help="also draw each plot as a 3-D surface (plane_<set>_<quantity>_3d.png) next to the contour plot")
    weights_argument(p)
    data_arguments(p)

    p = commands.add_parser("sharpness", help="m-sharpness, asymmetry factor and top Hessian eigenvalue",
                            formatter_class=HelpFormatter)
    p.add_argument("model", help="a save_pretrained folder or checkpoint")
    sharpness_arguments(p)
    weights_argument(p)
    data_arguments(p)

    p = commands.add_parser("connect", help="fit a low-loss curve between two models (mode connectivity)",
                            formatter_class=HelpFormatter,
                            description="Mode connectivity (Garipov et al., NeurIPS 2018, arXiv 1802.10026): trains "
                            "the bend of a polygonal chain or quadratic Bezier curve from model A to model B with the "
                            "Hugging Face Trainer, on the training loss averaged over t ~ U(0, 1) along the curve, "
                            "then evaluates train and test loss and accuracy along it (BatchNorm recomputed at each "
                            "point) beside the straight line. Writes connect.png, results.json and the bend "
                            "(bend.safetensors).")
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

    p = commands.add_parser("report", help="one table comparing models: test metrics, sharpness, asymmetry, "
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

    p = commands.add_parser("soup", help="average fine-tuned models of one architecture into one: the uniform or "
                            "greedy model soup", formatter_class=HelpFormatter,
                            description="Model soups (Wortsman et al., ICML 2022, arXiv 2203.05482): the uniform soup "
                            "averages every model; --greedy adds the models best first and keeps each only if the "
                            "soup's held-out score does not get worse. BatchNorm statistics are recomputed on the "
                            "training data. The soup is saved to --output_dir as a save_pretrained folder.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="two or more save_pretrained folders or checkpoints of one architecture and size")
    p.add_argument("--greedy", action="store_true",
                   help="the greedy soup (Recipe 1): needs --data; the models are ranked, and each addition tested, "
                        "on the --eval_split")
    p.add_argument("--metric", choices=SOUP_METRICS, default=None,
                   help="with --greedy: the score that ranks the models and decides the additions, on the "
                        "--eval_split: accuracy (higher is better) or loss (lower is better); default: accuracy")
    p.add_argument("--weights", choices=("live", "averaged"), default="live", nargs="+",
                   help="'live': the weights as saved; 'averaged': the SWA / EMA / LAWA / WASAM average in a checkpoint's "
                        "hf_flat_state.safetensors; one value for all models, or one per model")
    data_arguments(p, data_required=False,
                   data_help=DATA_HELP + ". Optional for a uniform soup of models without BatchNorm; the models and "
                   "the soup are scored on its --eval_split, and BatchNorm statistics recomputed on its --train_split",
                   output_help="where the soup (a save_pretrained folder) and results.json go")

    p = commands.add_parser("compare", help="train and compare flat-minima methods with an example script "
                            "(see `hf-flat compare -h`)", add_help=False)
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="the arguments of `hf-flat compare`")
    return parser


def prepare(args, model_dir, need_eval=True):
    """{"train": (dataset, batches), "eval": ..., "notes": [...], "max_length": int | None} for the
    command's --data, processed with `model_dir`'s tokenizer or image processor."""
    from .data import batches, load_splits, max_length_for, preprocess

    splits = load_splits(args.data, args.data_config, args.train_split, args.eval_split)
    prepared = {"notes": [splits["note"]] if splits.get("note") and need_eval else [], "max_length": None}
    for name, limit in (("train", args.max_train_samples), ("eval", args.max_eval_samples)):
        if name == "eval" and not need_eval:
            continue
        if splits.get(name) is None:
            wanted = args.train_split if name == "train" else f"{args.eval_split}' or 'validation"
            found = ", ".join(splits.get("splits") or []) or "none"
            raise UsageError(f"--data {args.data}: no '{wanted}' split (found: {found}); name one with "
                             f"--{'train' if name == 'train' else 'eval'}_split, or add the file.")
        dataset = splits[name]
        if prepared["max_length"] is None and "image" not in dataset.column_names and "pixel_values" not in dataset.column_names:
            prepared["max_length"], note = max_length_for(model_dir, args.max_length)
            prepared["notes"] += [note] if note else []
        dataset = preprocess(dataset, model_dir, args.text_column, args.text_pair_column, args.label_column,
                             prepared["max_length"])
        if len(dataset) == 0:
            raise UsageError(f"--data {args.data}: the {name} split is empty.")
        prepared[name] = (dataset, batches(dataset, args.batch_size, args.device, limit))
    return prepared


def has_batchnorm(model):
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def main(argv=None) -> int:
    """Console entry point: `hf-flat compare ...` or an analysis command (results in the output
    folder). Mistakes in the arguments or data end with a one-line message and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from .compare import main as compare

        return compare(argv[1:])
    try:
        run(argv)
    except UsageError as error:
        print(f"hf-flat {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # from the libraries, e.g. a model folder that does not load
        print(f"hf-flat {argv[0]}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


def _f(x):
    return f"{x:.4g}"


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


def named_scores(result) -> dict:
    """`evaluate`'s result with the metric called by its name: {"loss": ..., "accuracy": ...}."""
    return {"loss": result["loss"], **({"accuracy": result["metric"]} if "metric" in result else {})}


def save_processors(source, output_dir) -> list[str]:
    """Save `source`'s tokenizer (when it has tokenizer files) and copy its preprocessor_config.json
    (image processor / feature extractor) into `output_dir`, where `prepare` and users look for them;
    return what was saved. For a PEFT adapter folder without them: its base model's."""
    import shutil

    from .data import adapter_base, from_pretrained_kwargs, processor_files

    saved = []
    try:
        tokenizer = processor_files(source, "tokenizer")
    except UsageError:  # no tokenizer (an image model)
        tokenizer = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer, **from_pretrained_kwargs(tokenizer)).save_pretrained(output_dir)
        saved.append("tokenizer")
    folders = [source] + [base for base in [adapter_base(source)] if base is not None and os.path.isdir(base)]
    for name in ("preprocessor_config.json", "processor_config.json"):
        found = next((os.path.join(f, name) for f in folders if os.path.isfile(os.path.join(f, name))), None)
        if found is not None:
            shutil.copyfile(found, os.path.join(output_dir, name))
            saved.append(name)
    return saved


def run_soup(args) -> dict:
    """`hf-flat soup`: the uniform or greedy soup of the models (`hf_flat.analysis.soups`), saved to
    --output_dir with results.json: each model's and the soup's scores (with --data), the
    ingredients and, for --greedy, every step."""
    from .analysis import check_soup_compatible, evaluate, greedy_soup, uniform_soup
    from .analysis.soups import SoupMismatchError
    from .averaging import recompute_batchnorm

    paths = args.models
    if len(paths) < 2:
        raise UsageError(f"one model given ({paths[0]}): a soup averages two or more models.")
    weights = weights_per_model(paths, args.weights)
    if args.greedy and args.data is None:
        raise UsageError("--greedy ranks the models and tests each addition on held-out data: pass --data "
                         "(its --eval_split scores them).")
    if args.metric is not None and not args.greedy:
        raise UsageError(f"--metric {args.metric} ranks the models for --greedy; a uniform soup averages them all "
                         "(with --data, results.json holds every model's loss and accuracy): add --greedy or drop --metric.")
    for option, value in (("--batch_size", args.batch_size), ("--max_train_samples", args.max_train_samples),
                          ("--max_eval_samples", args.max_eval_samples)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: give a positive number.")
    output = os.path.abspath(args.output_dir)
    if any(os.path.abspath(path) == output for path in paths):
        raise UsageError(f"--output_dir {args.output_dir} is one of the models: write the soup to another folder.")
    metric = args.metric or "accuracy"
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    data = prepare(args, paths[0]) if args.data is not None else None
    train_batches = data["train"][1] if data else None
    notes = data["notes"] if data else []

    work, first = load_weights(paths[0], args.device, weights[0])  # the soup is made in (and saved from) the first model
    if has_batchnorm(work) and data is None:
        raise UsageError(f"{paths[0]} has BatchNorm layers, whose running statistics are recomputed for the soup's "
                         "weights: pass --data (its --train_split is used).")
    states, described = [], {}
    for i, (path, which) in enumerate(zip(paths, weights)):
        model, described[path] = (work, first) if i == 0 else load_weights(path, args.device, which)
        if which == "averaged" and has_batchnorm(model) and train_batches is not None:
            recompute_batchnorm(model, train_batches)  # (no data: refused above, or a mismatch refused below)
        states.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        del model
        print(f"weights of {path}: {described[path]}")
    try:
        check_soup_compatible(states, names=paths)
    except SoupMismatchError as error:
        raise UsageError(f"these models do not make a soup: {error}") from None

    def score(model):
        """The model's loss and accuracy on the --eval_split."""
        result = named_scores(evaluate(model, data["eval"][1]))
        if args.greedy and metric not in result:
            raise UsageError(f"--metric {metric}: {paths[0]} gives no class logits to score (a regression head?); "
                             "use --metric loss.")
        return result

    results = {"command": "soup", "arguments": vars(args), "recipe": "greedy" if args.greedy else "uniform",
               "models": paths, "weights": described, "output_model": args.output_dir}
    if data is not None:
        results.update(eval_split=args.eval_split, max_length=data["max_length"])
    if args.greedy:
        results.update(metric=metric, higher_is_better=metric != "loss")
    summary = []
    if args.greedy:
        soup, record = greedy_soup(states, score, higher_is_better=metric != "loss", model=work,
                                   batchnorm_batches=train_batches, names=paths, key=metric)
        results["candidates"] = [{"model": c["name"], **c["result"]} for c in record["candidates"]]
        results["greedy"] = {"order": record["order"],
                             "steps": [{k: v for k, v in step.items() if k != "soup_result"}
                                       | {"soup": step.get("soup_result")} for step in record["steps"]]}
        results["ingredients"] = record["ingredients"]
        results["soup"] = record["result"]
        uniform_soup(states, model=work, batchnorm_batches=train_batches, names=paths)
        results["uniform_soup"] = score(work)  # for comparison; the greedy soup is what is saved
        work.load_state_dict(soup)
        notes.append(f"the greedy soup chose its ingredients by their {metric} on the '{args.eval_split}' split, so "
                     "its score there is optimistic; with a validation split, pass --eval_split validation and "
                     "measure the soup on the test split afterwards")
        summary += [f"greedy: {step['candidate']}: {step['decision']}" for step in record["steps"]]
    else:
        if data is not None:
            candidates = []
            for path, state in zip(paths, states):
                work.load_state_dict(state)
                candidates.append({"model": path, **score(work)})
            results["candidates"] = candidates
        uniform_soup(states, model=work, batchnorm_batches=train_batches, names=paths)
        results["ingredients"] = list(paths)
        if data is not None:
            results["soup"] = score(work)
    summary = [f"{c['model']}: " + ", ".join(f"{k} {_f(v)}" for k, v in c.items() if k != "model")
               for c in results.get("candidates", [])] + summary
    summary.append(f"{results['recipe']} soup of {len(results['ingredients'])} of {len(paths)} models"
                   + (": " + ", ".join(f"{k} {_f(v)}" for k, v in results["soup"].items()) if "soup" in results else ""))
    if "uniform_soup" in results:
        summary.append("uniform soup of all, for comparison: "
                       + ", ".join(f"{k} {_f(v)}" for k, v in results["uniform_soup"].items()))

    work.save_pretrained(args.output_dir)
    results["saved_processors"] = save_processors(paths[0], args.output_dir)
    return finish(args.output_dir, results, notes, summary, "wrote the soup and ")


def run_connect(args, models, names, data, results, notes) -> list[str]:
    """`hf-flat connect`: fit the curve, evaluate it and the straight line, plot, save the bend."""
    from safetensors.torch import save_file
    from transformers import TrainingArguments, default_data_collator

    from .analysis.connect import connect
    from .analysis.plots import plot_connect

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


def sharpness_measures(args, model, data, notes) -> dict:
    """`hf-flat sharpness`'s four measures of `model` on the training split: adversarial and
    average m-sharpness, the asymmetry factor and the top Hessian eigenvalue."""
    from .analysis import asymmetry_factor, sharpness, top_hessian_eigenvalue
    from .data import batches

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


def run(argv=None) -> dict:
    """Parse `argv`, run the analysis, write results.json and the plots; return the results."""
    from .analysis import interpolate, plane
    from .analysis.plots import best_point, plot_interpolation, plot_plane, plot_plane_3d
    from .analysis.surface import grid_points
    from .averaging import recompute_batchnorm

    args = build_parser().parse_args(argv)
    if args.command == "compare":
        raise UsageError("run `hf-flat compare ...` through main(), the console entry point.")
    if args.command == "soup":
        return run_soup(args)
    if args.command == "report":
        from .report import run_report

        return run_report(args)
    paths = [args.model_a, args.model_b] if args.command in ("interpolate", "connect") else [args.model]
    weights = args.weights if isinstance(args.weights, list) else [args.weights]
    if len(weights) > len(paths):
        raise UsageError(f"--weights {' '.join(weights)}: give one value, or one per model ({len(paths)}).")
    weights = (weights * len(paths))[: len(paths)]
    for path, which in zip(paths, weights):
        model_folder(path)
        if which == "averaged":
            flat_state_file(path)
    check_counts(args)
    if args.command == "plane" and args.steps < 2:
        raise UsageError(f"--steps {args.steps}: give at least 2 grid points per axis (odd: the model is on the grid).")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    data = prepare(args, paths[0], need_eval=args.command != "sharpness")
    train_batches = data["train"][1]
    eval_sets = {"train": train_batches, "test": data["eval"][1]} if "eval" in data else {}
    models, names = [], []
    results = {"command": args.command, "arguments": vars(args), "max_length": data["max_length"], "weights": {}}
    for path, which in zip(paths, weights):
        model, results["weights"][path] = load_weights(path, args.device, which)
        if which == "averaged" and has_batchnorm(model):
            recompute_batchnorm(model, train_batches)
        models.append(model)
        names.append(model_name(path, which))
        print(f"weights of {path}: {results['weights'][path]}")
    notes = data["notes"]

    if args.command == "interpolate":
        model_a, model_b = models
        bn = train_batches if has_batchnorm(model_a) else None
        # the two models themselves are always evaluated, whatever the spacing of the other points
        alphas = sorted(set(grid_points(args.alpha_min, args.alpha_max, args.points)) | {0.0, 1.0})
        with tqdm(total=len(alphas), desc="interpolation") as bar:
            rows = interpolate(model_a, model_b, eval_sets, alphas, bn, progress=lambda i, n: bar.update(1))
        results["interpolation"] = rows
        plot_interpolation(rows, os.path.join(args.output_dir, "interpolation.png"), names=names)
        summary = interpolation_summary(rows, names)
    elif args.command == "plane":
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
    elif args.command == "connect":
        summary = run_connect(args, models, names, data, results, notes)
    else:
        (model,) = models
        measures = sharpness_measures(args, model, data, notes)
        results.update(measures)
        summary = [f"training examples: {measures['training_examples']}"]
        for key in ("adversarial", "average", "asymmetry", "hessian"):
            shown = {k: v for k, v in results[key].items() if k != "rises"}
            summary.append(f"{key}: {shown}")

    return finish(args.output_dir, results, notes, summary)


if __name__ == "__main__":
    sys.exit(main())
