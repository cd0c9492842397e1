"""benchmarks/gpu_step_time.py: its CPU dry run end to end (every model, every method, both
precisions, the child processes, the tables), and the noise check's verdict on made-up figures."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step_time.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_step_time as bench  # imports nothing heavy: torch only inside its functions


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bench")
    md, out = tmp / "bench.md", tmp / "bench.json"
    started = time.time()
    # as from a checkout that is not installed: the script puts the repository root on sys.path itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, SCRIPT, "--dry_run", "--markdown", str(md), "--output", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"dry run: {time.time() - started:.1f} s")
    return json.loads(out.read_text()), md.read_text(), proc.stderr


def test_dry_run_measures_every_model_and_method(dry_run):
    data, text, log = dry_run
    assert data["dry_run"] and not data["trustworthy"] and not data["failures"]
    assert set(data["results"]) == set(bench.CASES)
    for case, spec in bench.CASES.items():
        rows = data["results"][case]
        assert list(rows) == spec["methods"], case
        for method, row in rows.items():
            assert row["rounds"] == 2 and len(row["step_ms_rounds"]) == 2, (case, method)
            assert row["step_ms"] > 0 and row["whole_run_ms"] > 0
            assert row["ratio_median"] > 0 and len(row["ratio_median_rounds"]) == 2
        assert rows["plain"]["ratio_median"] == 1.0
    for process in data["processes"].values():
        assert not process["errors"] and process["rounds_done"] == 2
    # every method of the registry (hf_flat.args) has a row on the target models
    from hf_flat.args import AVERAGING_METHODS, PERTURBATION_METHODS

    for case in ("vit_b32", "roberta"):
        assert set(PERTURBATION_METHODS) | set(AVERAGING_METHODS) | {"plain", "none", "wasam"} <= set(
            data["results"][case])
    # the trajectory and schedule set-ups are those of the GPU run: SAF's term on, LookSAM's SAM steps 1 in 5
    assert data["results"]["vit_b32"]["looksam"]["perturbed_steps"] == 1  # T = 5: one SAM step
    assert data["results"]["vit_b32"]["sam"]["perturbed_steps"] == 5
    # both precisions ran: fp16 on the CPU if this torch allows it, else float32, and then it says so
    used = data["processes"]["vit"]["precision_used"]
    assert used["vit_b32"] == "bf16" and used["vit_b100"] == "bf16"
    assert used["vit_b32_fp16"] == "fp16" or ("float32" in data["processes"]["vit"]["fp16_note"]
                                              and "float32" in text)
    assert data["processes"]["lm"]["model_counts"]["lm_lora"]["trainable"] < data["processes"]["lm"][
        "model_counts"]["lm"]["trainable"]
    assert "estimated time on an H100-class GPU" in log and data["estimate_h100_s"] > 0


def test_dry_run_tables(dry_run):
    data, text, _ = dry_run
    assert text.count("\n# ") == 0 and text.startswith("# GPU step time")
    assert "**DRY RUN on the CPU" in text and "**These figures are NOT TRUSTWORTHY: this is a dry run" in text
    for key in ("device", "torch", "transformers", "accelerate", "peft", "hf_flat_commit"):
        assert data["machine"][key], key
    # the noise check: one row per model, in both files
    assert "## Noise check" in text
    assert set(data["noise_check"]) == set(bench.CASES)
    for case, check in data["noise_check"].items():
        assert "none_vs_plain_median" in check and isinstance(check["ok"], bool)
        assert f"| {case} | {check['none_vs_plain_median']:.3f}x |" in text
    # the targets: every target on both target models, with pass/fail
    assert "## Targets" in text and "| model | method | target | measured |" in text
    targets = {(t["case"], t["method"]) for t in data["targets"]}
    assert targets == {(c, m) for c in ("vit_b32", "roberta") for m in bench.TARGETS}
    for t in data["targets"]:
        assert t["value"] is not None and isinstance(t["passed"], bool)
        assert t["miss"] == 0.0 if t["passed"] else t["miss"] > 0
        assert f"| {t['case']} | {t['method']} | {t['target']}" in text
    # a table per model, a row per method
    for case, spec in bench.CASES.items():
        section = text.split(f"(`{case}`)")[1].split("\n## ")[0]
        for method in spec["methods"]:
            assert f"\n| {method} | " in section, (case, method)


def made_up(none_ratio, steps=30, rounds=3):
    """A report from made-up runs: plain 10 ms, none `none_ratio` x that, sam 2.1x, saf 1.0x."""
    runs = {}
    for method, ratio in (("plain", 1.0), ("none", none_ratio), ("sam", 2.1), ("saf", 1.0), ("wasam", 2.2)):
        runs[method] = [{"round": r + 1, "median_ms": 10 * ratio, "mean_ms": 10 * ratio, "steps_ms": [10 * ratio] * 4,
                         "peak_extra_mb": None, "perturbed_steps": None} for r in range(rounds)]
    opts = bench.parse(["--cases", "vit_b32", "--steps", str(steps)])
    cases = {"vit_b32": list(runs)}
    results = {"vit_b32": bench.summarise("vit_b32", cases["vit_b32"], runs, opts)}
    info = {"vit": {"rounds_done": rounds, "round_s": [1.0] * rounds, "stopped": None, "process_s": 1.0, "errors": {},
                    "device": "made up", "model_counts": {}, "build_s": 0.0, "fp16_note": ""}}
    return bench.assemble(opts, cases, results, info, {}, [], 60.0, 1.0, 1.0)


def test_noise_check_decides_trust():
    good = made_up(1.015)
    assert good["trustworthy"] and good["noise_check"]["vit_b32"]["ok"]
    assert "NOT TRUSTWORTHY" not in bench.markdown(good)
    bad = made_up(0.97)
    text = bench.markdown(bad)
    assert not bad["trustworthy"] and not bad["noise_check"]["vit_b32"]["ok"]
    assert "**These figures are NOT TRUSTWORTHY" in text and "outside +-2% on vit_b32" in text
    # too few rounds or steps: not trusted either
    assert not made_up(1.0, rounds=2)["trustworthy"] and not made_up(1.0, steps=20)["trustworthy"]
    # the targets: sam 2.1x misses 2.05x by 0.05x; saf passes; wasam is 0.1 above sam
    targets = {t["method"]: t for t in good["targets"]}
    assert not targets["sam"]["passed"] and abs(targets["sam"]["miss"] - 0.05) < 1e-9
    assert targets["saf"]["passed"] and targets["saf"]["miss"] == 0.0
    assert not targets["wasam"]["passed"] and abs(targets["wasam"]["value"] - 0.1) < 1e-9
    assert "| vit_b32 | sam | SAM: <= 2.05x | 2.100x |" in bench.markdown(good)


def test_budget_drops_optional_models_first():
    opts = bench.parse([])
    full, _ = bench.estimate_s(bench.plan(opts), opts.steps, opts.warmup, opts.rounds)
    assert full <= 8 * 60  # the whole run is planned to fit 8 minutes on an H100-class GPU
    cases = bench.plan(opts)
    for name in bench.OPTIONAL_CASES:
        del cases[name]
    core, _ = bench.estimate_s(cases, opts.steps, opts.warmup, opts.rounds)
    assert set(cases) == {"vit_b32", "roberta"} and core < full
