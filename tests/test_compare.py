"""`hf-flat compare`: the table maths by hand, grid search on held-out data, failures, reuse keyed on
the whole command, checks of grid names and metrics before training, the percent rule, warnings."""

import csv
import json
import math
import textwrap

import pytest

from hf_flat.commands.compare import markdown, mean_and_se, table
from hf_flat.cli import main

FAKE_SCRIPT = textwrap.dedent('''
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?"); p.add_argument("--flat_method"); p.add_argument("--seed", type=int)
    p.add_argument("--output_dir"); p.add_argument("--holdout_fraction", type=float, default=0.0)
    p.add_argument("--sam_rho", type=float, default=0.05); p.add_argument("--average_start", type=float, default=0.75)
    p.add_argument("--num_train_epochs", type=int)
    a = p.parse_args()
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    print(f"fake epoch 1/1 of {a.flat_method} seed {a.seed}", flush=True)
    if a.flat_method == "asam":
        sys.exit("asam is broken in this fake script")
    score = {"none": 0.80, "sam": 0.84, "swa": 0.81, "wasam": 0.85}[a.flat_method] + 0.01 * a.seed
    if a.flat_method in ("sam", "wasam"):
        score -= abs(a.sam_rho - 0.1)  # the held-out optimum is rho = 0.1
    if a.holdout_fraction:
        score += 0.5  # held-out scores differ from test scores
    results = {"eval_accuracy": score, "eval_loss": 2.5 - 2 * score, "epochs": a.num_train_epochs,
               "flat_method": a.flat_method, "flat_settings": {"sam_rho": a.sam_rho} if "sam" in a.flat_method else {},
               "flat_warnings": ["SWA took a single snapshot"] if a.flat_method == "swa" else []}
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump(results, open(os.path.join(a.output_dir, "all_results.json"), "w"))
''')


