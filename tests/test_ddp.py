"""Two real CPU processes (gloo) under torchrun: each rank perturbs with its own local gradient;
the final gradient is the Trainer's all-reduced one."""

import math
import os
import subprocess
import sys

import pytest
import torch

import helpers
from ddp_train import INIT_SCALE, parse_run
from helpers import TinyNet, assert_same_weights, reference_flat_family, reference_two_pass, reference_where_and_when

# "METHOD:GRAD_ACCUM:MAX_GRAD_NORM[:KEY=VALUE,...]" (tests/ddp_train.py `parse_run`)
RUNS = ["sam:2:0.0", "asam:1:0.05", "none:2:0.0", "wasam:1:0.0", "saf:1:0.0"]
# where and when to perturb (sam_scope, sam_m, sam_start, sam_interval), average SAM
SAM_STEP, ASAM_STEP = "sam:2:0.05:sam_scope=step", "asam:1:0.0:sam_scope=step"
AVG_MICRO, AVG_STEP = "avg_sam:2:0.0", "avg_sam:2:0.0:sam_scope=step"
SCHEDULE = "sam:1:0.0:sam_start=0.3,sam_interval=2,sam_m=2"
# fp16 overflow on one process at its training forward call 5: SAM with accumulation 2 makes 4
# forward calls per optimizer step, so call 5 opens step 2, and a step always opens with pass 1
# of its first micro-batch (under "micro": pass 1, pass 2, pass 1, pass 2; under "step": the two
# passes 1, then the two passes 2)
OVERFLOW_STEP = "sam:2:0.05:sam_scope=step,num_train_epochs=2,overflow=1@5"
OVERFLOW_MICRO = "sam:2:0.0:num_train_epochs=2,overflow=0@5"
# GSAM (each rank decomposes its own gradients, then the directions are averaged), LookSAM (g_v
# from the all-reduced step gradients), ESAM (each rank its own subsets and samples)
GSAM, GSAM_STEP = "gsam:2:0.05:gsam_alpha=0.5", "gsam:1:0.0:sam_scope=step,gsam_alpha=0.5"
LOOKSAM, ESAM = "looksam:2:0.05:looksam_k=3,num_train_epochs=2", "esam:2:0.0:esam_beta=0.5"
FAMILY = [GSAM, GSAM_STEP, LOOKSAM, ESAM]
OVERFLOW_GSAM = "gsam:2:0.0:num_train_epochs=2,overflow=0@5"
ALL_RUNS = [*RUNS, SAM_STEP, ASAM_STEP, AVG_MICRO, AVG_STEP, SCHEDULE, OVERFLOW_STEP, OVERFLOW_MICRO, *FAMILY,
            OVERFLOW_GSAM]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = os.path.join(os.path.dirname(__file__), "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(out), *ALL_RUNS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)  # about 20 s when all goes well
    except subprocess.TimeoutExpired:  # e.g. the processes wait in different collectives
        proc.terminate()  # torchrun passes SIGTERM on to its workers (and SIGKILL 30 s later)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("the DDP runs hung:\n" + stdout[-3000:] + stderr[-5000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return {
        run: [torch.load(out / f"{run.replace(':', '_')}.rank{r}.pt", weights_only=True) for r in range(2)]
        for run in ALL_RUNS
    }


@pytest.mark.parametrize("run", RUNS[:3])
def test_two_processes_match_reference_from_each_ranks_micro_batches(ddp_results, run):
    method, grad_accum, clip, _ = parse_run(run)
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


# ---- where and when to perturb, under DDP ----------------------------------------------------------


def reference_setup(ranks, grad_accum):
    """(initial model, per-step per-rank micro-batches) of a run, checking both ranks took the same steps."""
    assert [r["world_size"] for r in ranks] == [2, 2]
    n_steps = ranks[0]["global_step"]
    assert ranks[1]["global_step"] == n_steps
    assert len(ranks[0]["batches"]) == n_steps * grad_accum
    initial = TinyNet()
    initial.load_state_dict(ranks[0]["initial"])
    return initial, [[r["batches"][t * grad_accum : (t + 1) * grad_accum] for r in ranks] for t in range(n_steps)]


def assert_final_weights(ranks, expected):
    for r in ranks:
        final = TinyNet()
        final.load_state_dict(r["final"])
        assert_same_weights(final, expected)


