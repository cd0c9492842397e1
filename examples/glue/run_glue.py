"""Fine-tune a RoBERTa-style model on a GLUE task with any flat method, the Hugging Face way.

    python examples/glue/run_glue.py --model_name_or_path roberta-base --task_name rte --flat_method wasam
    python examples/glue/run_glue.py --model_name_or_path ./my-model --train_file train.csv \\
        --validation_file dev.csv --task_name sst2 --flat_method sam --sam_rho 0.05
    python examples/glue/run_glue.py examples/glue/configs/roberta_base_rte.json   # a JSON config
    python examples/glue/run_glue.py --model_name_or_path roberta-base --train_file my_train.csv \
        --validation_file my_dev.csv --text_column_names text --flat_method swa   # your own data

`--task_name` loads the GLUE task through `datasets` (`load_dataset("glue", task)`);
`--train_file` / `--validation_file` (CSV or JSON) work offline, on any data, as in Hugging Face's
run_glue.py: the classes are the training data's sorted labels (integers or strings; written into
the model config as label2id / id2label), float labels train a regression, and the text columns are
`--text_column_names`, else the task's, else sentence1 / sentence2, else the first text column(s).
`--max_seq_length` defaults to, and is capped by, the model's limit. `--from_scratch true` builds
the model from the folder's config (and takes its tokenizer) with new weights: the control run of
a pretraining. Metrics
are those Kaddour et al. report (NeurIPS 2022, arXiv 2202.00661, appendix B.2): Matthews
correlation for CoLA, Pearson correlation for STS-B (a regression head), accuracy for the others,
computed locally (no metric download). `--holdout_fraction f` evaluates on a held-out share of the
training data (for `hf-flat compare --grid`). `--label_noise p` replaces exactly round(p * N)
training labels by labels of other classes (`hf_flat.data.apply_label_noise`, seeded by
`--label_noise_seed`, default `--seed`; refused for STS-B and other regression targets); evaluation
and held-out labels stay clean, and `all_results.json` records the realised `label_noise_fraction`. Every `FlatTrainingArguments` flag works (`--help`);
JSON configs, resuming, training without evaluation data and `all_results.json` work as in
`examples/vit/run_vit.py` (`hf_flat.scripts`).
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_flat import FlatTrainer, FlatTrainingArguments
from hf_flat.data import LABEL_NOISE_HELP, LABEL_NOISE_SEED_HELP, apply_label_noise, check_label_noise, sequence_limit
from hf_flat.scripts import (
    ScriptError,
    check_evaluation_data,
    parse_script_args,
    run,
    save_results,
    split_and_limit,
    train_and_evaluate,
)

logger = logging.getLogger(__name__)

#: task -> its text columns (STS-B is a regression, the others classifications)
TASKS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
DEFAULTS = dict(output_dir="out/glue", report_to="none", eval_strategy="epoch", save_strategy="no",
                logging_strategy="epoch", disable_tqdm=True)


@dataclass
class DataArguments:
    task_name: str = field(default=None, metadata={
        "help": "a GLUE task (" + ", ".join(TASKS) + "): loads it through `datasets`, or with --train_file names "
                "the text columns and the metric"})
    train_file: str = field(default=None, metadata={"help": "a local CSV / JSON (lines) training file"})
    validation_file: str = field(default=None, metadata={"help": "a local CSV / JSON (lines) evaluation file"})
    text_column_names: str = field(default=None, metadata={
        "help": "the text column, or two separated by a comma for sentence pairs ('text', 'sentence1,sentence2'); "
                "default: the task's columns, else sentence1,sentence2 if present, else the first one or two "
                "text columns besides the label"})
    label_column_name: str = field(default="label", metadata={
        "help": "the label column: integers or strings are classes (the sorted list of the training data's "
                "labels, written into the model config as label2id / id2label), floats a regression target"})
    validation_split_name: str = field(default=None, metadata={"help": "default: validation (validation_matched for MNLI)"})
    max_seq_length: int = field(default=None, metadata={
        "help": "tokens per example (longer ones are truncated); default and cap: the model's limit, the smaller "
                "of the tokenizer's model_max_length and the config's max_position_embeddings"})
    holdout_fraction: float = field(default=0.0, metadata={"help": "evaluate on this held-out share of the training data"})
    label_noise: float = field(default=0.0, metadata={"help": LABEL_NOISE_HELP + "; refused for a regression target (STS-B)"})
    label_noise_seed: int = field(default=None, metadata={"help": LABEL_NOISE_SEED_HELP})
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="roberta-base", metadata={"help": "Hub name or local folder"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "replace a classification head whose number of labels differs from the data's by a new one "
                "(by default such a model is refused)"})
    from_scratch: bool = field(default=False, metadata={
        "help": "build the model from --model_name_or_path's config and tokenizer with freshly initialised "
                "weights (seeded by --seed): the control that shows what the pretrained weights buy"})


def glue_metrics(task, regression=None):
    """The paper's metric for `task`, computed locally: Matthews (CoLA), Pearson (STS-B), accuracy.
    Without a task: accuracy, or Pearson and mean squared error for a regression target."""
    regression = task == "stsb" if regression is None else regression

    def compute(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if regression:
            predictions, labels = predictions.reshape(-1), labels.reshape(-1)
            out = {"pearson": float(np.corrcoef(predictions, labels)[0, 1])}
            return out if task == "stsb" else {**out, "mse": float(((predictions - labels) ** 2).mean())}
        predicted = np.argmax(predictions, axis=-1)
        if task == "cola":
            from sklearn.metrics import matthews_corrcoef

            return {"matthews_correlation": float(matthews_corrcoef(labels, predicted)), "accuracy": float((predicted == labels).mean())}
        return {"accuracy": float((predicted == labels).mean())}

    return compute


def read_file(path, option):
    """The local CSV or JSON (lines) file `path`, given as `option`, as a `datasets.Dataset`."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise ScriptError(f"{option} {path!r} does not exist: give the path of a CSV or JSON (lines) file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".json", ".jsonl"):
        raise ScriptError(f"{option} {path!r}: give a .csv, .json or .jsonl file")
    return load_dataset("csv" if extension == ".csv" else "json", data_files=path, split="train")


