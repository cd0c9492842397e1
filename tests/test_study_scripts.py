"""The accuracy study's scripts (benchmarks/accuracy/) in a tiny mode, so that they cannot rot: the
epoch budget's choice (the one-standard-error rule on paired differences) against a hand computation,
the grids fitted to the run's length, and the whole study on a few runs."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accuracy"))  # (convergence.py, run_study.py)
import convergence  # noqa: E402


def test_the_one_standard_error_rule_by_hand():
    final = {8: {0: 0.80, 1: 0.82, 2: 0.81}, 15: {0: 0.84, 1: 0.83, 2: 0.86}, 30: {0: 0.85, 1: 0.85, 2: 0.85}}
    pick = convergence.choose(final)
    assert pick["best"] == 30  # means 0.81, 0.8433, 0.85
    d15 = [-0.01, -0.02, 0.01]  # 15 against 30, seed by seed
    mean15 = sum(d15) / 3
    se15 = math.sqrt(sum((d - mean15) ** 2 for d in d15) / 2 / 3)
    assert math.isclose(pick["paired"][15][0], mean15) and math.isclose(pick["paired"][15][1], se15)
    assert mean15 >= -se15 and pick["chosen"] == 15  # within one SE of the best: the smaller budget
    # 8 is 0.04 below with an SE of 0.0058: not chosen even though it is the smallest
    assert pick["paired"][8][0] < -pick["paired"][8][1]


def test_the_script_runs_end_to_end_in_a_tiny_mode(tmp_path):
    results = convergence.main(["--budgets", "1", "2", "--seeds", "0", "1", "--settings", "noise40",
                                "--output_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "c.json"),
                                "--markdown", str(tmp_path / "c.md"), "--extra", "--max_train_samples", "40"])
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["noise40"]["chosen"] == results["noise40"]["chosen"] in (1, 2)
    assert len(saved["noise40"]["curves"]["epochs2-seed0"]) == 2 and len(saved["noise40"]["curve_of_longest"]) == 2
    final = {int(b): {int(s): a for s, a in v.items()} for b, v in saved["noise40"]["final"].items()}
    assert convergence.choose(final)["chosen"] == saved["noise40"]["chosen"]
    assert "(chosen)" in (tmp_path / "c.md").read_text()
    # finished runs are reused: a second call trains nothing and gives the same numbers
    mtime = os.path.getmtime(tmp_path / "runs" / "noise40" / "epochs1-seed0" / "all_results.json")
    again = convergence.main(["--budgets", "1", "2", "--seeds", "0", "1", "--settings", "noise40",
                              "--output_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "c2.json"),
                              "--markdown", str(tmp_path / "c2.md"), "--extra", "--max_train_samples", "40"])
    assert again["noise40"]["final"] == results["noise40"]["final"]
    assert os.path.getmtime(tmp_path / "runs" / "noise40" / "epochs1-seed0" / "all_results.json") == mtime


def test_saf_and_mesa_starts_are_the_averaging_fractions_of_the_run():
    import run_study

    assert "saf:saf_start_epoch=4,5,6,7" in run_study.grids(8)  # the grid the 8-epoch study used
    assert "mesa:mesa_start_epoch=15,18,22,27" in run_study.grids(30)
    assert "saf:saf_start_epoch=1,2" in run_study.grids(2)  # (no repeats, at least epoch 1)
    assert "average_freq=0,10" in run_study.grids(8)  # the snapshot frequency is tuned too
    # EMA / MESA windows 1 / (1 - decay) of a 16th and a quarter of the run's steps: 30 epochs of 45 steps
    windows = [1 / (1 - float(d)) for d in run_study.decays(30).split(",")]
    assert math.isclose(windows[0], 1350 / 16, rel_tol=1e-2) and math.isclose(windows[1], 1350 / 4, rel_tol=1e-2)
    assert f"mesa:mesa_decay={run_study.decays(15)}" in run_study.grids(15) and run_study.decays(15) != run_study.decays(30)
    # the WordNet study's coarse grid: 3 radii, 2 starts, WASAM at 0.05, the same decays; SAF and MESA start
    # within a 3-epoch run (epochs 0-2), and SAF looks 1 epoch back, so that both act (the 3 past epochs of
    # the paper and a start at epoch 3 kept them off in a first run of the study: the plain runs, to the digit)
    fine, coarse = run_study.grids(3, 157), run_study.coarse_grids(3, 157)
    assert "sam_rho=0.01,0.05,0.2" in coarse and "asam:sam_rho=0.1,0.5,2.0" in coarse and "wasam:sam_rho=0.05" in coarse
    assert "average_start=0.5,0.75" in coarse and "average_freq=0,10" in coarse
    assert [g for g in coarse if g.startswith(("ema", "mesa:mesa_decay", "looksam", "esam"))] == \
        [g for g in fine if g.startswith(("ema", "mesa:mesa_decay", "looksam", "esam"))]
    assert {"saf:saf_start_epoch=1,2", "mesa:mesa_start_epoch=1,2", "saf:saf_past_epochs=1"} <= set(coarse)
    assert "saf:saf_start_epoch=5,7" in run_study.coarse_grids(10, 157)  # a half and three quarters of epochs 0-9


def test_the_study_runs_end_to_end_in_a_tiny_mode(tmp_path):
    import run_study

    run_study.main(["--methods", "none", "swa", "saf", "--seeds", "0", "1", "--tuning_seeds", "7", "8",
                    "--epochs", "2", "--settings", "noise40",
                    "--output_dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json"),
                    "--page", str(tmp_path / "page.md"), "--plot", str(tmp_path / "plot.png"),
                    "--extra", "--max_train_samples", "40"])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["epochs"] == {"noise40": 2} and "saf:saf_start_epoch=1,2" in results["grids"]["noise40"]
    rows = {r["method"]: r for r in results["studies"]["noise40"]["summary"]}
    assert set(rows) == {"none", "swa", "saf"} and all(r["n"] == 2 for r in rows.values())
    # every grid point ran once per tuning seed, and the stability of each choice is recorded
    tuning = results["studies"]["noise40"]["tuning"]
    assert sorted(t["seed"] for t in tuning["saf"]) == [7, 7, 8, 8] and len(tuning["swa"]) == 4 * 2 * 2
    assert rows["saf"]["agree"] in (0, 1, 2) and rows["none"]["agree"] is None
    page = (tmp_path / "page.md").read_text()
    assert "## 40% label noise, 2 epochs" in page and "| seed 7 | seed 8 | mean |" in page
    assert "(chosen) |" in page and (tmp_path / "plot.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_wordnet(tmp_path_factory):
    """A tiny pretraining (2 epochs, a checkpoint each) and a tiny task folder in wordnet_data.py's layout."""
    import csv

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "pretrain"))
    import run_mlm

    tmp_path = tmp_path_factory.mktemp("wordnet")
    words = ["dog", "cat", "horse", "river", "stone", "storm", "runs", "sings", "falls", "grows"]
    lines = [f"the {words[i % 6]} {words[6 + i % 4]} near the {words[(i * 7) % 6]}" for i in range(120)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    run_mlm.main(["--train_file", str(tmp_path / "corpus.txt"), "--output_dir", str(tmp_path / "mlm"), "--vocab_size", "200",
                  "--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "32",
                  "--max_seq_length", "16", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
                  "--use_cpu", "true", "--seed", "0"])
    task = tmp_path / "data" / "task"
    task.mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 12), ("test", 10)):
        with open(task / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["text", "label", "synset"]] + [
                [f"a {words[i % 6]} that {words[6 + i % 4]}", "noun.animal" if i % 6 < 3 else "noun.object", f"s{i}"]
                for i in range(n)])
    return tmp_path


