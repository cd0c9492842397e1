"""`hf-flat soup MODEL_1 MODEL_2 ...`: model soups (Wortsman et al., "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022,
arXiv 2203.05482). The uniform soup averages every model; --greedy (the paper's Recipe 1) ranks the
models by their held-out score (--metric on the --eval_split of --data), best first, and adds each
only if the soup's score does not get worse. BatchNorm statistics are recomputed on the training
data; models that do not share parameter names and shapes are refused. Writes the soup to
--output_dir as a save_pretrained folder (with the first model's tokenizer / image processor) and
results.json: every model's and the soup's scores (with --data), the ingredients and, for
--greedy, every step.
"""

import os

import torch

from ..data import UsageError
from ..loading import has_batchnorm, load_weights, prepare, save_processors
from ._common import DATA_HELP, HelpFormatter, _f, data_arguments, finish, weights_per_model

#: --metric of `hf-flat soup`, as `evaluate` reports them: accuracy (higher is better), loss (lower is better).
SOUP_METRICS = ("accuracy", "loss")


def add_parser(subparsers):
    p = subparsers.add_parser("soup", help="average fine-tuned models of one architecture into one: the uniform or "
                              "greedy model soup", formatter_class=HelpFormatter,
                              description="Model soups (Wortsman et al., ICML 2022, arXiv 2203.05482): the uniform "
                              "soup averages every model; --greedy adds the models best first and keeps each only if "
                              "the soup's held-out score does not get worse. BatchNorm statistics are recomputed on "
                              "the training data. The soup is saved to --output_dir as a save_pretrained folder.")
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


def named_scores(result) -> dict:
    """`evaluate`'s result with the metric called by its name: {"loss": ..., "accuracy": ...}."""
    return {"loss": result["loss"], **({"accuracy": result["metric"]} if "metric" in result else {})}


def run(args) -> dict:
    """`hf-flat soup`: the uniform or greedy soup of the models (`hf_flat.analysis.soups`), saved to
    --output_dir with results.json: each model's and the soup's scores (with --data), the
    ingredients and, for --greedy, every step."""
    from ..analysis import check_soup_compatible, evaluate, greedy_soup, uniform_soup
    from ..analysis.soups import SoupMismatchError
    from ..averaging import recompute_batchnorm

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