def load_glue(data_args):
    """(train, evaluation or None, a description of each for messages): the local files, or the
    GLUE task through `datasets`."""
    if data_args.train_file:
        train = read_file(data_args.train_file, "--train_file")
        evaluation = read_file(data_args.validation_file, "--validation_file") if data_args.validation_file else None
        return train, evaluation, (f"--train_file {data_args.train_file!r}", f"--validation_file {data_args.validation_file!r}")
    if data_args.validation_file:
        raise ScriptError("--validation_file needs --train_file: give both local files, or --task_name alone")
    if data_args.task_name is None:
        raise ScriptError("no data: give --train_file (a CSV / JSON file) or --task_name (a GLUE task: " + ", ".join(TASKS) + ")")
    from datasets import load_dataset

    raw = load_dataset("glue", data_args.task_name)
    split = data_args.validation_split_name or ("validation_matched" if data_args.task_name == "mnli" else "validation")
    return raw["train"], raw[split], (f"GLUE {data_args.task_name} train", f"GLUE {data_args.task_name} {split}")


def _is_text(data, name):
    return getattr(data.features[name], "dtype", None) in ("string", "large_string")


def require_columns(data, names, where, how):
    """Refuse `data` (described by `where`) without the columns `names`; `how` says how to name others."""
    for name in names:
        if name not in data.column_names:
            raise ScriptError(f"column {name!r} is not in {where} (its columns: {', '.join(data.column_names)}): {how}")


