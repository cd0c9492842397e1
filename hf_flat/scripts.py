"""What the example scripts share: argument parsing, the held-out split, and writing results."""

import sys

from transformers import HfArgumentParser


def parse_script_args(dataclass_types, defaults, argv=None):
    """`HfArgumentParser` over `dataclass_types` with `defaults`. A single ``.json`` argument is read
    as a config file; its extra keys (such as ``_source`` notes) are ignored."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0], allow_extra_keys=True)
    return parser.parse_args_into_dataclasses(argv)


def split_and_limit(train, evaluation, data_args, seed):
    """`--holdout_fraction`: evaluate on a held-out share of `train` instead of `evaluation`;
    then `--max_train_samples` / `--max_eval_samples` (datasets.Dataset splits)."""
    if data_args.holdout_fraction:
        split = train.train_test_split(test_size=data_args.holdout_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples and evaluation is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def save_results(trainer, metrics):
    """The Trainer's usual `all_results.json` and `eval_results.json` (what `hf-flat compare`
    reads), and the model."""
    trainer.save_metrics("all", metrics)
    trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
    trainer.save_model()
