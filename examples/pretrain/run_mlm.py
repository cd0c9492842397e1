"""Pretrain a small RoBERTa by masked-language modelling on your own text, offline, the Hugging Face way.

    python examples/pretrain/wordnet_data.py --output_dir data/wordnet
    python examples/pretrain/run_mlm.py --train_file data/wordnet/corpus.txt --output_dir out/wordnet-mlm
    python examples/glue/run_glue.py --model_name_or_path out/wordnet-mlm \\
        --train_file data/wordnet/task/train.csv --validation_file data/wordnet/task/validation.csv \\
        --text_column_names text --output_dir out/wordnet-task

- **Data**: `--train_file` is a text file, one text per line, read with `load_dataset("text")`
  (also a folder of them); `--validation_file` another, or else `--validation_split_percentage` of
  the training lines (default 5) is held out. As in Hugging Face's run_mlm.py, the texts are
  tokenized, concatenated and cut into blocks of `--max_seq_length` tokens; `--mlm_probability`
  of the tokens (default 0.15) are masked as BERT does, by `MaskPerBlock`, whose masks (unlike
  `DataCollatorForLanguageModeling`'s) a resumed run draws exactly as the uninterrupted one.
- **Tokenizer**: a byte-level BPE of `--vocab_size` tokens (RoBERTa's kind) trained on
  `--train_file` with the `tokenizers` library; or `--tokenizer_name` (a saved tokenizer). A
  resumed run takes the tokenizer its checkpoint holds.
- **Model**: a RoBERTa masked LM built from a config (`--hidden_size`, `--num_hidden_layers`,
  `--num_attention_heads`, `--intermediate_size`; positions for `--max_seq_length` tokens), or
  `--model_name_or_path` to go on pretraining a saved one. It is `RobertaForMaskedLMOnMasks`:
  RoBERTa's own weights and loss, with the prediction head run only on the masked tokens (on a
  small model with an 8,000-token vocabulary the head is most of the compute: a step takes 2.5x
  less time). Its folder loads with `AutoModelForMaskedLM` and any other RoBERTa class.
- **Training** is `FlatTrainer` (so every `FlatTrainingArguments` flag works; the default is
  plain training), resumable with `--resume_from_checkpoint` as in every example script
  (`hf_flat.scripts`). The model and its tokenizer are saved into `--output_dir`, which
  `run_glue.py` takes as `--model_name_or_path`; `all_results.json` holds the evaluation loss
  and its perplexity.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from itertools import chain

import torch.nn.functional as F

from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
    TrainerCallback,
    set_seed,
)
from transformers.modeling_outputs import MaskedLMOutput

from hf_flat import FlatTrainer, FlatTrainingArguments
from hf_flat.scripts import ScriptError, check_evaluation_data, parse_script_args, run, save_results, train_and_evaluate

logger = logging.getLogger(__name__)

DEFAULTS = dict(output_dir="out/mlm", report_to="none", eval_strategy="epoch", save_strategy="epoch",
                logging_strategy="epoch", disable_tqdm=True, learning_rate=5e-4, warmup_steps=0.06,
                weight_decay=0.01, per_device_train_batch_size=32, num_train_epochs=3,
                remove_unused_columns=False)  # (`MaskPerBlock` reads the blocks' `block` and `special_tokens_mask`)
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={"help": "a text file (or a folder of them), one text per line"})
    validation_file: str = field(default=None, metadata={"help": "a text file for the evaluation loss"})
    validation_split_percentage: int = field(default=5, metadata={
        "help": "without --validation_file: the percentage of the training lines held out for evaluation"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per training block"})
    mlm_probability: float = field(default=0.15, metadata={"help": "the share of tokens masked"})
    max_train_samples: int = field(default=None, metadata={"help": "use only this many training blocks"})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={
        "help": "a saved masked-LM to go on pretraining; by default a new RoBERTa is built from the sizes below"})
    tokenizer_name: str = field(default=None, metadata={
        "help": "a saved tokenizer; by default one is trained on --train_file (or taken from the resumed checkpoint)"})
    vocab_size: int = field(default=8000, metadata={"help": "tokens of the tokenizer trained on --train_file"})
    hidden_size: int = field(default=256)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    intermediate_size: int = field(default=1024)


def read_text(path, option):
    from datasets import load_dataset

    if not os.path.exists(path):
        raise ScriptError(f"{option} {path!r} does not exist: give a text file, one text per line")
    return load_dataset("text", data_files=path, split="train").filter(lambda row: bool(row["text"].strip()))


def train_tokenizer(path, vocab_size, max_length):
    """A byte-level BPE of `vocab_size` tokens trained on the text file(s) at `path`, as RoBERTa's."""
    from tokenizers import ByteLevelBPETokenizer

    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    bpe = ByteLevelBPETokenizer()
    bpe.train(files=files, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    with tempfile.TemporaryDirectory() as folder:
        bpe.save_model(folder)
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(line.rstrip("\n").split(" ")) for line in f if line.strip() and not line.startswith("#version")]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def load_tokenizer(model_args, data_args, training_args):
    if model_args.tokenizer_name:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    if training_args.resume_from_checkpoint:  # the tokenizer the interrupted run trained
        return AutoTokenizer.from_pretrained(training_args.resume_from_checkpoint)
    if model_args.model_name_or_path:
        return AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    with training_args.main_process_first(desc="training the tokenizer"):
        return train_tokenizer(data_args.train_file, model_args.vocab_size, data_args.max_seq_length)


