"""Every flat method under FSDP2, with real processes: 2 (and 3) CPU processes (gloo) under torchrun
run the real Trainer code path with FSDP (tests/fsdp_train.py explains the one test-only patch that
lets accelerate turn FSDP on for CPU processes).

The references are those of tests/test_ddp.py: a single process holding the whole model, trained
by hand on both ranks' micro-batches. Under FSDP a two-pass method takes one perturbation per
optimizer step from the all-reduced step gradient (n-SAM), so its reference is
`reference_where_and_when(..., scope="step")`.
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddp_train import INIT_SCALE, parse_run
from fsdp_train import run_folder
from helpers import TinyNet, assert_same_weights, reference_where_and_when
from test_ddp import assert_elsewhere, reference_setup

SAM, ASAM = "sam:2:0.05", "asam:1:0.0"
AVG_SAM = "avg_sam:2:0.0:resume=2"
SWA, SWA_DDP = "swa:1:0.0:eval=1,resume=4", "swa:1:0.0:eval=1,ddp=1"
EMA, EMA_DDP = "ema:2:0.0:resume=2", "ema:2:0.0:ddp=1"
WASAM = "wasam:1:0.05:resume=6"
MESA, MESA_DDP = "mesa:1:0.0:resume=4", "mesa:1:0.0:ddp=1"
SAF, SAF_DDP = "saf:1:0.0", "saf:1:0.0:ddp=1"
# fp16 overflow on process 1 at its training forward call 5: n-SAM with accumulation 2 makes 4
# calls per optimizer step (the two passes 1, then the two passes 2), so call 5 opens step 2
OVERFLOW = "sam:2:0.05:overflow=1@5"
# Hugging Face heads (encoder classifier, decoder LM, seq2seq), each beside the same run under DDP
BERT_SAM, BERT_DDP = "sam:1:0.0:model=bert", "sam:1:0.0:model=bert,ddp=1,sam_scope=step"
GPT2_MESA, GPT2_DDP = "mesa:2:0.0:model=gpt2", "mesa:2:0.0:model=gpt2,ddp=1"
T5_SWA, T5_DDP = "swa:1:0.0:model=t5,eval=1", "swa:1:0.0:model=t5,eval=1,ddp=1"
HF_PAIRS = [(BERT_SAM, BERT_DDP), (GPT2_MESA, GPT2_DDP), (T5_SWA, T5_DDP)]
# GSAM and LookSAM under FSDP (one perturbation per step) beside the same n-SAM runs under DDP
GSAM, GSAM_DDP = "gsam:2:0.05:gsam_alpha=0.5", "gsam:2:0.05:gsam_alpha=0.5,ddp=1,sam_scope=step"
LOOKSAM, LOOKSAM_DDP = "looksam:1:0.05:looksam_k=3,resume=4", "looksam:1:0.05:looksam_k=3,ddp=1"
# LAWA's window kept as rows (the final window, steps 4-8, holds step 4, from before the resume)
LAWA, LAWA_DDP = "lawa:1:0.0:resume=4", "lawa:1:0.0:ddp=1"
FAMILY_PAIRS = [(GSAM, GSAM_DDP), (LOOKSAM, LOOKSAM_DDP), (LAWA, LAWA_DDP)]
RUNS = [SAM, ASAM, AVG_SAM, SWA, SWA_DDP, EMA, EMA_DDP, WASAM, MESA, MESA_DDP, SAF, SAF_DDP, OVERFLOW,
        *(run for pair in HF_PAIRS + FAMILY_PAIRS for run in pair)]
# 3 processes resume SWA's 2-process checkpoint-4 (copied into this run's folder)
SWA_3 = "swa:1:0.0:eval=1,resume=4,resume_only=1"
# FSDP from the README's accelerate config file, with no FSDP argument
FROM_CONFIG = "sam:1:0.0:model=bert,from_config=1"
ACCELERATE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate", "fsdp.yaml")


def launch(out, runs, processes=2, accelerate_config=None):
    script = os.path.join(os.path.dirname(__file__), "fsdp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if accelerate_config:  # the README's command, on this machine's CPUs
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                    "--num_processes", str(processes), "--mixed_precision", "no",
                    "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", "--main_process_port", "0"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, script, str(out), *runs]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)  # about 40 s when all goes well
    except subprocess.TimeoutExpired:  # e.g. the processes wait in different collectives
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("the FSDP runs hung:\n" + stdout[-3000:] + stderr[-5000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return {run: [torch.load(out / f"{run_folder(run)}.rank{r}.pt", weights_only=True) for r in range(processes)]
            for run in runs}


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    results = launch(out, RUNS)
    # another number of processes resumes the 2-process SWA run from its checkpoint-4
    os.makedirs(out / run_folder(SWA_3))
    shutil.copytree(out / run_folder(SWA) / "checkpoint-4", out / run_folder(SWA_3) / "checkpoint-4")
    results.update(launch(out, [SWA_3], processes=3))
    results.update(launch(out, [FROM_CONFIG], accelerate_config=ACCELERATE_CONFIG))
    results["out"] = out
    return results


def runs_of(results, run):
    ranks = [r["run"] for r in results[run]]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["sharded"] for r in ranks] == [not parse_run(run)[3].get("ddp"), not parse_run(run)[3].get("ddp")]
    return ranks


def assert_whole_weights(ranks, expected, atol=1e-5):
    for r in ranks:
        final = TinyNet()
        final.load_state_dict(r["final"])
        assert_same_weights(final, expected, atol=atol)


def test_the_runs_really_are_sharded(fsdp_results):
    ranks = runs_of(fsdp_results, SAM)
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.FSDP"] * 2
    assert "pytorch_model_fsdp_0" in ranks[0]["files"]  # the Trainer's own FSDP checkpoint
    assert runs_of(fsdp_results, SWA_DDP)[0]["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize("run", [SAM, ASAM])
def test_sam_and_asam_under_fsdp_equal_one_global_perturbation_per_step(fsdp_results, run):
    """Each rank perturbs its rows with e from the all-reduced step gradient and the all-reduced
    norm: the whole weights equal one process perturbing once per step over both ranks'
    micro-batches (ASAM's |w| + eta row by row)."""
    method, grad_accum, clip, _ = parse_run(run)
    ranks = runs_of(fsdp_results, run)
    initial, steps = reference_setup(ranks, grad_accum)
    perturbed = []
    expected = reference_where_and_when(
        initial, steps, method, rho=0.5, max_grad_norm=clip, scope="step", perturbed_losses=perturbed
    )
    assert_whole_weights(ranks, expected)
    for r in ranks:
        assert r["perturbed_loss"] == pytest.approx(perturbed, abs=1e-6)
    # a per-rank norm (composer's) or a per-rank perturbation would end elsewhere
    assert_elsewhere(reference_where_and_when(initial, steps, method, rho=0.5, max_grad_norm=clip, scope="micro"),
                     expected)


def test_average_sam_under_fsdp_draws_one_whole_direction_per_step_and_resumes_exactly(fsdp_results):
    method, grad_accum, clip, _ = parse_run(AVG_SAM)
    ranks = runs_of(fsdp_results, AVG_SAM)
    initial, steps = reference_setup(ranks, grad_accum)
    losses = []
    expected = reference_where_and_when(
        initial, steps, method, rho=0.5, max_grad_norm=clip, scope="step", seed=0, losses=losses
    )
    assert_whole_weights(ranks, expected)
    for r in ranks:
        assert r["loss"] == pytest.approx(losses, abs=1e-6)
    for r, resumed in zip(ranks, [x["resumed"] for x in fsdp_results[AVG_SAM]]):  # the count of draws is restored
        for k, v in resumed["final"].items():
            torch.testing.assert_close(v, r["final"][k], atol=1e-6, rtol=0)


def hand_average(ranks, method, start, decay=None):
    """SWA mean / EMA of the whole live weights recorded after steps start..T."""
    live, total = ranks[0]["live"], ranks[0]["global_step"]
    if method == "swa":
        return {k: torch.stack([live[t][k] for t in range(start, total + 1)]).mean(0) for k in live[total]}
    average = {k: v.clone() for k, v in live[start].items()}
    for t in range(start + 1, total + 1):
        for k in average:
            average[k] = decay * average[k] + (1 - decay) * live[t][k]
    return average


@pytest.mark.parametrize("run, ddp, method", [(SWA, SWA_DDP, "swa"), (EMA, EMA_DDP, "ema")])
def test_averages_under_fsdp_equal_the_ddp_run_and_the_hand_average(fsdp_results, run, ddp, method):
    ranks, ddp_ranks = runs_of(fsdp_results, run), runs_of(fsdp_results, ddp)
    total = ranks[0]["global_step"]
    assert total == ddp_ranks[0]["global_step"] == 32 // (2 * 4 * parse_run(run)[1]) * 2
    start = math.ceil(0.5 * total)
    expected = hand_average(ranks, method, start, decay=0.999)
    for r, d in zip(ranks, ddp_ranks):
        for k, v in r["final"].items():  # the final model holds the average
            torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0)
            torch.testing.assert_close(v, d["final"][k], atol=1e-6, rtol=0)  # ... the DDP run's
        for t in range(1, total + 1):  # the live trajectories are the same too
            for k, v in r["live"][t].items():
                torch.testing.assert_close(v, d["live"][t][k], atol=1e-6, rtol=0)