def test_the_pretraining_control_runs_end_to_end_in_a_tiny_mode(tmp_path, tiny_wordnet):
    """benchmarks/accuracy/pretraining.py on a tiny pretraining (2 epochs, a checkpoint each) and a tiny
    task: a row per start and rate, the scratch control, and paired differences as computed by hand."""
    import pretraining

    result = pretraining.main(["--data", str(tiny_wordnet / "data"), "--model", str(tiny_wordnet / "mlm"), "--seeds", "0", "1",
                               "--learning_rates", "1e-3", "--epochs", "1", "--max_train_samples", "16", "--jobs", "1",
                               "--output_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "p.json"),
                               "--markdown", str(tmp_path / "p.md")])
    steps = sorted(int(p.name.split("-")[1]) for p in (tiny_wordnet / "mlm").glob("checkpoint-*"))
    assert len(steps) == 2 and steps[1] == 2 * steps[0]  # a checkpoint per epoch; the last is the final model
    assert [r["start"] for r in result["rows"]] == [f"checkpoint-{steps[0]}", f"checkpoint-{steps[1]}", "scratch"]
    assert [r["pretraining_epochs"] for r in result["rows"]] == [1, 2, None]
    assert all(r["mlm_eval_loss"] > 0 for r in result["rows"][:2])
    runs = {(r["start"], r["seed"]): r["eval_accuracy"] for r in result["runs"]}
    d = [runs[f"checkpoint-{steps[1]}", s] - runs["scratch", s] for s in (0, 1)]
    assert math.isclose(result["rows"][1]["paired_difference"], sum(d) / 2)
    assert math.isclose(result["rows"][1]["paired_difference_se"], abs(d[0] - d[1]) / 2)
    assert "| scratch | - | - | 1e-3 |" in (tmp_path / "p.md").read_text()


