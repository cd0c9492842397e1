"""The docs cannot rot.

- Every Python snippet in the docs runs: each ```python block is preceded by a marker,
  ``<!-- runs with: NAME -->`` (it runs here, in a namespace that `SETUPS[NAME]` fills with tiny
  models and data built from configs, offline) or ``<!-- not run: why -->``.
- The site builds with ``mkdocs build --strict``: a broken link or anchor, an API object that
  does not exist and a docstring griffe cannot read fail it.
- The arguments table is generated from the dataclass (`docs_hooks.py`), and a field without
  help text fails the build.
- The README's links lead to files that exist.
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import transformers

from helpers import LM_TEXTS, ROBERTA_WORDS, save_tiny_roberta, save_tiny_t5, tiny_llama, tiny_lm_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.relpath(os.path.join(folder, name), DOCS) for folder, _, names in os.walk(DOCS)
               for name in names if name.endswith(".md"))


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


def serve_from_pretrained(path, auto_model_class, monkeypatch):
    """`AutoTokenizer.from_pretrained(any name)` and `auto_model_class.from_pretrained(any name, ...)`
    load the tiny model saved in `path` instead of reaching the Hub."""
    tokenizer_from_pretrained = transformers.AutoTokenizer.from_pretrained
    model_from_pretrained = auto_model_class.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, *args, **kwargs: tokenizer_from_pretrained(path))
    monkeypatch.setattr(auto_model_class, "from_pretrained",
                        lambda name, *args, **kwargs: model_from_pretrained(path, *args, **kwargs))


def texts_and_labels(n=24):
    """`n` four-word texts over the tiny RoBERTa's words, labelled 0 / 1 alternately."""
    words = ROBERTA_WORDS[4:]
    return {"text": [" ".join(words[(i + j) % len(words)] for j in range(4)) for i in range(n)],
            "label": [i % 2 for i in range(n)]}


def hub(tmp_path, monkeypatch):
    """The Hub's loading paths, answered offline: `from_pretrained` of a tokenizer and of a sequence
    classifier give a tiny RoBERTa (`ROBERTA_WORDS`), `load_dataset` a small text / label
    `DatasetDict`, so a snippet written for the Hub runs here unchanged."""
    import datasets

    serve_from_pretrained(save_tiny_roberta(tmp_path / "tiny-roberta"),
                          transformers.AutoModelForSequenceClassification, monkeypatch)
    split = texts_and_labels()
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *args, **kwargs: datasets.DatasetDict(
        train=datasets.Dataset.from_dict(split), test=datasets.Dataset.from_dict(split)))
    return {}


def hub_lm(tmp_path, monkeypatch):
    """A causal LM's loading paths, answered offline: `from_pretrained` gives the tiny Llama and its
    tokenizer (`LM_WORDS`); ``train.jsonl`` / ``dev.jsonl`` of prompt / completion pairs are written
    in the working folder, where the snippet's `load_dataset("json", ...)` reads them for real."""
    import json

    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_lm_tokenizer().save_pretrained(path)
    serve_from_pretrained(path, transformers.AutoModelForCausalLM, monkeypatch)
    for name, texts in (("train.jsonl", LM_TEXTS), ("dev.jsonl", LM_TEXTS[:4])):
        with open(tmp_path / name, "w") as f:
            for text in texts:
                words = text.split()
                f.write(json.dumps({"prompt": " ".join(words[:2]), "completion": " " + " ".join(words[2:])}) + "\n")
    return {}


def classification(tmp_path):
    """A tiny RoBERTa classifier (`model`, and `make_model` for `model_init`), its tokenizer, and
    tokenized `train` / `dev` sets of two classes."""
    from datasets import Dataset

    path = save_tiny_roberta(tmp_path / "tiny-roberta")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    data = Dataset.from_dict(texts_and_labels())
    data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    def make_model():
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    return {"model": make_model(), "make_model": make_model, "tokenizer": tokenizer, "train": data,
            "dev": data.select(range(8))}


SETUPS = {"sft": lambda tmp, mp: sft(), "dpo": lambda tmp, mp: dpo(), "seq2seq": lambda tmp, mp: seq2seq(tmp),
          "plain": lambda tmp, mp: plain(), "hub": hub, "hub_lm": hub_lm,
          "classification": lambda tmp, mp: classification(tmp)}
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
    namespace = SETUPS[marker.split(": ")[1].rstrip(" ->")](tmp_path, monkeypatch)
    exec(compile(code, f"{page}:{line}", "exec"), namespace)
    trainer = namespace.get("trainer")
    if trainer is not None and "train()" in code:
        assert trainer.state.global_step > 0


def docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(ROOT, "docs_hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arguments_table_has_every_flat_field_with_its_help():
    from hf_flat import FlatArgumentsMixin

    table = docs_hooks().arguments_table().splitlines()
    names = [re.match(r"\| `(\w+)` \|", row).group(1) for row in table[2:]]
    assert names == list(FlatArgumentsMixin.__annotations__)
    sam_rho = next(row for row in table if row.startswith("| `sam_rho` |"))
    assert "| `0.05` |" in sam_rho and "Radius rho" in sam_rho and "`sam`" in sam_rho


def test_a_field_without_help_fails_the_docs_build(monkeypatch):
    hooks = docs_hooks()

    @dataclasses.dataclass
    class WithoutHelp:
        sam_new_setting: float = 0.1

    monkeypatch.setattr(hooks, "flat_fields", lambda: dataclasses.fields(WithoutHelp))
    with pytest.raises(ValueError, match="sam_new_setting has no help text"):
        hooks.arguments_table()


def test_the_cli_reference_shows_every_commands_help():
    from hf_flat.cli import build_parser

    hooks = docs_hooks()
    page = open(os.path.join(DOCS, "reference", "cli.md")).read()
    commands = re.findall(r"<!-- cli-help: (\w+) -->", page)
    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(commands) == sorted(subparsers.choices)
    assert "--points" in hooks.cli_help("interpolate") and "--methods" in hooks.cli_help("compare")
    assert "<!--" not in hooks.render(page)


def test_the_site_builds_with_mkdocs_strict(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "arguments" / "index.html").read_text().count("<tr>") > 30


def test_the_readme_is_a_short_landing_page_whose_links_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) > 20
    for link in local:
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_pyproject_names_the_docs_source_classifiers_and_keywords():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert {"Documentation", "Source"} <= set(project["urls"])
    assert project["classifiers"] and project["keywords"]
    assert "docs" in project["optional-dependencies"]


def test_each_command_has_its_module_and_none_imports_the_cli():
    """The CLI reference maps one to one onto hf_flat/commands/, and the commands and the shared
    loading module never import hf_flat.cli (no import cycle)."""
    from hf_flat.commands import COMMANDS

    code = ("import sys, hf_flat.loading, hf_flat.commands; "
            "assert 'hf_flat.cli' not in sys.modules, sorted(m for m in sys.modules if m.startswith('hf_flat'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    page = open(os.path.join(DOCS, "reference", "cli.md")).read()
    assert sorted(COMMANDS) == sorted(re.findall(r"<!-- cli-help: (\w+) -->", page))
