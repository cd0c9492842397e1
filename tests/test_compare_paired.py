"""`hf-flat compare`: paired statistics. Every method runs on the same seeds, which fix
initialisation and data order, so the table reports each difference to the baseline with the SE
of the per-seed differences (sd(d_s) / sqrt(n)) beside the unpaired SE, and bold uses the paired
one. Hand values from designed per-seed numbers; missing seeds; the legend; the JSON."""

import json
import math
import statistics
import textwrap

import pytest

from hf_flat.cli import main
from hf_flat.commands.compare import LEGEND, markdown, paired_difference, table

# large seed-to-seed variation (70 .. 90), sam a consistent +0.5 (+-0.1) on top of it
NONE = {0: 70.0, 1: 80.0, 2: 90.0, 3: 75.0}
SAM = {0: 70.5, 1: 80.6, 2: 90.4, 3: 75.5}


def se(values):
    return statistics.stdev(values) / math.sqrt(len(values))


def test_paired_se_by_hand_and_bold_follows_it():
    d = [SAM[s] - NONE[s] for s in NONE]  # 0.5, 0.6, 0.4, 0.5
    paired_se = statistics.stdev(d) / 2  # sqrt(0.02 / 3) / 2 = 0.0408
    unpaired_se = math.sqrt(se(list(SAM.values())) ** 2 + se(list(NONE.values())) ** 2)  # about 6.1
    assert paired_se == pytest.approx(0.040825, abs=1e-6) and unpaired_se > 100 * paired_se
    rows = {r["method"]: r for r in table({"none": NONE, "sam": SAM})}
    sam = rows["sam"]
    assert sam["difference"] == pytest.approx(0.5) and sam["difference_se"] == pytest.approx(unpaired_se)
    assert sam["paired_difference"] == pytest.approx(0.5) and sam["paired_difference_se"] == pytest.approx(paired_se)
    assert sam["paired_seeds"] == [0, 1, 2, 3]
    # sam is best; the baseline trails it by 0.5 on every seed: far outside one paired SE (0.04), though
    # inside one unpaired SE (sam's own SE, 4.3, as compare used before): not bold
    assert sam["bold"] and sam["bold_rule"] == "best"
    assert not rows["none"]["bold"] and rows["none"]["bold_rule"] == "paired"
    assert rows["none"]["behind_best"] == pytest.approx(0.5) and rows["none"]["behind_best_se"] == pytest.approx(paired_se)
    assert 0.5 < se(list(SAM.values()))  # the old rule would have bolded it
    # a method whose per-seed gap to the best changes sign is within one paired SE: bold
    noisy = {0: 71.5, 1: 79.6, 2: 91.4, 3: 74.5}  # sam - noisy = -1, 1, -1, 1: mean 0
    rows = {r["method"]: r for r in table({"none": NONE, "sam": SAM, "noisy": noisy})}
    assert rows["noisy"]["bold"] and rows["noisy"]["behind_best_se"] == pytest.approx(1 / math.sqrt(3) * 2 / 2)
    # lower is better: the same rule, mirrored
    rows = {r["method"]: r for r in table({"none": NONE, "sam": SAM}, lower_is_better=True)}
    assert rows["none"]["bold"] and not rows["sam"]["bold"]


def test_table_shows_both_standard_errors_and_the_legend():
    text = markdown(table({"none": NONE, "sam": SAM}), "eval_loss")
    lines = text.splitlines()
    assert lines[0] == ("| method | eval_loss (baseline) / difference to baseline ± unpaired SE | n "
                        "| paired difference ± paired SE (seeds) |")
    assert "| none | 78.75 ± 4.27 | 4 | baseline |" in lines
    assert "| sam | **+0.5 ± 6.024** | 4 | +0.5 ± 0.04082 (4) |" in lines
    assert LEGEND in lines and "Bold uses the paired SE" in LEGEND
    assert "sd(d_s) / √n" in LEGEND and "sqrt(se_method² + se_baseline²)" in LEGEND
    assert "Seeds missing" not in text