def test_the_wordnet_study_runs_end_to_end_in_a_tiny_mode(tmp_path, tiny_wordnet):
    """run_study.py --task wordnet: every method on the pretrained model, tuned on held-out training rows,
    scored on the test split; the scratch control runs the plain Trainer only, with new weights."""
    import run_study

    run_study.main(["--task", "wordnet", "--data", str(tiny_wordnet / "data"), "--model", str(tiny_wordnet / "mlm"),
                    "--methods", "none", "sam", "--seeds", "0", "1", "--tuning_seeds", "7", "8", "--epochs", "1",
                    "--max_train_samples", "16", "--learning_rate", "1e-3",
                    "--output_dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json"),
                    "--page", str(tmp_path / "page.md"), "--plot", str(tmp_path / "plot.png")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["task"] == "wordnet" and results["epochs"] == {"pretrained": 1, "scratch": 1}
    pretrained, scratch = results["studies"]["pretrained"], results["studies"]["scratch"]
    assert {r["method"] for r in pretrained["summary"]} == {"none", "sam"}
    assert [r["method"] for r in scratch["summary"]] == ["none"] and all(r["n"] == 2 for r in scratch["summary"])
    assert len(pretrained["tuning"]["sam"]) == 3 * 2  # the coarse grid's 3 radii x 2 tuning seeds
    assert results["grids"]["pretrained"] == run_study.coarse_grids(1, 1)
    # scored on the test split (10 rows), the control from new weights, the rest from the pretrained model
    command = scratch["command"]
    assert command[command.index("--validation_file") + 1].endswith(os.path.join("task", "test.csv"))
    assert "--from_scratch" in command and "--from_scratch" not in pretrained["command"]
    plain = {r["seed"]: r["eval_loss"] for r in pretrained["runs"] if r["method"] == "none"}
    assert all(r["eval_loss"] != plain[r["seed"]] for r in scratch["runs"])  # another start, seed by seed
    page = (tmp_path / "page.md").read_text()
    assert page.startswith("# Accuracy and cost of every method, fine-tuning a pretrained model (WordNet)")
    assert "## from scratch (the control), 1 epochs" in page and "(chosen) |" in page


def test_the_readme_main_job_reruns_the_study_rows_with_the_values_it_chose():
    """The README's first command cannot drift from the study: its epochs are the noisy setting's
    budget, and every --grid METHOD:NAME=value is what the study chose for that method."""
    root = os.path.join(os.path.dirname(__file__), "..")
    lines = []
    for page in ("README.md", "docs/quickstart.md", "docs/benchmarks/main-job.md"):
        with open(os.path.join(root, page)) as f:
            lines += [x for x in f if x.startswith("python3 -m venv .venv && ")]
    assert len(lines) == 3 and len(set(lines)) == 1, "the README, the quickstart and the main job's page give one command"
    words = lines[0].split("hf-flat compare", 1)[1].split()
    ours, script_args = words[:words.index("--")], words[words.index("--") + 1:]
    with open(os.path.join(root, "benchmarks", "accuracy", "results.json")) as f:
        results = json.load(f)
    setting = "noise40" if "--label_noise" in script_args else "clean"
    assert script_args[script_args.index("--num_train_epochs") + 1] == str(results["epochs"][setting])
    if setting == "noise40":
        assert script_args[script_args.index("--label_noise") + 1] == "0.4"
    chosen = results["studies"][setting]["chosen"]
    methods = ours[ours.index("--methods") + 1:ours.index("--seeds")]
    assert methods[0] == "none" and set(methods) <= set(chosen)
    given = {}
    for i, word in enumerate(ours):
        if word == "--grid":
            method, _, pair = ours[i + 1].partition(":")
            name, value = pair.split("=")
            given.setdefault(method, {})[name] = value
    assert given == {m: chosen[m] for m in methods if chosen[m]}
    assert ours[ours.index("--seeds") + 1:ours.index("--jobs")] == [str(s) for s in results["seeds"]]


def test_the_docs_wordnet_tables_are_the_studys_results():
    """The WordNet page's tables are run_study.py's tables of benchmarks/accuracy/results-wordnet.json,
    row for row: a rerun of the study that changes a number fails here until the page follows."""
    import run_study

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "benchmarks", "accuracy", "results-wordnet.json")) as f:
        results = json.load(f)
    with open(os.path.join(root, "docs", "benchmarks", "wordnet.md")) as f:
        page = f.read()
    for setting in ("pretrained", "scratch"):
        rows = run_study.summary_table(results["studies"][setting]["summary"], len(results["tuning_seeds"]))
        assert len(rows) > 2 and all(row in page for row in rows[2:]), setting