def test_evaluating_the_average_under_fsdp_restores_the_live_shards(fsdp_results):
    ranks, ddp_ranks = runs_of(fsdp_results, SWA), runs_of(fsdp_results, SWA_DDP)
    for r, d in zip(ranks, ddp_ranks):
        # evaluations at steps 2, 4, 6, 8; the average exists from step 4 on and differs from the live weights
        assert len(r["eval_avg_loss"]) == 4 and r["eval_avg_loss"][2:] != r["eval_loss"][2:]
        assert r["eval_loss"] == pytest.approx(d["eval_loss"], abs=1e-6)
        assert r["eval_avg_loss"] == pytest.approx(d["eval_avg_loss"], abs=1e-6)
    # training went on from the live weights after each evaluation (the trajectory equals DDP's, above)


def test_each_rank_keeps_the_average_of_its_own_rows_only(fsdp_results):
    """TinyNet's parameters have 6, 6, 3 and 3 rows: rank 0 holds 3, 3, 2, 2 of them and rank 1
    3, 3, 1, 1, so the two averages add up to one float32 copy of the weights."""
    ranks, ddp_ranks = runs_of(fsdp_results, SWA), runs_of(fsdp_results, SWA_DDP)
    whole = ranks[0]["whole_float32_bytes"]
    assert whole == 51 * 4 == ddp_ranks[0]["average_bytes"]  # under DDP each rank keeps a whole copy
    assert [r["average_bytes"] for r in ranks] == [29 * 4, 22 * 4]
    assert sum(r["average_bytes"] for r in ranks) == whole