def assert_elsewhere(model, expected):
    assert not torch.allclose(model.fc1.weight, expected.fc1.weight, atol=1e-5)


@pytest.mark.parametrize("run", [SAM_STEP, ASAM_STEP])
def test_step_scope_perturbs_once_per_step_from_the_all_reduced_gradient(ddp_results, run):
    """n-SAM: one e per optimizer step, from the gradient of every rank's micro-batches together;
    with one micro-batch per step too, it is not m-SAM: the gradient is all-reduced over 2 ranks."""
    method, grad_accum, clip, _ = parse_run(run)
    ranks = ddp_results[run]
    initial, steps = reference_setup(ranks, grad_accum)
    perturbed = []
    expected = reference_where_and_when(
        initial, steps, method, rho=0.5, max_grad_norm=clip, scope="step", perturbed_losses=perturbed
    )
    assert_final_weights(ranks, expected)
    for r in ranks:  # L(w + e) of the step, averaged over ranks, logged on every step
        assert r["perturbed_loss"] == pytest.approx(perturbed, abs=1e-6)
    # one perturbation per rank (and micro-batch) from its own gradient ends elsewhere
    assert_elsewhere(reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, scope="micro"), expected)


def test_average_sam_draws_each_process_its_own_directions_under_the_micro_scope(ddp_results, monkeypatch):
    method, grad_accum, clip, _ = parse_run(AVG_MICRO)
    ranks = ddp_results[AVG_MICRO]
    initial, steps = reference_setup(ranks, grad_accum)
    losses = []
    expected = reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, seed=0, losses=losses)
    assert_final_weights(ranks, expected)
    for r in ranks:  # average SAM's loss is L(w + e); no perturbed_loss
        assert r["loss"] == pytest.approx(losses, abs=1e-6) and r["perturbed_loss"] == []
    # both ranks drawing the same directions (stream "all", each its own count) would end elsewhere
    draw = helpers.random_directions
    monkeypatch.setattr(helpers, "random_directions", lambda params, seed, stream, index: draw(params, seed, "all", index))
    assert_elsewhere(reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, seed=0), expected)


def test_average_sam_step_scope_draws_one_direction_per_step_for_all_processes(ddp_results):
    method, grad_accum, clip, _ = parse_run(AVG_STEP)
    ranks = ddp_results[AVG_STEP]
    initial, steps = reference_setup(ranks, grad_accum)
    losses = []
    expected = reference_where_and_when(
        initial, steps, method, rho=0.5, max_grad_norm=clip, scope="step", seed=0, losses=losses
    )
    assert_final_weights(ranks, expected)
    for r in ranks:
        assert r["loss"] == pytest.approx(losses, abs=1e-6) and r["perturbed_loss"] == []
    assert_elsewhere(reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, seed=0), expected)


def test_schedule_and_sam_m_under_ddp(ddp_results):
    method, grad_accum, clip, flat = parse_run(SCHEDULE)
    ranks = ddp_results[SCHEDULE]
    initial, steps = reference_setup(ranks, grad_accum)
    total = len(steps)
    first = max(1, math.ceil(flat["sam_start"] * total))  # the definition: t >= s and (t - s) % interval == 0
    scheduled = {t for t in range(1, total + 1) if t >= first and (t - first) % flat["sam_interval"] == 0}
    assert scheduled and len(scheduled) < total and 1 not in scheduled  # the start and the interval both act
    perturbed = []
    expected = reference_where_and_when(
        initial, steps, method, rho=0.5, max_grad_norm=clip, m=flat["sam_m"], perturbed_steps=scheduled,
        perturbed_losses=perturbed,
    )
    assert_final_weights(ranks, expected)
    for r in ranks:  # logged on the perturbed steps only
        assert r["perturbed_loss"] == pytest.approx([v for v in perturbed if v is not None], abs=1e-6)
    every_step = reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, m=flat["sam_m"])
    assert_elsewhere(every_step, expected)