def test_mean_and_standard_error_by_hand():
    mean, se = mean_and_se([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and se == pytest.approx(0.02 / math.sqrt(3))
    assert mean_and_se([0.5]) == (0.5, 0.0)


def test_table_differences_and_bolding_by_hand():
    scores = {"none": [0.80, 0.82, 0.84], "sam": [0.85, 0.86, 0.87], "swa": [0.70, 0.71, 0.72], "wasam": [0.84, 0.86, 0.88]}
    rows = {r["method"]: r for r in table(scores)}
    se_none, se_sam = 0.02 / math.sqrt(3), 0.01 / math.sqrt(3)
    assert rows["none"]["mean"] == pytest.approx(0.82) and rows["none"]["se"] == pytest.approx(se_none)
    assert rows["sam"]["difference"] == pytest.approx(0.04)
    assert rows["sam"]["difference_se"] == pytest.approx(math.sqrt(se_sam**2 + se_none**2))
    assert rows["swa"]["difference"] == pytest.approx(-0.11)
    # best: sam (0.86, first of the tie); within one SE of it (0.86 - 0.0058): sam and wasam
    assert [m for m, r in rows.items() if r["bold"]] == ["sam", "wasam"]
    text = markdown(table(scores), "eval_accuracy", scale=100)
    assert "| none | 82.00 ± 1.15 | 3 |" in text
    assert "| sam | **+4.00 ± 1.29** | 3 |" in text and "| swa | -11.00 ± 1.29 | 3 |" in text
    lower = {r["method"]: r for r in table({"a": [1.0, 1.2], "b": [0.5, 0.7]}, lower_is_better=True)}
    assert lower["b"]["bold"] and not lower["a"]["bold"]


def test_runs_tunes_on_held_out_data_reports_failures_and_resumes(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(FAKE_SCRIPT)
    out = tmp_path / "out"
    argv = ["compare", "--script", str(script), "--methods", "none", "sam", "asam", "--seeds", "0", "1",
            "--grid", "sam_rho=0.05,0.1,0.2", "--output_dir", str(out), "--", "--num_train_epochs", "3"]
    assert main(argv) == 1  # a method failed
    captured = capsys.readouterr()
    printed = captured.out
    result = json.loads((out / "comparison.json").read_text())
    # asam's tuning runs all failed: no silent fall-back to its defaults, asam is not run
    assert result["chosen"] == {"none": {}, "sam": {"sam_rho": "0.1"}, "asam": None}
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    tuning_calls = [c for c in calls if "--holdout_fraction" in c]
    assert len(tuning_calls) == 6  # 3 rho values for sam and for asam, on held-out data, seed 0
    assert len(calls) == 6 + 4 and not any("asam" in c for c in calls[6:])
    rows = {r["method"]: r for r in result["table"]}
    assert rows["none"]["mean"] == pytest.approx(0.805) and rows["sam"]["mean"] == pytest.approx(0.845)
    assert rows["asam"]["n"] == 0 and "all runs failed" in printed
    assert "1 run(s) failed" in printed and "tune-asam (all 3 tuning runs failed" in printed
    assert [f["name"] for f in result["failures"]] == ["tune-asam"]
    assert all("--num_train_epochs 3" in c for c in calls)
    assert "fake epoch 1/1 of sam seed 1" in captured.err  # each run's output is streamed while it runs
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 and all(",ok," in line for line in csv_lines[1:])

    assert main(argv) == 1  # resume: finished runs are not run again, failed ones are retried
    again = (tmp_path / "calls.txt").read_text().splitlines()[len(calls):]
    assert len(again) == 3 and all("asam" in c for c in again)


def _compare(tmp_path, *options, extra=("--num_train_epochs", "3")):
    script = tmp_path / "train.py"
    if not script.exists():
        script.write_text(FAKE_SCRIPT)
    return main(["compare", "--script", str(script), "--output_dir", str(tmp_path / "out"), *options, "--", *extra])


def _calls(tmp_path):
    path = tmp_path / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_reuse_is_keyed_on_the_whole_command_and_reported(tmp_path, capsys):
    grid = ("--methods", "none", "sam", "--seeds", "0", "1", "--grid", "sam_rho=0.05,0.1")
    assert _compare(tmp_path, *grid) == 0
    first = len(_calls(tmp_path))
    assert first == 2 + 4
    capsys.readouterr()

    assert _compare(tmp_path, *grid) == 0  # the same command: everything reused, and said so
    assert len(_calls(tmp_path)) == first
    assert capsys.readouterr().err.count("reused") == 6
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert all(r["reused"] for r in result["runs"]) and all(r["reused"] for r in result["tuning"]["sam"])
    assert all(line.split(",")[5] == "reused" for line in (tmp_path / "out" / "runs.csv").read_text().splitlines()[1:])

    # a changed grid reruns sam, and the table names the values it ran with; one value has nothing to
    # choose from: no tuning run, and the table says the value was given
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "1", "--grid", "sam_rho=0.02") == 0
    new = _calls(tmp_path)[first:]
    assert len(new) == 2 and all("--sam_rho 0.02" in c and "--holdout_fraction" not in c for c in new)
    assert "| sam | sam_rho=0.02 (given: one value each, not tuned) |" in (tmp_path / "out" / "comparison.md").read_text()
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    sam = [r for r in rows if r["method"] == "sam"]
    assert [json.loads(r["settings"]) for r in sam] == [{"sam_rho": "0.02"}] * 2 and not any(r["reused"] for r in sam)
    assert [r["reused"] for r in rows if r["method"] == "none"] == ["reused"] * 2
    assert float(sam[0]["eval_accuracy"]) == pytest.approx(0.84 - 0.08)

    # changed script arguments rerun everything
    done = len(_calls(tmp_path))
    assert _compare(tmp_path, *grid, extra=("--num_train_epochs", "4")) == 0
    assert len(_calls(tmp_path)) == done + 6


def test_misspelled_grid_name_fails_before_any_training(tmp_path, capsys):
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "--grid", "sam_roh=0.05,0.1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grid sam_roh" in err[0] and "sam_rho" in err[0]
    assert _calls(tmp_path) == [] and not (tmp_path / "out" / "comparison.json").exists()
    # a flag compare sets itself may not be given after --
    assert _compare(tmp_path, "--methods", "none", "--seeds", "0", extra=("--seed", "3")) == 2
    assert "--seed after '--'" in capsys.readouterr().err and _calls(tmp_path) == []


def test_misspelled_metric_stops_after_the_first_run_and_lists_the_keys(tmp_path, capsys):
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "1", "--metric", "eval_acc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--metric eval_acc" in err[-1] and "eval_accuracy, eval_loss" in err[-1]
    assert len(_calls(tmp_path)) == 1
    # the finished run is kept: the corrected command reuses it
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "1") == 0
    assert len(_calls(tmp_path)) == 1 + 3


def test_only_fractions_are_shown_in_percent(tmp_path, capsys):
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "1",
                    "--metric", "eval_loss", "--lower_is_better") == 0
    text = (tmp_path / "out" / "comparison.md").read_text()
    # loss = 2.5 - 2 accuracy: none 0.9 and 0.88 (mean 0.89, SE 0.01); sam (rho 0.05) 0.92 and 0.90
    assert "| method | eval_loss (baseline)" in text
    assert "| none | **0.89 ± 0.01** | 2 |" in text and "| sam | +0.02 ± 0.01414 | 2 |" in text
    assert not json.loads((tmp_path / "out" / "comparison.json").read_text())["shown_in_percent"]
    capsys.readouterr()
    assert _compare(tmp_path, "--methods", "none", "sam", "--seeds", "0", "1") == 0
    assert "| none | **80.50 ± 0.50** | 2 |" in capsys.readouterr().out
    assert "eval_accuracy (%)" in (tmp_path / "out" / "comparison.md").read_text()