def test_missing_seeds_pair_only_the_common_ones_and_say_so():
    sam = {0: 70.5, 1: 80.6, 3: 75.5}  # seed 2 failed
    rows = {r["method"]: r for r in table({"none": NONE, "sam": sam})}
    d = [0.5, 0.6, 0.5]
    assert rows["sam"]["paired_seeds"] == [0, 1, 3] and rows["sam"]["n"] == 3
    assert rows["sam"]["paired_difference"] == pytest.approx(statistics.mean(d))
    assert rows["sam"]["paired_difference_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    # the unpaired difference is of the means over each side's own seeds: the missing 90 drags sam down
    assert rows["sam"]["difference"] == pytest.approx(statistics.mean(sam.values()) - statistics.mean(NONE.values()))
    assert rows["sam"]["difference"] < 0 < rows["sam"]["paired_difference"]
    assert paired_difference(sam, NONE)[2] == [0, 1, 3]
    text = markdown(list(rows.values()), "eval_accuracy")
    # none is best by mean (sam's mean lacks seed 2's 90), but sam is ahead of it on every common seed: both bold
    assert "| none | **78.75 ± 4.27** | 4 | baseline |" in text
    assert "| sam | **-3.217 ± 5.17** | 3 | +0.5333 ± 0.03333 (3) |" in text
    assert "- sam vs none: sam lacks seed(s) 2: paired over the common seeds only (0, 1, 3)" in text
    # no seed in common with the best: the old rule (the best's own SE), and said so
    rows = table({"none": {0: 1.0, 1: 1.2}, "sam": {2: 2.0, 3: 2.2}})
    assert rows[0]["bold_rule"] == "unpaired" and rows[1]["paired_seeds"] == []
    assert "none: no seed in common with the best method" in markdown(rows, "m")


FAKE = textwrap.dedent('''
    import argparse, json, os
    p = argparse.ArgumentParser()
    p.add_argument("--flat_method"); p.add_argument("--seed", type=int); p.add_argument("--output_dir")
    a = p.parse_args()
    if a.flat_method == "sam" and a.seed == 2:
        raise SystemExit("seed 2 of sam fails")
    score = {0: 0.70, 1: 0.80, 2: 0.90, 3: 0.75}[a.seed] + {"none": 0.0, "sam": 0.005, "swa": -0.001}[a.flat_method]
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump({"eval_accuracy": score}, open(os.path.join(a.output_dir, "all_results.json"), "w"))
''')


def test_compare_end_to_end_reports_both_and_names_the_missing_seed(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(FAKE)
    out = tmp_path / "out"
    assert main(["compare", "--script", str(script), "--methods", "none", "sam", "swa", "--seeds", "0", "1", "2", "3",
                 "--output_dir", str(out), "--quiet"]) == 1  # sam seed 2 failed
    printed = capsys.readouterr().out
    text = (out / "comparison.md").read_text()
    assert LEGEND in printed and LEGEND in text
    # sam beats none by 0.5 points on each of its 3 seeds: paired SE 0; swa trails none by 0.1 on all 4
    assert "| sam | **-3.25 ± 5.15** | 3 | +0.50 ± 0.00 (3) |" in text
    assert "| swa | -0.10 ± 6.04 | 4 | -0.10 ± 0.00 (4) |" in text
    assert "- sam vs none: sam lacks seed(s) 2: paired over the common seeds only (0, 1, 3)" in text
    result = json.loads((out / "comparison.json").read_text())
    assert result["bold_uses"] == "paired SE" and result["legend"] == LEGEND
    rows = {r["method"]: r for r in result["table"]}
    assert rows["sam"]["paired_difference_se"] == pytest.approx(0, abs=1e-12) and rows["sam"]["difference_se"] > 0.05
    assert rows["sam"]["paired_seeds"] == [0, 1, 3] and rows["swa"]["paired_seeds"] == [0, 1, 2, 3]
    # best by mean: none (sam's mean lacks its best seed); sam is ahead of it on every common seed, so
    # behind_best is negative and sam is bold; swa trails by 0.001 on every seed: not bold
    assert rows["none"]["bold"] and rows["sam"]["bold"] and not rows["swa"]["bold"]
    assert any("sam lacks seed(s) 2" in note for note in result["pairing_notes"])
