"""What the example scripts share: argument parsing (flags, a JSON config, or both), the held-out
split, resuming, training and evaluating, writing results, and one-line errors for user mistakes."""

import json
import logging
import os
import sys
from contextlib import contextmanager

from transformers import HfArgumentParser, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .args import FLAT_SETTINGS

logger = logging.getLogger(__name__)

class ScriptError(ValueError):
    """A mistake in a script's arguments or data, shown by `run` as one line without a traceback."""


def parse_script_args(dataclass_types, defaults, argv=None):
    """`HfArgumentParser` over `dataclass_types`. Values come from, lowest first: the dataclass
    fields, the script's `defaults`, a JSON config given as the first argument, and the flags
    after it (``run_vit.py cfg.json --num_train_epochs 1``). Config keys starting with ``_`` (such
    as ``_source`` notes) are ignored; any other key must be one of the script's flags.
    `resume_from_checkpoint` is resolved here (`checkpoint_to_resume`), before any data is read."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    if argv and argv[0].endswith(".json"):
        parser.set_defaults(**read_config(argv.pop(0), parser))
    parsed = parser.parse_args_into_dataclasses(argv)
    for args in parsed:
        if isinstance(args, TrainingArguments):
            args.resume_from_checkpoint = checkpoint_to_resume(args)
        check_local_model(getattr(args, "model_name_or_path", None))
    return parsed


def check_local_model(name):
    """Refuse a `--model_name_or_path` that is written as a local path (``./m``, ``/m``, ``~/m``,
    ``a/b/c``) but does not exist, instead of the Hub's "Repo id must be in the form" error."""
    if name is None or os.path.exists(os.path.expanduser(name)):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise ScriptError(f"model_name_or_path={name!r}: no such folder; give a saved model's folder "
                          "(save_pretrained output or a checkpoint) or a Hub model name")


def read_config(path, parser):
    """The settings in the JSON config `path`, checked against `parser`'s flags."""
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ScriptError(f"config file {path!r} does not exist: give the path of a JSON config") from None
    except json.JSONDecodeError as error:
        raise ScriptError(f"config file {path!r} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ScriptError(f"config file {path!r} must hold a JSON object of flag names and values")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ScriptError(f"config file {path!r}: unknown key(s) {', '.join(unknown)}; use the script's flag "
                          "names without '--' (see --help), or start a note's key with '_'")
    return config


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


def check_evaluation_data(evaluation, training_args, how):
    """Refuse `eval_strategy` != 'no' without evaluation data; `how` says how to give some."""
    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if evaluation is None and strategy != "no":
        raise ScriptError(f"eval_strategy={strategy!r} but there is no evaluation data: "
                          f"give {how}, or pass --eval_strategy no to train without evaluation")


def checkpoint_to_resume(args):
    """The checkpoint `train()` resumes from, chosen as Hugging Face's transformers 5 example scripts do:

    - ``--resume_from_checkpoint PATH``: that checkpoint folder, which must exist;
    - ``--resume_from_checkpoint true``: the last ``checkpoint-N`` folder in ``--output_dir``;
    - neither, and ``--output_dir`` already holds ``checkpoint-N`` folders: the last of them (logged);
      to train from scratch instead, use another ``--output_dir`` or delete those folders;
    - otherwise None: training starts from scratch.
    """
    value = args.resume_from_checkpoint
    if value is None:
        last = _last_checkpoint(args.output_dir)
        if last is not None:
            logger.warning(f"output_dir {args.output_dir!r} already holds checkpoints: resuming from {last}. To "
                           "train from scratch, use another --output_dir or delete its checkpoint-* folders.")
        return last
    if str(value).lower() == "true":
        last = _last_checkpoint(args.output_dir)
        if last is None:
            raise ScriptError(f"resume_from_checkpoint=true but output_dir {args.output_dir!r} holds no checkpoint-N "
                              "folder: give the checkpoint's path, or train without --resume_from_checkpoint")
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ScriptError(f"resume_from_checkpoint={value!r} is not a checkpoint folder (no trainer_state.json there): "
                          "give a checkpoint-N folder the Trainer wrote, or 'true' for the last one in --output_dir")
    return value


def _checkpoint_step(checkpoint) -> int | None:
    """The optimizer step a checkpoint folder was written at (its ``trainer_state.json``)."""
    try:
        return TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
    except (OSError, ValueError, TypeError):
        return None


def _last_checkpoint(output_dir):
    return get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None


class _Recorder(logging.Handler):
    """Keeps each message; also prints it when no other handler would (Python's last resort)."""

    def __init__(self, messages, show):
        super().__init__(logging.WARNING)
        self.messages, self.show = messages, show

    def emit(self, record):
        self.messages.append(record.getMessage())
        if self.show and logging.lastResort is not None:
            logging.lastResort.handle(record)


@contextmanager
def recorded_warnings():
    """The list of the messages `hf_flat` logs at WARNING level or above while the block runs
    (they are still shown as usual)."""
    messages = []
    flat_logger = logging.getLogger("hf_flat")
    handler = _Recorder(messages, show=not flat_logger.hasHandlers())
    level = flat_logger.level
    flat_logger.setLevel(min(flat_logger.getEffectiveLevel(), logging.WARNING))
    flat_logger.addHandler(handler)
    try:
        yield messages
    finally:
        flat_logger.removeHandler(handler)
        flat_logger.setLevel(level)


def train_and_evaluate(trainer):
    """Train, resuming from `args.resume_from_checkpoint` (as `parse_script_args` resolved it), then
    evaluate if there is evaluation data. Returns the metrics and the warnings hf_flat logged during
    training."""
    resume = trainer.args.resume_from_checkpoint
    start = _checkpoint_step(resume) if resume else None
    with recorded_warnings() as warnings:
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if start is not None and trainer.state.global_step == start:  # before anything is saved over the run's results
        raise ScriptError(
            f"nothing to train: {resume} is already the end of this run (step {start} of "
            f"{trainer.state.max_steps}), so the finished run's model and results in {trainer.args.output_dir!r} are "
            "kept as they were. To train again, use another --output_dir (or delete its checkpoint-N folders); to "
            "train longer, raise --num_train_epochs or --max_steps."
        )
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics, warnings


def flat_record(args, warnings=()):
    """`flat_method`, `flat_settings` (the arguments that apply to that method) and `flat_warnings`."""
    parts = [p for p in (args.flat_perturbation, args.flat_averaging) if p]
    settings = {name: getattr(args, name) for part in parts for name in FLAT_SETTINGS[part]}
    return {"flat_method": str(args.flat_method), "flat_settings": settings, "flat_warnings": list(warnings)}


def save_results(trainer, metrics, warnings=()):
    """The model (with its tokenizer / image processor), and the Trainer's usual `all_results.json`
    (`metrics` plus `flat_record`) and `eval_results.json` (when there are eval metrics): what
    `hf-flat compare` reads."""
    trainer.save_model()
    trainer.save_metrics("all", {**metrics, **flat_record(trainer.args, warnings)})
    evaluation = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    if evaluation:
        trainer.save_metrics("eval", evaluation)


def run(main):
    """Run a script's `main()`, showing a user mistake (`ValueError`, a missing file) as one line on
    stderr with exit status 2. Set ``HF_FLAT_TRACEBACK=1`` to see the traceback instead."""
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("HF_FLAT_TRACEBACK"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)
