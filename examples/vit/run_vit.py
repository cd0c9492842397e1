"""Fine-tune a ViT for image classification with any flat method, the Hugging Face way.

    python examples/vit/run_vit.py                                   # built-in digits, small ViT, SAM
    python examples/vit/run_vit.py --flat_method wasam --sam_rho 0.1 --average_start 0.75
    python examples/vit/run_vit.py --dataset_name cifar10 --model_name_or_path google/vit-base-patch16-224-in21k
    python examples/vit/run_vit.py --train_dir data/train --validation_dir data/val --model_name_or_path ./my-vit
    python examples/vit/run_vit.py examples/vit/configs/vit_b16_cifar10_wasam.json   # a JSON config
    python examples/vit/run_vit.py my_config.json --num_train_epochs 1           # a config, then flags

Every `FlatTrainingArguments` / `TrainingArguments` flag works (`--help`); a JSON config given
first keeps this script's defaults for what it does not set, and flags after it win. `digits` is
scikit-learn's 8x8 digits (offline) with a small ViT built from a config, sized for a CPU; image
folders and `datasets` data need a pretrained `--model_name_or_path` with its image processor,
which is saved with the trained model. `--holdout_fraction f` trains on the rest of the training
split and evaluates on a held-out f of it (what `hf-flat compare --grid` uses to choose
hyper-parameters); without evaluation data, pass `--eval_strategy no`. `--label_noise p` replaces
exactly round(p * N) training labels by labels of other classes (`hf_flat.data.apply_label_noise`,
seeded by `--label_noise_seed`, default `--seed`); evaluation and held-out labels stay clean, and
the realised fraction is written as `label_noise_fraction` in `all_results.json`. `--resume_from_checkpoint
PATH` or `true` resumes, as does an `--output_dir` that already holds checkpoints
(`hf_flat.scripts.checkpoint_to_resume`). The model and the Trainer's `all_results.json` (with
`flat_method`, `flat_settings`, `flat_warnings`) / `eval_results.json` land in `--output_dir`.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from hf_flat import FlatTrainer, FlatTrainingArguments
from hf_flat.scripts import (
    ScriptError,
    check_evaluation_data,
    parse_script_args,
    run,
    save_results,
    split_and_limit,
    train_and_evaluate,
)
from hf_flat.data import LABEL_NOISE_HELP, LABEL_NOISE_SEED_HELP, apply_label_noise, check_label_noise, digits_splits

DEFAULTS = dict(
    output_dir="out/vit",
    flat_method="sam",
    sam_rho=0.05,
    num_train_epochs=15,
    learning_rate=2e-3,
    warmup_steps=30,
    weight_decay=0.05,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    eval_strategy="epoch",
    logging_strategy="epoch",
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
)


@dataclass
class DataArguments:
    dataset_name: str = field(default="digits", metadata={"help": "'digits' (built in), or a datasets name (cifar10)"})
    dataset_config_name: str = field(default=None, metadata={"help": "the datasets configuration"})
    train_dir: str = field(default=None, metadata={"help": "an image folder (one sub-folder per class) to train on"})
    validation_dir: str = field(default=None, metadata={"help": "an image folder to evaluate on"})
    validation_split_name: str = field(default="test", metadata={"help": "the evaluation split of the data set"})
    image_column_name: str = field(default=None, metadata={"help": "default: the first Image column"})
    label_column_name: str = field(default=None, metadata={"help": "default: 'label' (or 'fine_label')"})
    holdout_fraction: float = field(default=0.0, metadata={"help": "evaluate on this held-out share of the training data"})
    label_noise: float = field(default=0.0, metadata={"help": LABEL_NOISE_HELP})
    label_noise_seed: int = field(default=None, metadata={"help": LABEL_NOISE_SEED_HELP})
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "a pretrained ViT (Hub name or folder)"})
    hidden_size: int = field(default=64, metadata={"help": "width of the ViT built from a config (digits)"})
    num_hidden_layers: int = field(default=2, metadata={"help": "depth of the ViT built from a config (digits)"})
    patch_size: int = field(default=2, metadata={"help": "patch side of the ViT built from a config (digits)"})


def accuracy(eval_pred):
    return {"accuracy": float((np.argmax(eval_pred.predictions, axis=-1) == eval_pred.label_ids).mean())}


def load_data(data_args):
    """(train, eval, label names, already model-ready) for digits, image folders or a data set."""
    from datasets import ClassLabel, load_dataset

    if data_args.train_dir is None and data_args.dataset_name == "digits":
        splits = digits_splits(seed=0)
        return splits["train"], splits["test"], [str(i) for i in range(10)], True
    if data_args.train_dir is not None:
        # one call for both folders, so that a class means the same label id in both
        files = {"train": os.path.join(data_args.train_dir, "**")}
        for name, folder in (("train_dir", data_args.train_dir), ("validation_dir", data_args.validation_dir)):
            if folder is not None and not os.path.isdir(folder):
                raise ScriptError(f"{name}={folder!r} is not a folder: give an image folder with one sub-folder per class")
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=files)
        eval_name = "validation"
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        eval_name = data_args.validation_split_name
    train, evaluation = raw["train"], raw[eval_name] if eval_name in raw else None
    label = data_args.label_column_name or next(
        (c for c in ("label", "labels", "fine_label") if c in train.column_names), None)
    if label not in train.column_names:
        raise ScriptError(f"label_column_name={label!r} is not a column of the training data (columns: "
                          f"{', '.join(train.column_names)}): name the label column with --label_column_name")
    if not isinstance(train.features[label], ClassLabel):
        raise ScriptError(f"the label column {label!r} holds {train.features[label]}, not class labels (ClassLabel)")
    if label != "labels":
        train = train.rename_column(label, "labels")
        evaluation = evaluation.rename_column(label, "labels") if evaluation is not None else None
    names = train.features["labels"].names
    if evaluation is not None:
        unseen = set(evaluation.unique("labels")) - set(train.unique("labels"))
        if unseen:
            raise ScriptError(f"the evaluation data has class(es) {', '.join(sorted(names[i] for i in unseen))} that "
                              "the training data lacks: train on every class you evaluate on")
    return train, evaluation, names, False


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, FlatTrainingArguments), DEFAULTS, argv
    )
    check_label_noise(data_args.label_noise)
    set_seed(training_args.seed)
    if model_args.model_name_or_path is None and (data_args.train_dir or data_args.dataset_name != "digits"):
        raise ScriptError("image folders and datasets need --model_name_or_path: a pretrained image classifier (Hub "
                          "name or folder) with its image processor; only the built-in digits build a model")
    train, evaluation, names, ready = load_data(data_args)
    train, evaluation = split_and_limit(train, evaluation, data_args, training_args.seed)
    check_evaluation_data(evaluation, training_args, "--validation_dir (or a data set with a validation split) or --holdout_fraction")
    num_labels = len(names)
    # after the held-out split: only the labels the model trains on are replaced
    noise_seed = training_args.seed if data_args.label_noise_seed is None else data_args.label_noise_seed
    train, noise = apply_label_noise(train, data_args.label_noise, num_labels, noise_seed)

    processor = None
    if model_args.model_name_or_path:
        labels = dict(num_labels=num_labels, id2label=dict(enumerate(names)),
                      label2id={name: i for i, name in enumerate(names)})
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, **labels
        )
    else:
        model = ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=model_args.patch_size, num_channels=1, num_labels=num_labels,
            hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=4, intermediate_size=2 * model_args.hidden_size,
        ))
    if not ready:  # images through the model's own image processor, on the fly
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        image = data_args.image_column_name or next(
            (c for c, f in train.features.items() if type(f).__name__ == "Image"), None)
        if image not in train.column_names:
            raise ScriptError(f"image_column_name={image!r} is not a column of the training data (columns: "
                              f"{', '.join(train.column_names)}): name the image column with --image_column_name")

        def transform(batch):
            pixels = processor([img.convert("RGB") for img in batch[image]], return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": batch["labels"]}

        for dataset in (train, evaluation):
            if dataset is not None:
                dataset.set_transform(transform)
        training_args.remove_unused_columns = False

    # processing_class: saved with the model, so that `hf-flat plane` / `interpolate` can read it
    trainer = FlatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          compute_metrics=accuracy, processing_class=processor)
    metrics, warnings = train_and_evaluate(trainer)
    metrics.update(noise)
    save_results(trainer, metrics, warnings)
    keys = ("eval_accuracy", "eval_loss", "train_loss", "train_runtime")
    print(json.dumps({"flat_method": training_args.flat_method, **{k: metrics[k] for k in keys if k in metrics}}))
    return metrics


if __name__ == "__main__":
    run(main)