def test_warnings_config_and_chosen_settings_are_reported(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"num_train_epochs": 2}))
    assert _compare(tmp_path, "--methods", "none", "swa", "sam", "--seeds", "0", "1", "--config", str(config),
                    "--grid", "sam_rho=0.1,0.2", "--quiet") == 0
    captured = capsys.readouterr()
    assert "fake epoch" not in captured.err  # --quiet: one line per run only
    # the config goes first: SCRIPT cfg.json --flag ...
    assert all(c.startswith(f"{config} ") for c in _calls(tmp_path))
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| swa† |" in text and "- † swa: SWA took a single snapshot (swa-seed0, swa-seed1)" in text
    assert "SWA took a single snapshot" in captured.out
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert result["warnings"] == {"swa": {"SWA took a single snapshot": ["swa-seed0", "swa-seed1"]}}
    assert "| sam | sam_rho=0.1 | sam_rho=0.1 |" in text and "| none | - | - |" in text

    # a changed config is a changed command: the runs are not reused
    before = len(_calls(tmp_path))
    config.write_text(json.dumps({"num_train_epochs": 5}))
    assert _compare(tmp_path, "--methods", "none", "--seeds", "0", "--config", str(config)) == 0
    assert len(_calls(tmp_path)) == before + 1


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "(default: eval_accuracy)" in text and "(default: auto)" in text and "(default: 0.1)" in text


def test_each_run_uses_the_same_thread_count_whatever_the_environment(tmp_path, monkeypatch):
    """The trained weights depend on the number of CPU threads (the order of floating-point sums):
    compare sets it for every run (default: the CPUs it may use), records it, and keys reuse on it."""
    import os

    script = tmp_path / "threads.py"
    script.write_text(FAKE_SCRIPT.replace(
        'results = {"eval_accuracy": score,', 'results = {"threads": os.environ.get("OMP_NUM_THREADS"), "eval_accuracy": score,'))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # what the user's shell happens to say is ignored
    out = tmp_path / "out"
    argv = ["compare", "--script", str(script), "--methods", "none", "sam", "--seeds", "0", "--output_dir", str(out), "--quiet"]
    assert main(argv) == 0
    saved = json.loads((out / "comparison.json").read_text())
    expected = len(os.sched_getaffinity(0))
    assert saved["threads"] == expected
    assert {r["metrics"]["threads"] for r in saved["runs"]} == {str(expected)}
    folders = {r["folder"] for r in saved["runs"]}
    assert main([*argv, "--threads", "3"]) == 0
    saved = json.loads((out / "comparison.json").read_text())
    assert {r["metrics"]["threads"] for r in saved["runs"]} == {"3"} and saved["threads"] == 3
    assert not folders & {r["folder"] for r in saved["runs"]}  # not reused from the runs with other threads