@pytest.mark.parametrize("run", [OVERFLOW_STEP, OVERFLOW_MICRO, OVERFLOW_GSAM])
def test_fp16_overflow_in_pass_1_on_one_process_skips_the_step_on_both(ddp_results, run):
    """The inf of one process reaches the other through the all-reduce (of pass 1 under
    sam_scope="step", of pass 2 under "micro"): both skip the step and halve the scale alike.
    Decided on the device: pass 2 of that step runs too, at a non-finite w + e (under "step" on
    both processes, whose e comes from the all-reduced gradient), and its value stays out of the
    logged averages."""
    method, grad_accum, clip, flat = parse_run(run)
    overflow_rank, overflow_call = map(int, flat["overflow"].split("@"))
    calls_per_step = 2 * grad_accum  # (SAM) pass 1 and pass 2 of each micro-batch
    skipped = (overflow_call - 1) // calls_per_step + 1
    assert (overflow_call - 1) % calls_per_step == 0  # the step's first call: pass 1 of its first micro-batch
    ranks = ddp_results[run]
    initial, steps = reference_setup(ranks, grad_accum)
    total = len(steps)
    assert 1 < skipped < total
    assert [r["overflows"] for r in ranks] == [int(rank == overflow_rank) for rank in range(2)]
    scope = flat.get("sam_scope", "micro")
    calls = calls_per_step * total
    assert [r["forward_calls"] for r in ranks] == [calls, calls]
    for r in ranks:
        assert r["scales"] == {t: INIT_SCALE if t < skipped else INIT_SCALE / 2 for t in range(1, total + 1)}
        assert all(math.isfinite(v) for v in r["loss"] + r["perturbed_loss"])
        for t in range(1, total + 1):
            before = r["live"][t - 1] if t > 1 else r["initial"]
            assert all(torch.isfinite(v).all() for v in r["live"][t].values()), t
            unchanged = all(torch.equal(v, before[k]) for k, v in r["live"][t].items())
            assert unchanged == (t == skipped), t
    for t in range(1, total + 1):
        for k, v in ranks[0]["live"][t].items():
            assert torch.equal(v, ranks[1]["live"][t][k]), (t, k)
    # every other step is the exact SAM step (the loss scale is a power of 2)
    kept = steps[: skipped - 1] + steps[skipped:]
    if method == "gsam":
        expected = reference_flat_family(initial, kept, method, rho=0.5, max_grad_norm=clip, scope=scope)
    else:
        expected = reference_where_and_when(initial, kept, method, rho=0.5, max_grad_norm=clip, scope=scope)
    assert_final_weights(ranks, expected)


# ---- GSAM, LookSAM, ESAM under DDP -------------------------------------------------------------------


@pytest.mark.parametrize("run", FAMILY)
def test_gsam_looksam_esam_under_ddp_match_the_reference(ddp_results, run):
    """GSAM "micro": each rank decomposes its own micro-batches' gradients and the directions are
    averaged (the authors' "decompose per worker, then synchronize"); GSAM "step" and LookSAM: one
    perturbation from the all-reduced step gradient, g_v the same on both ranks; ESAM: each rank
    draws its own subsets (stream = its index) and selects among its own samples."""
    method, grad_accum, clip, flat = parse_run(run)
    ranks = ddp_results[run]
    initial, steps = reference_setup(ranks, grad_accum)
    options = dict(rho=0.5, max_grad_norm=clip, scope=flat.get("sam_scope", "micro"), seed=0)
    if method == "gsam":
        options.update(alpha=flat["gsam_alpha"])
    if method == "looksam":
        options.update(k=flat["looksam_k"], scope="step")
    if method == "esam":
        options.update(beta=flat["esam_beta"])
    perturbed = []
    expected = reference_flat_family(initial, steps, method, perturbed_losses=perturbed, **options)
    assert_final_weights(ranks, expected)
    for r in ranks:  # logged on the perturbed steps, the mean over both ranks
        assert r["perturbed_loss"] == pytest.approx([v for v in perturbed if v is not None], abs=1e-6)
    # GSAM "micro": decomposing the averaged gradients instead ends elsewhere; the others differ from SAM
    if method == "gsam" and options["scope"] == "micro":
        merged = reference_flat_family(initial, steps, method, **{**options, "scope": "step"})
        assert_elsewhere(merged, expected)
    else:
        assert_elsewhere(reference_where_and_when(initial, steps, "sam", rho=0.5, max_grad_norm=clip,
                                                  scope=options["scope"]), expected)