@pytest.mark.parametrize("run", [SWA, EMA, WASAM, MESA, LOOKSAM, LAWA])
def test_resuming_under_fsdp_is_exact(fsdp_results, run):
    results = fsdp_results[run]
    last = fsdp_results["out"] / run_folder(run) / f"checkpoint-{results[0]['run']['global_step']}"
    assert "hf_flat_state-shard-00001-of-00002.safetensors" in os.listdir(last)
    for r in results:
        assert r["resumed"]["global_step"] == r["run"]["global_step"]
        for k, v in r["resumed"]["final"].items():
            torch.testing.assert_close(v, r["run"]["final"][k], atol=1e-6, rtol=0)


def test_wasam_under_fsdp_is_n_sam_then_swa(fsdp_results):
    method, grad_accum, clip, _ = parse_run(WASAM)
    ranks = runs_of(fsdp_results, WASAM)
    initial, steps = reference_setup(ranks, grad_accum)
    total = len(steps)
    trajectory = [reference_where_and_when(initial, steps[:t], "sam", rho=0.5, max_grad_norm=clip, scope="step")
                  for t in range(math.ceil(0.5 * total), total + 1)]
    expected = TinyNet()
    with torch.no_grad():
        for name, p in expected.named_parameters():
            p.copy_(torch.stack([dict(m.named_parameters())[name] for m in trajectory]).mean(0))
    assert_whole_weights(ranks, expected)


def test_mesa_under_fsdp_equals_the_ddp_run(fsdp_results):
    """The sharded teacher (this rank's rows, swapped into the model for its forward pass) gives
    the same training as DDP's whole float32 copy."""
    ranks, ddp_ranks = runs_of(fsdp_results, MESA), runs_of(fsdp_results, MESA_DDP)
    for r, d in zip(ranks, ddp_ranks):
        for k, v in r["final"].items():
            torch.testing.assert_close(v, d["final"][k], atol=1e-6, rtol=0)
        assert r["loss"] == pytest.approx(d["loss"], abs=1e-6)
    # the term is on from epoch 0 (from step 2 on, when the teacher is no longer the model): without
    # it the weights differ. (SAF is off in epoch 0: its step 2 is a plain one.)
    plain = runs_of(fsdp_results, SAF_DDP)[0]["live"][2]
    assert any(not torch.allclose(v, plain[k], atol=1e-6) for k, v in ranks[0]["live"][2].items())


def test_saf_under_fsdp_equals_the_ddp_run(fsdp_results):
    ranks, ddp_ranks = runs_of(fsdp_results, SAF), runs_of(fsdp_results, SAF_DDP)
    for r, d in zip(ranks, ddp_ranks):
        for k, v in r["final"].items():
            torch.testing.assert_close(v, d["final"][k], atol=1e-6, rtol=0)


