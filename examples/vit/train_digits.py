"""Train a small ViT on scikit-learn's built-in `digits` images (1,797 8x8 digits, offline) with
any flat method, and print the test accuracy.

    python examples/vit/train_digits.py                      # SAM, the built-in defaults
    python examples/vit/train_digits.py --flat_method none   # the plain Trainer
    python examples/vit/train_digits.py --flat_method asam --sam_rho 0.5 --num_train_epochs 20

Every `FlatTrainingArguments` / `TrainingArguments` flag works (`--help` lists them).
"""

import json
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser, ViTConfig, ViTForImageClassification, set_seed

from hf_flat import FlatTrainer, FlatTrainingArguments
from hf_flat.data import digits_splits

DEFAULTS = dict(
    output_dir="out/digits",
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
class ModelArguments:
    hidden_size: int = field(default=64, metadata={"help": "ViT width"})
    num_hidden_layers: int = field(default=2, metadata={"help": "ViT depth"})
    patch_size: int = field(default=2, metadata={"help": "patch side in pixels (images are 8x8)"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of the 1,797 images held out"})


def accuracy(eval_pred):
    return {"accuracy": float((np.argmax(eval_pred.predictions, axis=-1) == eval_pred.label_ids).mean())}


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, FlatTrainingArguments))
    parser.set_defaults(**DEFAULTS)
    model_args, training_args = parser.parse_args_into_dataclasses(argv)
    set_seed(training_args.seed)
    splits = digits_splits(model_args.test_fraction, training_args.seed)
    train, test = splits["train"], splits["test"]
    config = ViTConfig(
        image_size=8, patch_size=model_args.patch_size, num_channels=1, num_labels=10,
        hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=4, intermediate_size=2 * model_args.hidden_size,
    )
    trainer = FlatTrainer(
        model=ViTForImageClassification(config), args=training_args,
        train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
    )
    train_result = trainer.train()
    metrics = {**train_result.metrics, **trainer.evaluate()}
    trainer.save_metrics("all", metrics)
    trainer.save_model()
    print(json.dumps({"flat_method": training_args.flat_method, "eval_accuracy": metrics["eval_accuracy"],
                      "eval_loss": metrics["eval_loss"], "train_runtime_s": metrics["train_runtime"]}))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
