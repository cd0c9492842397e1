"""Fixes from issue 24's probes of the `hf-flat` commands: `report --curves` matched by path *and*
weights, and each side of its pair table labelled with its weights (items 4, 16); `--weights
averaged` for every averaging kind (SWA, EMA, LAWA's window, WASAM) in both flat state layouts
(item 10); `compare --grid` keys applied only to the methods they change (item 12); the commands
on a LoRA (PEFT) run's adapter folders (item 13)."""

import json
import os
import textwrap

import pytest
import torch
from transformers import ViTForImageClassification

from hf_flat.analysis import evaluate
from hf_flat.cli import load_average, load_model, main, run
from hf_flat.data import batches, load_splits, preprocess
from test_cli import tiny_vit

COMMON = ["--data", "digits", "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "32"]
SHARP = ["--m", "16", "--n", "1", "--n_average", "1", "--directions", "2", "--hessian_iterations", "2"]


def fake_checkpoint(folder, seed, shift=0.01):
    """A tiny ViT saved in `folder` with an SWA average (its weights + `shift`) in hf_flat_state."""
    from hf_flat.state_file import save_flat_state
    from hf_flat.trainer import FLAT_STATE_NAME

    model = tiny_vit(folder, seed)
    average = {f"averaging.{n}": p.detach() + shift for n, p in model.named_parameters()}
    save_flat_state(os.path.join(folder, FLAT_STATE_NAME), [(average, {
        "averaging_version": "1", "averaging": "swa", "averaging_count": "3",
        "averaging_names": json.dumps([n for n, _ in model.named_parameters()])})], "swa")
    return str(folder)


# ---- items 4 and 16: report --curves by path and weights; the pair table's labels ----------------

def test_report_matches_curves_by_path_and_weights_and_labels_both_sides(tmp_path, capsys):
    a = fake_checkpoint(tmp_path / "run" / "checkpoint-4", 0)
    b = str(tmp_path / "b")
    tiny_vit(b, 1)
    curves = str(tmp_path / "c")
    run(["connect", a, b, "--weights", "averaged", "live", "--epochs", "1", "--points", "3", "--train_batch_size", "32",
         "--output_dir", curves, *COMMON])

    # the curve joins A's *averaged* weights and B: a report of A's live weights must not take its barriers
    status = main(["report", a, b, "--weights", "live", "--curves", curves, "--output_dir", str(tmp_path / "r0"),
                   *SHARP, *COMMON])
    err = capsys.readouterr().err
    assert status == 2
    assert "--curves" in err and "averaged" in err and "live" in err and a in err
    assert not (tmp_path / "r0").exists()

    # A twice (averaged and live) and B: the curve belongs to (A averaged, B) only
    report = run(["report", a, a, b, "--weights", "averaged", "live", "live", "--curves", curves, "--points", "3",
                  "--output_dir", str(tmp_path / "r"), *SHARP, *COMMON])
    found = json.loads((tmp_path / "c" / "results.json").read_text())
    by_pair = {(p["a"], p["weights_a"], p["b"], p["weights_b"]): p for p in report["pairs"]}
    with_curve = by_pair[(a, "averaged", b, "live")]
    assert with_curve["curve_from"] == curves
    assert with_curve["barriers"]["curve/test/loss"] == found["barriers"]["curve/test/loss"]
    for key in [(a, "averaged", a, "live"), (a, "live", b, "live")]:
        assert "curve_from" not in by_pair[key] and not any(k.startswith("curve/") for k in by_pair[key]["barriers"])
    table = (tmp_path / "r" / "report.md").read_text()
    name = os.path.join("run", "checkpoint-4")
    assert f"| {name} (averaged weights) | {name} |" in table
    assert f"| {name} (averaged weights) | b |" in table and f"| {name} | b |" in table
