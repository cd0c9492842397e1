"""Supervised fine-tuning of a causal language model with TRL's `SFTTrainer` and any flat method,
optionally through a LoRA adapter, the Hugging Face way.

    python examples/sft/run_sft.py --model_name_or_path ./my-llama --train_file train.jsonl --flat_method mesa
    python examples/sft/run_sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --train_file train.jsonl \\
        --validation_file dev.jsonl --use_lora --flat_method sam --sam_rho 0.05
    python examples/sft/run_sft.py examples/sft/configs/qwen2.5_0.5b_lora_mesa.json   # a JSON config
    python examples/sft/run_sft.py my_config.json --max_steps 10                     # a config, then flags

Data: local JSON lines (``--train_file``, ``--validation_file``), one example per line, either
``{"text": ...}`` (language modelling on the whole text; another column with ``--text_column``) or
``{"prompt": ..., "completion": ...}`` (the loss counts the completion only, TRL's default for such
data; ``--completion_only_loss false`` counts both), or ``--dataset_name`` for `load_dataset`.
The model is a causal LM from a local folder (``save_pretrained`` output, works offline) or a Hub
name, with its tokenizer. ``--use_lora`` trains a LoRA adapter (``--lora_r``, ``--lora_alpha``,
``--lora_dropout``, ``--lora_target_modules``) instead of the whole model: SAM-type methods
perturb the adapter, averaging averages it, and MESA's teacher is an EMA of the adapter on the
shared frozen base. Every `SFTConfig` flag (``--packing``, ``--max_length``, ...) and every flat
flag works (``--help``: `flat_arguments_class(SFTConfig)`); SAF is refused for language models (use
MESA). JSON configs, ``--resume_from_checkpoint PATH`` or ``true`` (an ``--output_dir`` that holds
checkpoints resumes too), ``--holdout_fraction``, training without evaluation data (``--eval_strategy
no``) and ``all_results.json`` (with ``flat_method``, ``flat_settings``, ``flat_warnings``) work as in
`examples/vit/run_vit.py` (`hf_flat.scripts`). The model (the adapter with ``--use_lora``), its
tokenizer and a model card naming the flat method land in ``--output_dir``.
"""

import json
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_flat import flat_arguments_class, flat_trainer_class
from hf_flat.scripts import (
    ScriptError, check_evaluation_data, parse_script_args, run, save_results, split_and_limit, train_and_evaluate,
)

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover
    raise SystemExit("run_sft.py needs TRL: pip install trl (or pip install 'hf-flat[examples]')") from None

DEFAULTS = dict(output_dir="out/sft", flat_method="sam", sam_rho=0.05, eval_strategy="epoch", save_strategy="no",
                logging_strategy="steps", logging_steps=10, report_to="none", disable_tqdm=True)


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={"help": "a local JSON lines training file: 'text', or 'prompt' and "
                                                            "'completion', per line"})
    validation_file: str = field(default=None, metadata={"help": "a local JSON lines evaluation file, the same columns"})
    dataset_name: str = field(default=None, metadata={"help": "a data set for `datasets.load_dataset` instead of files"})
    dataset_config_name: str = field(default=None, metadata={"help": "its configuration"})
    text_column: str = field(default="text", metadata={"help": "the text column of language-modelling data"})
    holdout_fraction: float = field(default=0.0, metadata={"help": "evaluate on this held-out share of the training data"})
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "a causal LM: a local folder or a Hub name"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of the whole model (peft)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the adapter is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "the layers that get an adapter: 'all-linear', or names separated by commas ('q_proj,v_proj')"})


def load_data(data_args):
    """The training and evaluation splits (`datasets.Dataset`), checked for a column SFT can train on."""
    from datasets import load_dataset

    if data_args.dataset_name:
        data = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        train, evaluation = data["train"], data.get("validation")
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        try:
            data = load_dataset("json", data_files=files)
        except FileNotFoundError as error:
            raise ScriptError(f"cannot read the data: {error}") from None
        train, evaluation = data["train"], data.get("validation")
    else:
        raise ScriptError("give the training data: --train_file (JSON lines) or --dataset_name")
    columns = set(train.column_names)
    if data_args.text_column not in columns and not {"prompt", "completion"} <= columns and "messages" not in columns:
        raise ScriptError(f"the training data has the columns {', '.join(sorted(columns))}: SFT needs "
                          f"{data_args.text_column!r} (or --text_column), or 'prompt' and 'completion', or 'messages'")
    return train, evaluation


def lora_config(model_args):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, flat_arguments_class(SFTConfig)), DEFAULTS, argv
    )
    if model_args.model_name_or_path is None:
        raise ScriptError("give the model: --model_name_or_path, a causal LM's folder (save_pretrained) or Hub name")
    set_seed(training_args.seed)
    train, evaluation = load_data(data_args)
    train, evaluation = split_and_limit(train, evaluation, data_args, training_args.seed)
    check_evaluation_data(evaluation, training_args, "--validation_file or --holdout_fraction")
    training_args.dataset_text_field = data_args.text_column

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    trainer = flat_trainer_class(SFTTrainer)(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=lora_config(model_args) if model_args.use_lora else None,
    )
    metrics, warnings = train_and_evaluate(trainer)
    save_results(trainer, metrics, warnings)
    trainer.create_model_card(model_name=training_args.output_dir.rstrip("/").split("/")[-1])
    keys = ("eval_loss", "eval_mean_token_accuracy", "train_loss", "train_runtime")
    print(json.dumps({"flat_method": training_args.flat_method, **{k: metrics[k] for k in keys if k in metrics}}))
    return metrics


if __name__ == "__main__":
    run(main)