def text_columns(train, data_args, where):
    """The one or two text columns, chosen as Hugging Face's run_glue.py does: --text_column_names,
    else the task's columns, else sentence1 / sentence2 if present, else the first one or two text
    columns besides the label."""
    how = "name the text column(s) with --text_column_names, e.g. --text_column_names text or sentence1,sentence2"
    if data_args.text_column_names:
        names = [name.strip() for name in data_args.text_column_names.split(",") if name.strip()]
        if not 1 <= len(names) <= 2:
            raise ScriptError(f"--text_column_names {data_args.text_column_names!r}: give one column, or two separated by a comma")
    elif data_args.task_name:
        names = list(TASKS[data_args.task_name])
        how = f"--task_name {data_args.task_name} reads these columns; {how}"
    elif {"sentence1", "sentence2"} <= set(train.column_names):
        names = ["sentence1", "sentence2"]
    else:
        texts = [c for c in train.column_names if c != data_args.label_column_name and _is_text(train, c)]
        if not texts:
            raise ScriptError(f"{where} has no text column besides the label (its columns: {', '.join(train.column_names)}): {how}")
        names = texts[:2]
        if len(texts) > 1:
            logger.warning(f"text columns: {', '.join(names)} (of the text columns {', '.join(texts)}); "
                           "set --text_column_names to choose others")
    require_columns(train, names, where, how)
    return names


def _empty_rows(data, name):
    return [i for i, value in enumerate(data[name]) if value is None or value != value]  # None or NaN


def training_labels(train, data_args, where):
    """The training data's classes as (values, names), sorted (a `datasets` ClassLabel: its ids and
    names), or None for a regression target: STS-B, or float labels without a task."""
    from datasets import ClassLabel

    name = data_args.label_column_name
    require_columns(train, [name], where, "name the label column with --label_column_name")
    feature = train.features[name]
    if isinstance(feature, ClassLabel):
        return list(range(feature.num_classes)), list(feature.names)
    empty = _empty_rows(train, name)
    if empty:
        raise ScriptError(f"{where}: column {name!r} is empty in {len(empty)} example(s), the first being example "
                          f"{empty[0] + 1}: give every training example a label, or drop those rows")
    if data_args.task_name == "stsb" or (data_args.task_name is None and str(feature.dtype).startswith("float")):
        return None
    values = sorted(set(train[name]))
    if len(values) < 2:
        raise ScriptError(f"{where}: column {name!r} holds a single label ({values[0]!r}); a classifier needs two "
                          "or more (float labels train a regression)")
    return values, [str(value) for value in values]


def check_evaluation_labels(evaluation, labels, data_args, where):
    """Refuse evaluation data without the label column, or with labels the training data lacks."""
    if evaluation is None:
        return
    name = data_args.label_column_name
    require_columns(evaluation, [name], where, "give evaluation data with the training data's label column")
    if labels is None:  # a regression target: any number, but not an empty cell
        empty = _empty_rows(evaluation, name)
        if empty:
            raise ScriptError(f"{where}: column {name!r} is empty in {len(empty)} example(s), the first being example "
                              f"{empty[0] + 1}: give every evaluation example a label, or drop those rows")
        return
    known = set(labels[0])
    unknown = sorted({repr(value) for value in evaluation[name] if value not in known})
    if unknown:
        raise ScriptError(f"{where}: column {name!r} holds {', '.join(unknown[:10])}, label(s) the training data lacks "
                          f"(its labels: {', '.join(labels[1][:20])}): fix or drop those rows")


def model_config(model_args, labels, task):
    """The model's config for `labels` (`training_labels`): num_labels, label2id / id2label and
    problem_type. A model with a classification head for another number of labels is refused
    unless --ignore_mismatched_sizes; one whose label2id names the same labels keeps its order.
    Returns the config and the class id of each label value."""
    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(path, finetuning_task=task)
    num_labels = 1 if labels is None else len(labels[0])
    has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
    data = "a regression target (1 output)" if labels is None else f"{num_labels} labels ({', '.join(labels[1][:10])})"
    if has_head and config.num_labels != num_labels:
        saved = f"{config.num_labels} label(s) ({', '.join(map(str, list(config.id2label.values())[:10]))})"
        if not model_args.ignore_mismatched_sizes:
            raise ScriptError(f"model {path!r} has a classification head for {saved}, the training data has {data}: "
                              "pass --ignore_mismatched_sizes true to replace the head by a new one, or start from a model without a head")
        logger.warning(f"replacing the classification head of {path!r} for {saved} by a new one for {data}")
    ids = {}
    if labels is not None:
        ids = {name: i for i, name in enumerate(labels[1])}
        saved_ids = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if has_head and config.num_labels == num_labels and set(saved_ids) == set(ids):
            ids = saved_ids  # the trained head keeps its classes
        elif has_head and config.num_labels == num_labels and any(k != f"LABEL_{v}" for k, v in saved_ids.items()):
            logger.warning(f"model {path!r} was trained on the labels {', '.join(saved_ids)}, the data has "
                           f"{', '.join(labels[1])}: its head is trained on the data's labels in sorted order")
    config.num_labels = num_labels
    config.problem_type = "regression" if labels is None else "single_label_classification"
    if labels is not None:
        config.label2id, config.id2label = ids, {i: name for name, i in ids.items()}
    return config, ({value: ids[name] for value, name in zip(*labels)} if labels is not None else None)


