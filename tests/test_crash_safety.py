"""Crash safety: a real training process killed with SIGKILL at random moments of a run that
checkpoints every 2 steps, for wasam, saf and mesa, then `train(resume_from_checkpoint=True)`.

Each resume must either end exactly where the uninterrupted run ends (1e-6: live weights, the
average, SAF memory and MESA teacher all restored), or refuse with an error that names the broken
checkpoint and the one to use instead; resuming from that one must then end exactly there too.
It must never train on with lost flat state."""

import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

from crash_train import training_args
from hf_flat import FlatTrainer
from helpers import TinyData, TinyNet

SCRIPT = os.path.join(os.path.dirname(__file__), "crash_train.py")
KILLS_PER_METHOD = 4  # random moments; plus two kills inside a checkpoint write (wasam)


def uninterrupted(tmp_path, method):
    trainer = FlatTrainer(model=TinyNet(), args=training_args(str(tmp_path / f"full-{method}"), method),
                          train_dataset=TinyData())
    trainer.train()
    return trainer.model.state_dict()


def killed_run(output_dir, method, mode, delay):
    """Start the child, wait for training to begin, then SIGKILL it after `delay` seconds (unless it
    kills itself or finishes first)."""
    child = subprocess.Popen([sys.executable, SCRIPT, output_dir, method, mode], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:
        if line.startswith("TRAINING"):
            break
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()


def resume(output_dir, method, checkpoint=True):
    trainer = FlatTrainer(model=TinyNet(), args=training_args(output_dir, method), train_dataset=TinyData())
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.model.state_dict()


def same(a, b):
    return all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@pytest.mark.parametrize("method", ["wasam", "saf", "mesa"])
def test_killed_runs_resume_exactly_or_refuse(tmp_path, method, capsys):
    expected = uninterrupted(tmp_path, method)
    rng = random.Random(f"kills-{method}")
    kills = [("random", rng.uniform(0.0, 0.9)) for _ in range(KILLS_PER_METHOD)]
    if method == "wasam":
        kills += [("in_state_write", 30.0), ("after_state", 30.0)]
    outcomes = []
    for i, (mode, delay) in enumerate(kills):
        output_dir = str(tmp_path / f"{method}-{i}")
        killed_run(output_dir, method, mode, delay)
        checkpoints = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
        last = max((int(c.split("-")[1]) for c in checkpoints if c.startswith("checkpoint-")), default=0)
        try:
            final = resume(output_dir, method)
            outcome = "resumed exactly"
        except ValueError as error:
            message = str(error)
            if "No valid checkpoint" in message:  # killed before the first checkpoint: nothing to lose
                assert not any(c.startswith("checkpoint-") for c in checkpoints)
                outcomes.append((mode, round(delay, 2), "no checkpoint yet"))
                continue
            if "No complete checkpoint is left" in message:  # killed while writing the first one
                assert re.search(r"Checkpoint \S+checkpoint-2 is incomplete", message), message
                outcomes.append((mode, round(delay, 2), "refused the half-written first checkpoint"))
                continue
            match = re.search(r"Checkpoint (\S+) is incomplete.*Resume from (\S+) instead", message)
            assert match, message
            final = resume(output_dir, method, checkpoint=match.group(2))
            outcome = f"refused {os.path.basename(match.group(1))}, resumed exactly from {os.path.basename(match.group(2))}"
        assert same(final, expected), (mode, delay, checkpoints)
        outcomes.append((mode, round(delay, 2), f"{outcome} (newest checkpoint on disk: step {last} of 24)"))
    with capsys.disabled():
        print(f"\n{method}: " + "; ".join(f"{m} kill at {d}s: {o}" for m, d, o in outcomes))
    if method == "wasam":
        assert [o.split(" (")[0] for m, _, o in outcomes if m != "random"] == [
            "refused checkpoint-4, resumed exactly from checkpoint-2"
        ] * 2