TUNING_SEEDS_SCRIPT = textwrap.dedent('''
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--flat_method"); p.add_argument("--seed", type=int); p.add_argument("--output_dir")
    p.add_argument("--holdout_fraction", type=float, default=0.0); p.add_argument("--sam_rho", type=float, default=0.05)
    a = p.parse_args()
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if a.flat_method == "wasam" and a.sam_rho == 0.1 and a.seed == 11:
        sys.exit("this combination fails on one tuning seed")
    best = {10: 0.05, 11: 0.1, 12: 0.1}.get(a.seed, 0.1)  # each tuning seed's own held-out optimum
    score = 0.9 - abs(a.sam_rho - best) if a.flat_method != "none" else 0.8
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump({"eval_accuracy": score, "flat_method": a.flat_method}, open(os.path.join(a.output_dir, "all_results.json"), "w"))
''')


def test_several_tuning_seeds_choose_by_the_mean_and_report_how_stable_the_choice_is(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TUNING_SEEDS_SCRIPT)
    out = tmp_path / "out"
    assert main(["compare", "--script", str(script), "--methods", "none", "sam", "wasam", "--seeds", "0", "1",
                 "--tuning_seeds", "10", "11", "12", "--grid", "sam_rho=0.05,0.1,0.2", "--output_dir", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    tuning = [c for c in calls if "--holdout_fraction" in c]
    assert len(tuning) == 2 * 3 * 3 and {c.split("--seed ")[1].split()[0] for c in tuning} == {"10", "11", "12"}
    # sam, by hand: mean held-out score over seeds 10, 11, 12 of 0.9 - |rho - best_seed|:
    # 0.05 -> 0.9 - (0 + 0.05 + 0.05) / 3, 0.1 -> 0.9 - 0.05 / 3, 0.2 -> 0.9 - 0.35 / 3: 0.1 wins, and it is
    # the own best of seeds 11 and 12, not of the first tuning seed, 10 (0.05)
    assert result["chosen"]["sam"] == {"sam_rho": "0.1"}
    assert result["stability"]["sam"]["agree"] == 2
    assert result["stability"]["sam"]["each_seed_chose"]["10"] == {"sam_rho": "0.05"}
    assert result["stability"]["sam"]["mean_scores"]["sam_rho=0.05"] == pytest.approx(0.9 - 0.1 / 3)
    # wasam: rho 0.1 failed on seed 11, so its mean over the two seeds it ran (0.9 - 0.025) does not count; of
    # the combinations that ran on every seed, 0.05 wins (0.9 - 0.1 / 3 against 0.9 - 0.35 / 3), the own best
    # of all 3
    assert result["chosen"]["wasam"] == {"sam_rho": "0.05"} and result["stability"]["wasam"]["agree"] == 3
    assert "sam_rho=0.1" not in result["stability"]["wasam"]["mean_scores"]
    text = (out / "comparison.md").read_text()
    assert "| sam | sam_rho=0.1 (2 of 3 tuning seeds) |" in text and "| wasam | sam_rho=0.05 (3 of 3 tuning seeds) |" in text
    assert "tuning seeds 10, 11, 12" in text and result["tuning_seeds"] == [10, 11, 12]
    finals = [c for c in calls if "--holdout_fraction" not in c]
    assert sorted(c.split("--seed ")[1].split()[0] for c in finals) == ["0", "0", "0", "1", "1", "1"]
