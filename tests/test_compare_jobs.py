"""`hf-flat compare`: runs forked from a preloading worker give what fresh processes give, `--jobs`
runs them side by side with the same table, per-method grids, and runs that crash or are killed."""

import json
import os
import textwrap

import pytest

from hf_flat.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_VIT = os.path.join(ROOT, "examples", "vit", "run_vit.py")

SLEEPY = textwrap.dedent('''
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--flat_method"); p.add_argument("--seed", type=int); p.add_argument("--output_dir")
    p.add_argument("--holdout_fraction", type=float, default=0.0)
    p.add_argument("--sam_rho", type=float, default=0.05)
    a = p.parse_args()
    start = time.time()
    print(f"pid {os.getpid()} parent {os.getppid()}", flush=True)
    if a.flat_method == "asam" and a.seed == 1:
        raise RuntimeError("asam seed 1 raises")
    if a.flat_method == "asam" and a.seed == 2:
        os.kill(os.getpid(), 9)
    time.sleep(0.6)
    score = {"none": 0.5, "sam": 0.6, "asam": 0.7}[a.flat_method] + 0.01 * a.seed - abs(a.sam_rho - 0.1)
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump({"eval_accuracy": score, "start": start, "end": time.time(), "pid": os.getpid(), "ppid": os.getppid()},
              open(os.path.join(a.output_dir, "all_results.json"), "w"))
''')


def _run(tmp_path, *options, name="out"):
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEPY)
    out = tmp_path / name
    code = main(["compare", "--script", str(script), "--output_dir", str(out), "--quiet", *options])
    return code, json.loads((out / "comparison.json").read_text())


def test_jobs_run_side_by_side_and_give_the_same_table(tmp_path):
    common = ("--methods", "none", "sam", "--seeds", "0", "1", "--grid", "sam_rho=0.05,0.1,0.2")
    code1, one = _run(tmp_path, *common, name="one")
    code2, two = _run(tmp_path, *common, "--jobs", "2", name="two")
    assert code1 == code2 == 0
    assert one["chosen"] == two["chosen"] == {"none": {}, "sam": {"sam_rho": "0.1"}}
    assert [(r["method"], r["mean"], r["se"]) for r in one["table"]] == [(r["method"], r["mean"], r["se"]) for r in two["table"]]
    assert two["jobs"] == 2 and two["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    # runs overlap in time with --jobs 2 (each sleeps 0.6 s), never with one job
    def overlaps(result):
        spans = sorted((r["metrics"]["start"], r["metrics"]["end"]) for r in result["runs"])
        return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlaps(two) and not overlaps(one)
    # every run is a child of a worker, not of compare, and the workers serve several runs each
    parents = {r["metrics"]["ppid"] for r in two["runs"]} | {r["metrics"]["ppid"] for t in two["tuning"]["sam"] for r in [t]}
    assert os.getpid() not in parents and len(parents) <= 2
    assert len({r["metrics"]["pid"] for r in two["runs"]}) == 4


def test_fresh_processes_are_children_of_compare(tmp_path):
    code, result = _run(tmp_path, "--methods", "none", "--seeds", "0", "1", "--fresh_processes")
    assert code == 0 and {r["metrics"]["ppid"] for r in result["runs"]} == {os.getpid()}


def test_a_run_that_raises_or_is_killed_fails_alone(tmp_path):
    code, result = _run(tmp_path, "--methods", "none", "asam", "--seeds", "0", "1", "2", "--jobs", "2")
    assert code == 1
    failed = {(f["method"], f["seed"]): f["failed"] for f in result["failures"]}
    assert failed == {("asam", 1): "exit code 1", ("asam", 2): "exit code -9"}
    log = open(os.path.join(result["failures"][0]["folder"], "log.txt")).read()
    assert "RuntimeError: asam seed 1 raises" in log and "Traceback" in log
    assert {(r["method"], r["seed"]) for r in result["runs"] if "metrics" in r} == {("none", 0), ("none", 1),
                                                                                    ("none", 2), ("asam", 0)}


def test_method_grids_replace_the_common_one_and_one_value_is_not_tuned(tmp_path):
    code, result = _run(tmp_path, "--methods", "none", "sam", "asam", "--seeds", "0",
                        "--grid", "sam_rho=0.05,0.1", "--grid", "asam:sam_rho=0.2,0.3", "--jobs", "2")
    assert code == 0
    assert result["chosen"] == {"none": {}, "sam": {"sam_rho": "0.1"}, "asam": {"sam_rho": "0.2"}}
    assert sorted(t["settings"]["sam_rho"] for t in result["tuning"]["asam"]) == ["0.2", "0.3"]
    code, result = _run(tmp_path, "--methods", "none", "sam", "--seeds", "0", "--grid", "sam:sam_rho=0.2", name="fixed")
    assert code == 0 and "sam" not in result["tuning"] and result["chosen"]["sam"] == {"sam_rho": "0.2"}


@pytest.mark.parametrize("grid, message", [
    ("swa:sam_rho=0.1,0.2", "'swa' is not one of --methods"),
    ("none:sam_rho=0.1,0.2", "sam_rho does not change a run of none"),
    (":sam_rho=0.1", "expected [METHOD:]NAME=V1,V2"),
])
def test_bad_method_grids_are_refused_before_training(tmp_path, capsys, grid, message):
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEPY)
    assert main(["compare", "--script", str(script), "--output_dir", str(tmp_path / "o"), "--methods", "none", "sam",
                 "--grid", grid]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()


def test_preloaded_runs_equal_fresh_processes_on_the_real_script(tmp_path):
    """run_vit.py on digits, forked from the worker or started fresh: the same numbers, to the bit."""
    common = ["compare", "--script", RUN_VIT, "--methods", "none", "sam", "--seeds", "3", "--quiet", "--threads", "1",
              "--", "--num_train_epochs", "1", "--max_train_samples", "128", "--max_eval_samples", "64"]
    results = []
    for name, extra in (("forked", []), ("fresh", ["--fresh_processes"])):
        argv = common[:common.index("--")] + ["--output_dir", str(tmp_path / name), *extra] + common[common.index("--"):]
        assert main(argv) == 0
        saved = json.loads((tmp_path / name / "comparison.json").read_text())
        results.append({r["method"]: {k: r["metrics"][k] for k in ("eval_accuracy", "eval_loss", "train_loss")}
                        for r in saved["runs"]})
    assert results[0] == results[1]
