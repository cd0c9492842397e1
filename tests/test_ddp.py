"""Two real CPU processes (gloo) under torchrun: each rank perturbs with its own local gradient;
the final gradient is the Trainer's all-reduced one."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import TinyNet, assert_same_weights, reference_two_pass

RUNS = ["sam:2:0.0", "asam:1:0.05", "none:2:0.0", "wasam:1:0.0", "saf:1:0.0"]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = os.path.join(os.path.dirname(__file__), "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", script, str(out), *RUNS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {
        run: [torch.load(out / f"{run.replace(':', '_')}.rank{r}.pt", weights_only=True) for r in range(2)]
        for run in RUNS
    }


@pytest.mark.parametrize("run", RUNS[:3])
def test_two_processes_match_reference_from_each_ranks_micro_batches(ddp_results, run):
    method, grad_accum, clip = run.split(":")
    grad_accum, clip = int(grad_accum), float(clip)
    ranks = ddp_results[run]
    assert [r["world_size"] for r in ranks] == [2, 2]
    n_steps = ranks[0]["global_step"]
    assert n_steps == 32 // (2 * 4 * grad_accum)
    # the two ranks saw different data
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])

    steps = [
        [r["batches"][t * grad_accum : (t + 1) * grad_accum] for r in ranks]  # per-rank micro-batches of step t
        for t in range(n_steps)
    ]
    initial = TinyNet()
    initial.load_state_dict(ranks[0]["initial"])
    perturbed = []
    expected = reference_two_pass(initial, steps, method, rho=0.5, max_grad_norm=clip, perturbed_losses=perturbed)
    for r in ranks:
        final = TinyNet()
        final.load_state_dict(r["final"])
        assert_same_weights(final, expected)
    if method != "none":
        # the logged perturbed loss is the mean over both ranks
        for r in ranks:
            assert r["perturbed_loss"] == pytest.approx(perturbed, abs=1e-6)
        # a perturbation from the all-reduced gradient (both ranks' micro-batch j as one batch)
        # would have ended elsewhere: the test tells local from global perturbations
        merged = [
            [{k: torch.cat([b0[k], b1[k]]) for k in b0} for b0, b1 in zip(*step)] for step in steps
        ]
        assert not torch.allclose(
            reference_two_pass(initial, merged, method, rho=0.5, max_grad_norm=clip).fc1.weight,
            expected.fc1.weight, atol=1e-5,
        )


def test_two_processes_average_the_same_weights_and_only_rank_zero_writes(ddp_results):
    ranks = ddp_results["wasam:1:0.0"]
    assert ranks[0]["global_step"] == 8  # 32 samples / (2 ranks x 4) x 2 epochs
    for t in range(1, 9):  # DDP keeps the live weights identical on both ranks
        for k, v in ranks[0]["live"][t].items():
            assert torch.equal(v, ranks[1]["live"][t][k]), (t, k)
    expected = {k: torch.stack([ranks[0]["live"][t][k] for t in range(4, 9)]).mean(0) for k in ranks[0]["final"]}
    for r in ranks:
        for k, v in r["final"].items():
            torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)
    assert [r["state_writes"] for r in ranks] == [4, 0]  # checkpoints 2, 4, 6, 8, written by rank 0 only


def test_saf_ranks_find_past_logits_that_the_other_rank_recorded(ddp_results):
    ranks = ddp_results["saf:1:0.0"]
    seen_in_epoch0 = [{i for epoch, indices, _ in r["saf_found"] if epoch == 0 for i in indices} for r in ranks]
    from_other_rank = 0
    for rank, r in enumerate(ranks):
        for epoch, indices, has in r["saf_found"]:
            if epoch == 1:
                assert has == len(indices)  # every sample of epoch 1 has its epoch-0 logits
                from_other_rank += len(set(indices) - seen_in_epoch0[rank])
    assert from_other_rank > 0  # ... some of them recorded by the other process
    assert torch.equal(ranks[0]["saf_epochs"], ranks[1]["saf_epochs"])  # both memories are complete and equal
    assert torch.equal(ranks[0]["saf_logits"], ranks[1]["saf_logits"])
    assert (ranks[0]["saf_epochs"] == 1).all()  # every row now holds epoch 1
