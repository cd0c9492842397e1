"""Fine-tune a RoBERTa-style model on a GLUE task with any flat method, the Hugging Face way.

    python examples/glue/run_glue.py --model_name_or_path roberta-base --task_name rte --flat_method wasam
    python examples/glue/run_glue.py --model_name_or_path ./my-model --train_file train.csv \\
        --validation_file dev.csv --task_name sst2 --flat_method sam --sam_rho 0.05
    python examples/glue/run_glue.py examples/glue/configs/roberta_base_rte.json   # a JSON config

`--task_name` loads the GLUE task through `datasets` (`load_dataset("glue", task)`);
`--train_file` / `--validation_file` (CSV or JSON with the task's columns) work offline. Metrics
are those the paper reports (seed 000, appendix B.2): Matthews correlation for CoLA, Pearson
correlation for STS-B (a regression head), accuracy for the others, computed locally (no metric
download). `--holdout_fraction f` evaluates on a held-out share of the training data (for
`hf-flat compare --grid`). Every `FlatTrainingArguments` flag works (`--help`).
"""

import json
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
from hf_flat.scripts import parse_script_args, save_results, split_and_limit

#: task -> (first text column, second text column or None, number of labels; 1 = regression)
TASKS = {
    "cola": ("sentence", None, 2),
    "sst2": ("sentence", None, 2),
    "mrpc": ("sentence1", "sentence2", 2),
    "stsb": ("sentence1", "sentence2", 1),
    "qqp": ("question1", "question2", 2),
    "mnli": ("premise", "hypothesis", 3),
    "qnli": ("question", "sentence", 2),
    "rte": ("sentence1", "sentence2", 2),
}
DEFAULTS = dict(output_dir="out/glue", report_to="none", eval_strategy="epoch", save_strategy="no",
                logging_strategy="epoch", disable_tqdm=True)


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": "one of " + ", ".join(TASKS)})
    train_file: str = field(default=None, metadata={"help": "a local CSV / JSON training file"})
    validation_file: str = field(default=None, metadata={"help": "a local CSV / JSON evaluation file"})
    validation_split_name: str = field(default=None, metadata={"help": "default: validation (validation_matched for MNLI)"})
    max_seq_length: int = field(default=128)
    holdout_fraction: float = field(default=0.0, metadata={"help": "evaluate on this held-out share of the training data"})
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="roberta-base", metadata={"help": "Hub name or local folder"})


def glue_metrics(task):
    """The paper's metric for `task`, computed locally: Matthews (CoLA), Pearson (STS-B), accuracy."""

    def compute(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if task == "stsb":
            return {"pearson": float(np.corrcoef(predictions.reshape(-1), labels.reshape(-1))[0, 1])}
        predicted = np.argmax(predictions, axis=-1)
        if task == "cola":
            from sklearn.metrics import matthews_corrcoef

            return {"matthews_correlation": float(matthews_corrcoef(labels, predicted)), "accuracy": float((predicted == labels).mean())}
        return {"accuracy": float((predicted == labels).mean())}

    return compute


def load_glue(data_args):
    from datasets import load_dataset

    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        kind = "csv" if data_args.train_file.endswith(".csv") else "json"
        raw = load_dataset(kind, data_files=files)
        return raw["train"], raw["validation"] if "validation" in raw else None
    raw = load_dataset("glue", data_args.task_name)
    split = data_args.validation_split_name or ("validation_matched" if data_args.task_name == "mnli" else "validation")
    return raw["train"], raw[split]


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, FlatTrainingArguments), DEFAULTS, argv
    )
    if data_args.task_name not in TASKS:
        raise ValueError(f"task_name={data_args.task_name!r} is not supported: use one of {', '.join(TASKS)}.")
    set_seed(training_args.seed)
    first, second, num_labels = TASKS[data_args.task_name]
    train, evaluation = load_glue(data_args)
    train, evaluation = split_and_limit(train, evaluation, data_args, training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels,
                                        finetuning_task=data_args.task_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                               ignore_mismatched_sizes=True)

    def tokenize(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        out = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [float(v) for v in batch["label"]] if num_labels == 1 else batch["label"]
        return out

    columns = train.column_names
    train = train.map(tokenize, batched=True, remove_columns=columns)
    evaluation = evaluation.map(tokenize, batched=True, remove_columns=columns) if evaluation is not None else None

    trainer = FlatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=glue_metrics(data_args.task_name))
    train_result = trainer.train()
    metrics = {**train_result.metrics, **trainer.evaluate()}
    save_results(trainer, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k}))
    return metrics


if __name__ == "__main__":
    main()
