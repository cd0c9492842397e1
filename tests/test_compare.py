"""`hf-flat compare`: the table maths by hand, grid search on held-out data, failures, resume."""

import json
import math
import textwrap

import pytest

from hf_flat.compare import markdown, mean_and_se, table
from hf_flat.cli import main

FAKE_SCRIPT = textwrap.dedent('''
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--flat_method"); p.add_argument("--seed", type=int); p.add_argument("--output_dir")
    p.add_argument("--holdout_fraction", type=float, default=0.0); p.add_argument("--sam_rho", type=float, default=0.05)
    p.add_argument("--average_start", type=float, default=0.75); p.add_argument("--num_train_epochs", type=int)
    a = p.parse_args()
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if a.flat_method == "asam":
        sys.exit("asam is broken in this fake script")
    score = {"none": 0.80, "sam": 0.84, "swa": 0.81, "wasam": 0.85}[a.flat_method] + 0.01 * a.seed
    if a.flat_method in ("sam", "wasam"):
        score -= abs(a.sam_rho - 0.1)  # the held-out optimum is rho = 0.1
    if a.holdout_fraction:
        score += 0.5  # held-out scores differ from test scores
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump({"eval_accuracy": score, "epochs": a.num_train_epochs}, open(os.path.join(a.output_dir, "all_results.json"), "w"))
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
    text = markdown(table(scores), "eval_accuracy")
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
    main(argv)
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    assert result["chosen"] == {"none": {}, "sam": {"sam_rho": "0.1"}, "asam": {}}  # asam's tuning runs failed
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    tuning_calls = [c for c in calls if "--holdout_fraction" in c]
    assert len(tuning_calls) == 6  # 3 rho values for sam and for asam, on held-out data, seed 0
    rows = {r["method"]: r for r in result["table"]}
    assert rows["none"]["mean"] == pytest.approx(0.805) and rows["sam"]["mean"] == pytest.approx(0.845)
    assert rows["asam"]["n"] == 0 and "all runs failed" in printed
    assert "2 run(s) failed" in printed and "asam-seed0" in printed
    assert all("--num_train_epochs 3" in c for c in calls)
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 and any("asam" in line and "exit code" in line for line in csv_lines)

    main(argv)  # resume: finished runs are not run again, failed ones are retried
    again = (tmp_path / "calls.txt").read_text().splitlines()[len(calls):]
    assert again and all("asam" in c for c in again)