def sequence_length(requested, tokenizer, config):
    """`--max_seq_length`, by default the model's limit (`hf_flat.data.sequence_limit`: the tokenizer's
    model_max_length and the config's max_position_embeddings), and capped by it with a warning."""
    if requested is not None and requested < 1:
        raise ScriptError(f"--max_seq_length {requested}: give a positive number of tokens")
    limit, source = sequence_limit(tokenizer, config)
    if limit is None:
        return requested or 128
    if requested is not None and requested > limit:
        logger.warning(f"--max_seq_length {requested} is capped at {limit}, this model's limit ({source})")
        return limit
    return requested or limit


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, FlatTrainingArguments), DEFAULTS, argv
    )
    if data_args.task_name is not None and data_args.task_name not in TASKS:
        raise ScriptError(f"--task_name {data_args.task_name!r} is not a GLUE task: use one of {', '.join(TASKS)}, "
                          "or leave it out to train on --train_file's own columns")
    check_label_noise(data_args.label_noise)
    if data_args.label_noise and data_args.task_name == "stsb":
        raise ScriptError(f"--label_noise {data_args.label_noise}: STS-B's labels are similarity scores (a regression "
                          "target), which cannot be flipped to another class: use --label_noise 0")
    set_seed(training_args.seed)
    train, evaluation, (train_source, eval_source) = load_glue(data_args)
    labels = training_labels(train, data_args, train_source)  # from all of the training data, before any split
    if data_args.label_noise and labels is None:
        raise ScriptError(f"--label_noise {data_args.label_noise}: the labels of {train_source} are a regression target "
                          f"(column {data_args.label_column_name!r} holds numbers, not classes), which cannot be flipped "
                          "to another class: use --label_noise 0")
    texts = text_columns(train, data_args, train_source)
    train, evaluation = split_and_limit(train, evaluation, data_args, training_args.seed)
    check_evaluation_data(evaluation, training_args, "--validation_file or --holdout_fraction")
    if evaluation is not None:
        require_columns(evaluation, texts, eval_source, "give evaluation data with the training data's text columns")
    check_evaluation_labels(evaluation, labels, data_args, eval_source)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    config, label_ids = model_config(model_args, labels, data_args.task_name)
    if model_args.from_scratch:  # the same architecture and tokenizer, none of the pretrained weights
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    max_seq_length = sequence_length(data_args.max_seq_length, tokenizer, config)

    def tokenize(batch):
        # an empty CSV cell is an empty text; numbers in a named text column are read as text
        inputs = [["" if text is None else str(text) for text in batch[name]] for name in texts]
        out = tokenizer(*inputs, truncation=True, max_length=max_seq_length)
        values = batch[data_args.label_column_name]
        out["labels"] = [float(v) for v in values] if labels is None else [label_ids[v] for v in values]
        return out

    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    if evaluation is not None:
        evaluation = evaluation.map(tokenize, batched=True, remove_columns=evaluation.column_names)
    # after the held-out split (split_and_limit): only the labels the model trains on are replaced
    noise_seed = training_args.seed if data_args.label_noise_seed is None else data_args.label_noise_seed
    num_classes = 1 if labels is None else len(labels[0])
    train, noise = apply_label_noise(train, data_args.label_noise, num_classes, noise_seed)

    trainer = FlatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=glue_metrics(data_args.task_name, labels is None))
    metrics, warnings = train_and_evaluate(trainer)  # resumes, and evaluates when there is evaluation data
    metrics.update(noise)
    save_results(trainer, metrics, warnings)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k}))
    return metrics


if __name__ == "__main__":
    run(main)
