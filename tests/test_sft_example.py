"""examples/sft/run_sft.py end to end: TRL SFT with a LoRA adapter and flat methods on a user's
local JSON lines, from a local model folder, offline; resuming is exact; JSON configs; one-line errors."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import LM_TEXTS, tiny_llama, tiny_lm_tokenizer

pytest.importorskip("trl")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "sft"))
import run_sft  # noqa: E402
from hf_flat.scripts import ScriptError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    tiny_lm_tokenizer().save_pretrained(path)
    return str(path)


def jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.fixture
def files(tmp_path):
    rows = [{"prompt": " ".join(t.split()[:2]), "completion": " " + " ".join(t.split()[2:])} for t in LM_TEXTS]
    return jsonl(tmp_path / "train.jsonl", rows), jsonl(tmp_path / "dev.jsonl", rows[:4])


def args_for(tiny_lm, files, output_dir, *extra):
    train, dev = files
    return ["--model_name_or_path", tiny_lm, "--train_file", train, "--validation_file", dev, "--output_dir",
            str(output_dir), "--use_lora", "true", "--lora_r", "2", "--lora_alpha", "8", "--lora_dropout", "0",
            "--lora_target_modules", "q_proj,v_proj", "--flat_method", "mesa+swa", "--mesa_start_epoch", "1",
            "--mesa_decay", "0.5", "--average_start", "0.25", "--average_freq", "1", "--optim", "sgd",
            "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "4",
            "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
            "--eval_steps", "2", "--logging_steps", "1", "--use_cpu", "true", "--bf16", "false", "--seed", "0", *extra]


def adapter(output_dir):
    return load_file(os.path.join(output_dir, "adapter_model.safetensors"))


def test_run_sft_with_lora_trains_evaluates_and_resumes_exactly(tmp_path, tiny_lm, files):
    whole = tmp_path / "whole"
    metrics = run_sft.main(args_for(tiny_lm, files, whole))
    assert "eval_avg_loss" in metrics or "eval_loss" in metrics
    results = json.load(open(whole / "all_results.json"))
    assert results["flat_method"] == "mesa+swa" and results["flat_settings"]["mesa_decay"] == 0.5
    history = json.load(open(whole / "checkpoint-4" / "trainer_state.json"))["log_history"]
    assert any("eval_avg_mean_token_accuracy" in h for h in history)  # TRL's metrics for the average
    assert any(h.get("trajectory_loss", 0) > 0 for h in history)  # MESA acted (from epoch 1 on)
    card = open(whole / "README.md").read()
    assert "hf-flat" in card and "`mesa_decay` | 0.5" in card
    final = adapter(whole)
    assert final and all("lora_" in k for k in final)  # the adapter, not the whole model

    # a run stopped after step 2, resumed from its checkpoint, ends with the same adapter
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run_sft.main(args_for(tiny_lm, files, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-2")))
    again = adapter(resumed)
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key


def test_run_sft_reads_a_json_config_then_flags_and_plain_text(tmp_path, tiny_lm):
    train = jsonl(tmp_path / "t.jsonl", [{"text": t} for t in LM_TEXTS])
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"_note": "ignored", "model_name_or_path": tiny_lm, "train_file": train,
                                  "flat_method": "sam", "sam_rho": 0.2, "max_steps": 1, "eval_strategy": "no",
                                  "use_cpu": True, "bf16": False, "output_dir": str(tmp_path / "out")}))
    run_sft.main([str(config), "--sam_rho", "0.3"])
    results = json.load(open(tmp_path / "out" / "all_results.json"))
    assert results["flat_method"] == "sam" and results["flat_settings"]["sam_rho"] == 0.3
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")  # the whole model without --use_lora


def test_run_sft_errors_name_what_to_do(tmp_path, tiny_lm):
    wrong = jsonl(tmp_path / "w.jsonl", [{"question": "a", "answer": "b"}] * 4)
    cpu = ["--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ScriptError, match="columns answer, question: SFT needs 'text'"):
        run_sft.main(["--model_name_or_path", tiny_lm, "--train_file", wrong, "--eval_strategy", "no", *cpu])
    with pytest.raises(ScriptError, match="--model_name_or_path"):
        run_sft.main(["--train_file", wrong, *cpu])
    right = jsonl(tmp_path / "r.jsonl", [{"text": t} for t in LM_TEXTS])
    with pytest.raises(ScriptError, match="no evaluation data"):
        run_sft.main(["--model_name_or_path", tiny_lm, "--train_file", right, *cpu])
