"""Every Python snippet in the docs runs: each ```python block is preceded by a marker,
``<!-- runs with: NAME -->`` (it runs here, in a namespace that `SETUPS[NAME]` fills with tiny
models and data built from configs, offline) or ``<!-- not run: why -->``."""

import os
import re

import pytest
import transformers

from helpers import LM_TEXTS, save_tiny_t5, tiny_llama, tiny_lm_tokenizer

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
PAGES = ["trainers.md"]


def snippets(page):
    """(line, marker, code) of every ```python block of `page`."""
    lines = open(os.path.join(DOCS, page)).read().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append((i + 1, before, "\n".join(lines[i + 1: end])))
            i = end
        i += 1
    return found


def sft():
    from datasets import Dataset

    return {"model": tiny_llama(), "tokenizer": tiny_lm_tokenizer(), "train": Dataset.from_dict({"text": LM_TEXTS}),
            "dev": Dataset.from_dict({"text": LM_TEXTS[:4]})}


def dpo():
    import copy

    from datasets import Dataset

    model = tiny_llama()
    pairs = Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4, "chosen": [" sat on the mat", " ran on a log"] * 4,
                               "rejected": [" mat the on", " log a dog"] * 4})
    return {"model": model, "ref_model": copy.deepcopy(model), "tokenizer": tiny_lm_tokenizer(), "pairs": pairs}


def seq2seq(tmp_path):
    path = save_tiny_t5(tmp_path / "t5")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    data = [{"input_ids": tokenizer(q)["input_ids"], "labels": tokenizer(a)["input_ids"]}
            for q, a in [("who wrote hamlet", "shakespeare"), ("capital of france", "paris")] * 4]
    return {"model": transformers.T5ForConditionalGeneration.from_pretrained(path), "tokenizer": tokenizer,
            "train": data, "dev": data[:4], "compute_metrics": lambda prediction: {"answers": len(prediction.predictions)}}


def plain():
    tokenizer = tiny_lm_tokenizer()
    ids = [tokenizer(t, padding="max_length", max_length=8)["input_ids"] for t in LM_TEXTS]
    return {"model": tiny_llama(), "train": [{"input_ids": i, "labels": i} for i in ids]}


SETUPS = {"sft": lambda tmp: sft(), "dpo": lambda tmp: dpo(), "seq2seq": seq2seq, "plain": lambda tmp: plain()}
ALL = [(page, line, marker, code) for page in PAGES for line, marker, code in snippets(page)]


def test_every_python_snippet_is_marked():
    assert ALL
    for page, line, marker, code in ALL:
        match = re.fullmatch(r"<!-- (runs with: (\w+)|not run: .+) -->", marker)
        assert match, f"{page}:{line}: precede the snippet with <!-- runs with: NAME --> or <!-- not run: why -->"
        assert match.group(2) is None or match.group(2) in SETUPS, f"{page}:{line}: no setup {match.group(2)!r}"


@pytest.mark.parametrize("page, line, marker, code", [s for s in ALL if "runs with" in s[2]],
                         ids=[f"{p}:{n}" for p, n, m, _ in ALL if "runs with" in m])
def test_doc_snippet_runs(tmp_path, monkeypatch, page, line, marker, code):
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    # the snippets are written for a GPU, where TRL's configs default to bf16: let them run on this CPU
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = SETUPS[marker.split(": ")[1].rstrip(" ->")](tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), namespace)
    trainer = namespace.get("trainer")
    if trainer is not None and "train()" in code:
        assert trainer.state.global_step > 0
