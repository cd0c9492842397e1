"""Fusion-in-Decoder on T5 with any flat method. FiD: Gautier Izacard, Edouard Grave, "Leveraging
Passage Retrieval with Generative Models for Open Domain Question Answering", EACL 2021,
arXiv 2007.01282.

    python examples/fid/run_fid.py --model_name_or_path t5-base --train_file nq/train.json \\
        --eval_file nq/dev.json --n_context 100 --flat_method wasam
    python examples/fid/run_fid.py examples/fid/configs/fid_base_nq.json        # a JSON config
    python examples/fid/run_fid.py examples/fid/configs/fid_base_nq.json --max_steps 100   # config + flags

Data is the FiD JSON format: a list of ``{"question", "answers": [...], "ctxs": [{"title",
"text"}, ...]}``. Each of the first `n_context` passages is encoded with the question
(``question: ... title: ... context: ...``) on its own; the encoder outputs are concatenated for
the decoder. Training targets the first answer; evaluation generates an answer per question and
reports exact match (SQuAD normalisation) as ``eval_exact_match``, next to the loss. SAF needs one
row of logits per sample and is refused for this per-token model; MESA works per token.
A JSON config given first keeps this script's defaults (``remove_unused_columns=False``, which
FiD's collator needs) for what it does not set; flags after it win. Resuming, the saved model and
tokenizer, and ``all_results.json`` work as in ``examples/vit/run_vit.py`` (``hf_flat.scripts``).
"""

import json
import re
import string
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration, set_seed
from transformers.modeling_outputs import BaseModelOutput

from hf_flat import FlatTrainer, FlatTrainingArguments
from hf_flat.scripts import (
    ScriptError,
    check_evaluation_data,
    parse_script_args,
    run,
    save_results,
    train_and_evaluate,
)

DEFAULTS = dict(output_dir="out/fid", report_to="none", save_strategy="no", remove_unused_columns=False,
                disable_tqdm=True)


class FiDT5(T5ForConditionalGeneration):
    """T5 whose encoder reads each passage separately: `input_ids` of shape (batch, passages, length)."""

    def encode_passages(self, input_ids, attention_mask):
        batch, passages, length = input_ids.shape
        hidden = self.encoder(input_ids=input_ids.view(batch * passages, length),
                              attention_mask=attention_mask.view(batch * passages, length)).last_hidden_state
        return (BaseModelOutput(last_hidden_state=hidden.view(batch, passages * length, -1)),
                attention_mask.view(batch, passages * length))

    def forward(self, input_ids=None, attention_mask=None, encoder_outputs=None, labels=None, **kwargs):
        # (`labels` is named so that the Trainer finds it and computes the evaluation loss)
        if input_ids is not None and input_ids.dim() == 3:
            encoder_outputs, attention_mask = self.encode_passages(input_ids, attention_mask)
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, encoder_outputs=encoder_outputs,
                               labels=labels, **kwargs)

    @torch.no_grad()
    def generate_answers(self, input_ids, attention_mask, max_new_tokens=20):
        encoder_outputs, mask = self.encode_passages(input_ids, attention_mask)
        return self.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=max_new_tokens)


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={"help": "FiD JSON training file (required)"})
    eval_file: str = field(default=None, metadata={"help": "FiD JSON evaluation file"})
    n_context: int = field(default=100, metadata={"help": "passages per question"})
    text_maxlength: int = field(default=250, metadata={"help": "tokens per question + passage"})
    answer_maxlength: int = field(default=20)
    holdout_fraction: float = field(default=0.0, metadata={"help": "evaluate on a held-out share of the training data"})
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="t5-base", metadata={"help": "Hub name or local folder"})


def normalize_answer(text):
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction, answers):
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