def test_fp16_overflow_under_fsdp_skips_the_step_on_both_processes(fsdp_results):
    """The overflow of process 1 in pass 1 reaches every rank through the reduce-scatter and the
    all-reduced norm: every process's e and pass-2 gradient are non-finite (decided on the device,
    pass 2 runs), the ShardedGradScaler skips the step and halves the scale everywhere, and no
    weight becomes NaN."""
    method, grad_accum, clip, flat = parse_run(OVERFLOW)
    ranks = runs_of(fsdp_results, OVERFLOW)
    initial, steps = reference_setup(ranks, grad_accum)
    total, skipped = len(steps), 2
    assert [r["overflows"] for r in ranks] == [0, 1]
    calls = 2 * grad_accum * total  # (pass 2 of the skipped step runs too, at a non-finite w + e)
    assert [r["forward_calls"] for r in ranks] == [calls, calls]
    for r in ranks:
        assert r["scales"] == {t: INIT_SCALE if t < skipped else INIT_SCALE / 2 for t in range(1, total + 1)}
        for t in range(1, total + 1):
            before = r["live"][t - 1] if t > 1 else r["initial"]
            assert all(torch.isfinite(v).all() for v in r["live"][t].values()), t
            assert all(torch.equal(v, before[k]) for k, v in r["live"][t].items()) == (t == skipped), t
    kept = steps[: skipped - 1] + steps[skipped:]
    assert_whole_weights(ranks, reference_where_and_when(initial, kept, method, rho=0.5, max_grad_norm=clip, scope="step"))


def test_three_processes_resume_a_two_process_checkpoint(fsdp_results):
    """The flat state is stored by rows of the whole parameters: 3 processes each take their rows
    of the 2-process run's average at step 4 (its first snapshot: the live weights of step 4)."""
    two = runs_of(fsdp_results, SWA)[0]
    snapshot = two["live"][4]
    ranks = [r["resumed"] for r in fsdp_results[SWA_3]]
    assert [r["world_size"] for r in ranks] == [3, 3, 3]
    for index, r in enumerate(ranks):
        restored = r["restored_average"]
        assert set(restored) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        for name, rows in restored.items():
            n = snapshot[name].shape[0]
            chunk = math.ceil(n / 3)
            torch.testing.assert_close(rows, snapshot[name][index * chunk : (index + 1) * chunk], atol=0, rtol=0)
        assert r["global_step"] > 4  # and training went on to the end


@pytest.mark.parametrize("run, ddp", HF_PAIRS + FAMILY_PAIRS + [(FROM_CONFIG, BERT_DDP)])
def test_hugging_face_heads_under_fsdp_equal_the_same_run_under_ddp(fsdp_results, run, ddp):
    """BERT with SAM (n-SAM under DDP for the comparison), GPT-2 with MESA's per-token term, T5 with
    SWA and evaluation; GSAM (its decomposition from all-reduced inner products and norms) and
    LookSAM (its g_v kept as rows) on TinyNet; and BERT under FSDP set up by
    examples/accelerate/fsdp.yaml alone."""
    ranks, ddp_ranks = runs_of(fsdp_results, run), runs_of(fsdp_results, ddp)
    assert ranks[0]["global_step"] == ddp_ranks[0]["global_step"] > 0
    for r, d in zip(ranks, ddp_ranks):
        assert r["final"].keys() == d["final"].keys()
        for k, v in r["final"].items():
            torch.testing.assert_close(v, d["final"][k], atol=2e-5, rtol=0, msg=k)
        assert r["loss"] == pytest.approx(d["loss"], abs=1e-5)
        assert r["eval_avg_loss"] == pytest.approx(d["eval_avg_loss"], abs=1e-5)
    assert all(r["perturbed_loss"] for r in ranks) == (parse_run(run)[0] in ("sam", "gsam", "looksam"))


def test_memory_of_the_average_and_the_teacher_per_rank(fsdp_results):
    """The figures the README reports: each rank's average (T5 with SWA) and teacher (GPT-2 with
    MESA), against one whole float32 copy of the trainable weights, under FSDP and DDP."""
    lines = []
    for run, ddp, key in [(T5_SWA, T5_DDP, "average_bytes"), (GPT2_MESA, GPT2_DDP, "teacher_bytes")]:
        ranks, ddp_ranks = runs_of(fsdp_results, run), runs_of(fsdp_results, ddp)
        whole = ranks[0]["whole_float32_bytes"]
        shares = [r[key] / whole for r in ranks]
        assert [r[key] for r in ddp_ranks] == [whole, whole]  # DDP: a whole copy on every rank
        assert sum(r[key] for r in ranks) == whole and all(0.45 < s < 0.55 for s in shares), shares
        lines.append(f"{run}: {key} per rank {[r[key] for r in ranks]} of {whole} ({', '.join(f'{s:.3f}' for s in shares)})")
    print("\n".join(lines))