class RobertaForMaskedLMOnMasks(RobertaForMaskedLM):
    """`RobertaForMaskedLM` whose prediction head runs on the masked tokens only.

    With `labels`, the loss is RoBERTa's, the mean cross-entropy over the tokens whose label is not
    -100, and `logits` holds the predictions for those tokens only (in row-major order). Without
    labels it is `RobertaForMaskedLM` as it is. The weights are the same, under the same names."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.roberta(input_ids, attention_mask=attention_mask, **kwargs)[0]
        chosen = labels != -100
        logits = self.lm_head(hidden[chosen])
        return MaskedLMOutput(loss=F.cross_entropy(logits, labels[chosen]), logits=logits)


def load_model(model_args, data_args, tokenizer):
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        if config.model_type == "roberta":
            return RobertaForMaskedLMOnMasks.from_pretrained(model_args.model_name_or_path, config=config)
        return AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path, config=config)
    config = RobertaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=data_args.max_seq_length + 2, type_vocab_size=1,
        hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads, intermediate_size=model_args.intermediate_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return RobertaForMaskedLMOnMasks(config)


class MaskPerBlock(TrainerCallback):
    """The masked-LM collator, with masks a resumed run draws exactly as the uninterrupted one.

    Hugging Face's `DataCollatorForLanguageModeling` draws its masks from torch's global generator,
    whose state the Trainer saves with each checkpoint; but the data loader collates the next
    batch before the step's checkpoint is written (accelerate looks one batch ahead), so a resumed
    run masks every later batch differently. Here block ``i`` of epoch ``e`` is masked with a
    generator seeded by ``(seed, e, i)``: BERT's rule, ``mlm_probability`` of the tokens that are
    not special tokens are chosen; of those, 80% become ``<mask>``, 10% a random token, 10% stay;
    the labels are the chosen tokens' ids, -100 elsewhere. As a callback it learns the epoch at
    ``on_epoch_begin``, before that epoch's first batch is collated."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int):
        self.tokenizer, self.mlm_probability, self.seed, self.epoch = tokenizer, mlm_probability, seed, 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = math.floor(state.epoch + 1e-6)

    def __call__(self, examples):
        import torch

        input_ids = torch.tensor([e["input_ids"] for e in examples])
        special = torch.tensor([e["special_tokens_mask"] for e in examples], dtype=torch.bool)
        labels = torch.full_like(input_ids, -100)
        for row, example in enumerate(examples):
            generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch, example["block"]))
            chosen = torch.bernoulli(torch.full(input_ids[row].shape, self.mlm_probability), generator=generator).bool()
            chosen &= ~special[row]
            masked = torch.bernoulli(torch.full(chosen.shape, 0.8), generator=generator).bool() & chosen
            randomised = torch.bernoulli(torch.full(chosen.shape, 0.5), generator=generator).bool() & chosen & ~masked
            random_tokens = torch.randint(len(self.tokenizer), chosen.shape, generator=generator)
            labels[row][chosen] = input_ids[row][chosen]
            input_ids[row][masked] = self.tokenizer.mask_token_id
            input_ids[row][randomised] = random_tokens[randomised]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def hash_seed(*parts) -> int:
    """63 bits of a SHA-256 hash of `parts`: unrelated seeds for nearby blocks and epochs."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def blocks(dataset, tokenizer, length):
    """Tokenize the texts, concatenate them and cut the result into blocks of `length` tokens (the
    last, shorter one dropped), as Hugging Face's run_mlm.py does."""

    def tokenize(batch):
        return tokenizer(batch["text"], return_special_tokens_mask=True)

    def group(batch):
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = len(joined["input_ids"]) // length * length
        return {k: [v[i : i + length] for i in range(0, total, length)] for k, v in joined.items()}

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    dataset = dataset.map(group, batched=True)
    return dataset.add_column("block", list(range(len(dataset))))  # (what `MaskPerBlock` seeds each mask by)


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, FlatTrainingArguments), DEFAULTS, argv
    )
    if not data_args.train_file:
        raise ScriptError("no data: give --train_file, a text file with one text per line "
                          "(examples/pretrain/wordnet_data.py writes one from WordNet)")
    if not 0 < data_args.mlm_probability < 1:
        raise ScriptError(f"--mlm_probability {data_args.mlm_probability}: give a share of the tokens in (0, 1)")
    if training_args.remove_unused_columns:
        raise ScriptError("--remove_unused_columns true would drop the columns the masking reads (block, "
                          "special_tokens_mask): leave it at its default, false, for this script")
    if data_args.max_seq_length < 8:
        raise ScriptError(f"--max_seq_length {data_args.max_seq_length}: give at least 8 tokens per block")
    set_seed(training_args.seed)
    train = read_text(data_args.train_file, "--train_file")
    if data_args.validation_file:
        evaluation = read_text(data_args.validation_file, "--validation_file")
    elif data_args.validation_split_percentage:
        split = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    check_evaluation_data(evaluation, training_args, "--validation_file or --validation_split_percentage")

    tokenizer = load_tokenizer(model_args, data_args, training_args)
    tokenizer.model_max_length = data_args.max_seq_length
    model = load_model(model_args, data_args, tokenizer)
    with training_args.main_process_first(desc="tokenizing"):
        train = blocks(train, tokenizer, data_args.max_seq_length)
        evaluation = blocks(evaluation, tokenizer, data_args.max_seq_length) if evaluation is not None else None
    if len(train) == 0:
        raise ScriptError(f"--train_file {data_args.train_file!r} holds fewer than --max_seq_length "
                          f"{data_args.max_seq_length} tokens: give more text or a smaller --max_seq_length")
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))

    collator = MaskPerBlock(tokenizer, data_args.mlm_probability, training_args.seed)
    trainer = FlatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer, data_collator=collator, callbacks=[collator])
    metrics, warnings = train_and_evaluate(trainer)
    if "eval_loss" in metrics:
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    save_results(trainer, metrics, warnings)
    print(json.dumps({k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "perplexity")}))
    return metrics


if __name__ == "__main__":
    run(main)