class FiDCollator:
    """Tokenizes FiD examples into (batch, n_context, length) inputs and answer labels."""

    def __init__(self, tokenizer, n_context, text_maxlength, answer_maxlength):
        self.tokenizer, self.n, self.text_len, self.answer_len = tokenizer, n_context, text_maxlength, answer_maxlength

    def passages(self, example):
        ctxs = example["ctxs"][: self.n]
        texts = [f"question: {example['question']} title: {c['title']} context: {c['text']}" for c in ctxs]
        return texts + [f"question: {example['question']}"] * (self.n - len(texts))  # pad to n passages

    def __call__(self, examples):
        encoded = self.tokenizer([p for e in examples for p in self.passages(e)], max_length=self.text_len,
                                 truncation=True, padding="max_length", return_tensors="pt")
        shape = (len(examples), self.n, -1)
        targets = self.tokenizer([e["answers"][0] for e in examples], max_length=self.answer_len, truncation=True,
                                 padding="longest", return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
        return {"input_ids": encoded["input_ids"].view(shape), "attention_mask": encoded["attention_mask"].view(shape),
                "labels": labels}


def load_fid_json(path, name):
    """The examples in the FiD JSON file `path` (a list; JSON lines work too), checked for the keys used."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ScriptError(f"{name}={path!r} does not exist: give a FiD JSON file") from None
    try:
        examples = json.loads(text)
    except json.JSONDecodeError:
        try:
            examples = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ScriptError(f"{name}={path!r} is neither JSON nor JSON lines ({error})") from None
    if not isinstance(examples, list) or not examples:
        raise ScriptError(f"{name}={path!r} must hold a non-empty list of FiD examples")
    for i, example in enumerate(examples):
        missing = [k for k in ("question", "answers", "ctxs") if k not in example]
        if missing or not example["answers"]:
            raise ScriptError(f"{name}={path!r}: example {i} lacks {', '.join(missing) or 'an answer'}; every example "
                              "needs 'question', a non-empty 'answers' list and 'ctxs' [{'title', 'text'}, ...]")
    return examples


def evaluate_exact_match(model, tokenizer, collator, examples, batch_size, max_new_tokens, device):
    model.eval()
    scores = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collator(chunk)
        outputs = model.generate_answers(batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens)
        for example, text in zip(chunk, tokenizer.batch_decode(outputs, skip_special_tokens=True)):
            scores.append(exact_match(text, example["answers"]))
    return sum(scores) / max(len(scores), 1)


def main(argv=None):
    data_args, model_args, training_args = parse_script_args(
        (DataArguments, ModelArguments, FlatTrainingArguments), DEFAULTS, argv
    )
    if data_args.train_file is None:
        raise ScriptError("--train_file is required: a FiD JSON file of {question, answers, ctxs} examples")
    set_seed(training_args.seed)
    train = load_fid_json(data_args.train_file, "train_file")
    evaluation = load_fid_json(data_args.eval_file, "eval_file") if data_args.eval_file else None
    if data_args.holdout_fraction:
        generator = torch.Generator().manual_seed(training_args.seed)
        order = torch.randperm(len(train), generator=generator).tolist()
        cut = max(1, int(len(train) * data_args.holdout_fraction))
        evaluation, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
    train = train[: data_args.max_train_samples] if data_args.max_train_samples else train
    if evaluation is not None and data_args.max_eval_samples:
        evaluation = evaluation[: data_args.max_eval_samples]
    check_evaluation_data(evaluation, training_args, "--eval_file or --holdout_fraction")

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = FiDT5.from_pretrained(model_args.model_name_or_path)
    collator = FiDCollator(tokenizer, data_args.n_context, data_args.text_maxlength, data_args.answer_maxlength)
    trainer = FlatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          data_collator=collator, processing_class=tokenizer)
    metrics, warnings = train_and_evaluate(trainer)
    if evaluation is not None:
        metrics["eval_exact_match"] = evaluate_exact_match(
            trainer.model, tokenizer, collator, evaluation, training_args.per_device_eval_batch_size,
            data_args.answer_maxlength, training_args.device,
        )
        trainer.log({"eval_exact_match": metrics["eval_exact_match"]})
    save_results(trainer, metrics, warnings)
    print(json.dumps({k: v for k, v in metrics.items() if k in ("eval_exact_match", "eval_loss", "train_loss")}))
    return metrics


if __name__ == "__main__":
    run(main)
