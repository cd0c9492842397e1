"""Fixes from issue 24's probes of the `hf-flat` commands: `report --curves` matched by path *and*
weights, and each side of its pair table labelled with its weights (items 4, 16); `--weights
averaged` for every averaging kind (SWA, EMA, LAWA's window, WASAM) in both flat state layouts
(item 10); `compare --grid` keys applied only to the methods they change (item 12); the commands
on a LoRA (PEFT) run's adapter folders (item 13)."""

import json
import os
import textwrap

import pytest
import torch
from transformers import ViTForImageClassification

from hf_flat.analysis import evaluate
from hf_flat.cli import main, run
from hf_flat.loading import load_average, load_model
from hf_flat.data import batches, load_splits, preprocess
from test_cli import tiny_vit

COMMON = ["--data", "digits", "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "32"]
SHARP = ["--m", "16", "--n", "1", "--n_average", "1", "--directions", "2", "--hessian_iterations", "2"]


def fake_checkpoint(folder, seed, shift=0.01):
    """A tiny ViT saved in `folder` with an SWA average (its weights + `shift`) in hf_flat_state."""
    from hf_flat.state_file import save_flat_state
    from hf_flat.trainer import FLAT_STATE_NAME

    model = tiny_vit(folder, seed)
    average = {f"averaging.{n}": p.detach() + shift for n, p in model.named_parameters()}
    save_flat_state(os.path.join(folder, FLAT_STATE_NAME), [(average, {
        "averaging_version": "1", "averaging": "swa", "averaging_count": "3",
        "averaging_names": json.dumps([n for n, _ in model.named_parameters()])})], "swa")
    return str(folder)


# ---- items 4 and 16: report --curves by path and weights; the pair table's labels ----------------

def test_report_matches_curves_by_path_and_weights_and_labels_both_sides(tmp_path, capsys):
    a = fake_checkpoint(tmp_path / "run" / "checkpoint-4", 0)
    b = str(tmp_path / "b")
    tiny_vit(b, 1)
    curves = str(tmp_path / "c")
    run(["connect", a, b, "--weights", "averaged", "live", "--epochs", "1", "--points", "3", "--train_batch_size", "32",
         "--output_dir", curves, *COMMON])

    # the curve joins A's *averaged* weights and B: a report of A's live weights must not take its barriers
    status = main(["report", a, b, "--weights", "live", "--curves", curves, "--output_dir", str(tmp_path / "r0"),
                   *SHARP, *COMMON])
    err = capsys.readouterr().err
    assert status == 2
    assert "--curves" in err and "averaged" in err and "live" in err and a in err
    assert not (tmp_path / "r0").exists()

    # A twice (averaged and live) and B: the curve belongs to (A averaged, B) only
    report = run(["report", a, a, b, "--weights", "averaged", "live", "live", "--curves", curves, "--points", "3",
                  "--output_dir", str(tmp_path / "r"), *SHARP, *COMMON])
    found = json.loads((tmp_path / "c" / "results.json").read_text())
    by_pair = {(p["a"], p["weights_a"], p["b"], p["weights_b"]): p for p in report["pairs"]}
    with_curve = by_pair[(a, "averaged", b, "live")]
    assert with_curve["curve_from"] == curves
    assert with_curve["barriers"]["curve/test/loss"] == found["barriers"]["curve/test/loss"]
    for key in [(a, "averaged", a, "live"), (a, "live", b, "live")]:
        assert "curve_from" not in by_pair[key] and not any(k.startswith("curve/") for k in by_pair[key]["barriers"])
    table = (tmp_path / "r" / "report.md").read_text()
    name = os.path.join("run", "checkpoint-4")
    assert f"| {name} (averaged weights) | {name} |" in table
    assert f"| {name} (averaged weights) | b |" in table and f"| {name} | b |" in table


def test_a_curve_joining_the_pair_the_other_way_round_has_its_barrier_positions_flipped():
    from hf_flat.commands.report import curve_barriers

    found = {"barriers": {"curve/test/loss": {"height": 0.2, "at": 0.25}, "curve/train/loss": {"height": 0.0, "at": None},
                          "line/test/loss": {"height": 0.5, "at": 0.25}}}
    assert curve_barriers(found, reversed_curve=False) == {"curve/test/loss": {"height": 0.2, "at": 0.25},
                                                           "curve/train/loss": {"height": 0.0, "at": None}}
    assert curve_barriers(found, reversed_curve=True) == {"curve/test/loss": {"height": 0.2, "at": 0.75},
                                                          "curve/train/loss": {"height": 0.0, "at": None}}


# ---- item 10: --weights averaged for every averaging kind, both state layouts ---------------------

def train_vit(folder, method, steps=6, **extra):
    """A tiny ViT trained on 32 digits for `steps` SGD steps with `method`, checkpointed at the last
    step (whose hf_flat_state holds the average as it was before training ended)."""
    from hf_flat import FlatTrainer, TrainingArguments

    model = tiny_vit(os.path.join(folder, "init"), 0)
    train = preprocess(load_splits("digits")["train"].select(range(32)), os.path.join(folder, "init"))
    args = TrainingArguments(output_dir=os.path.join(folder, "run"), flat_method=method, optim="sgd", learning_rate=0.5,
                             per_device_train_batch_size=8, max_steps=steps, save_strategy="steps", save_steps=steps,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
                             **extra)
    trainer = FlatTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    return trainer, os.path.join(folder, "run", f"checkpoint-{steps}")


def rewrite_sharded(checkpoint, processes=2):
    """Write the checkpoint's flat state again as `processes` FSDP2 processes would (a main file and
    shard files holding torch.chunk's rows of every tensor), as tests/test_state_file.py does."""
    from hf_flat.state_file import load_flat_state
    from hf_flat.trainer import FLAT_STATE_NAME
    from helpers import write_sharded

    path = os.path.join(checkpoint, FLAT_STATE_NAME)
    state, meta = load_flat_state(path)
    whole = {k: state[k].clone() for k in state}
    meta = {k: v for k, v in meta.items() if k not in ("hf_flat_state_version", "flat_method")}
    write_sharded(path, whole, processes, meta=meta, flat_method="rewritten")
    assert load_flat_state(path)[1]["hf_flat_state_version"] == "2"


@pytest.mark.parametrize("method, extra", [
    ("swa", dict(average_start=0.25, average_freq=1)),
    ("ema", dict(average_start=0.25, ema_decay=0.5)),
    ("lawa", dict(average_start=0.25, average_freq=1, lawa_k=3)),
    ("lawa", dict(average_start=0.5, average_freq=1, lawa_k=5)),  # 4 snapshots (steps 3-6): the window is not full
    ("wasam", dict(average_start=0.25, average_freq=2)),
    ("sam+lawa", dict(average_start=0.0, average_freq=2, lawa_k=2)),
])
def test_averaged_weights_of_every_averaging_kind_in_both_layouts(tmp_path, method, extra):
    from safetensors.torch import load_file

    trainer, checkpoint = train_vit(str(tmp_path), method, **extra)
    final = {n: p.detach() for n, p in trainer.model.named_parameters()}  # the average the trainer put in the model
    live = load_model(checkpoint, "cpu")
    assert any(not torch.equal(p, final[n]) for n, p in live.named_parameters())  # the average is not the live weights
    stored = load_file(os.path.join(checkpoint, "hf_flat_state.safetensors"))
    if method.endswith("lawa"):  # the window's mean, by hand from the file's slots (the filled ones)
        snapshots = [t for t in range(trainer.averaging.start_step, 7) if t % extra["average_freq"] == 0]
        k = min(extra["lawa_k"], len(snapshots))
        assert {key.split(".")[1] for key in stored} == {str(i) for i in range(k)}
        by_hand = {n: sum(stored[f"averaging.{i}.{n}"] for i in range(k)) / k for n in final}
    for layout in ("one file", "sharded"):
        if layout == "sharded":
            rewrite_sharded(checkpoint)
        model = load_model(checkpoint, "cpu")
        described = load_average(model, checkpoint)
        assert described.startswith(f"averaged ({method.split('+')[-1].replace('wasam', 'swa')}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), final[name], rtol=0, atol=1e-6, msg=f"{layout}: {name}")
            if method.endswith("lawa"):
                torch.testing.assert_close(p.detach(), by_hand[name], rtol=0, atol=1e-6, msg=f"{layout}: {name}")


def test_lawa_averaged_weights_in_the_commands(tmp_path):
    """`interpolate` and `soup` with --weights averaged on a LAWA checkpoint: the window's mean."""
    trainer, checkpoint = train_vit(str(tmp_path), "lawa", average_start=0.25, average_freq=1, lawa_k=3)
    out = run(["interpolate", checkpoint, checkpoint, "--weights", "averaged", "live", "--points", "2", "--alpha_min",
               "0", "--alpha_max", "1", "--output_dir", str(tmp_path / "i"), *COMMON])
    test = batches(preprocess(load_splits("digits")["eval"], checkpoint), 32, limit=64)
    assert out["interpolation"][0]["test"]["loss"] == pytest.approx(evaluate(trainer.model.eval(), test)["loss"], rel=1e-5)
    assert "lawa" in out["weights"][checkpoint] or "lawa" in json.dumps(out["weights"])
    run(["soup", checkpoint, checkpoint, "--weights", "averaged", "live", "--output_dir", str(tmp_path / "soup")])
    soup = ViTForImageClassification.from_pretrained(tmp_path / "soup")
    live = ViTForImageClassification.from_pretrained(checkpoint)
    final, live = dict(trainer.model.named_parameters()), dict(live.named_parameters())
    for name, p in soup.named_parameters():
        torch.testing.assert_close(p.detach(), (final[name].detach() + live[name].detach()) / 2, rtol=0, atol=1e-6)


# ---- item 13: a LoRA (PEFT) run's output folder and checkpoints ----------------------------------

def lora_run(tmp_path):
    """A LoRA run (SWA) of FlatTrainer over a tiny BERT saved in a local folder: (base folder, the run's
    output folder, its checkpoint-3, the data file)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from hf_flat import FlatTrainer, TrainingArguments
    from test_cli_user_data import LABELS, save_tiny_bert, write_csv

    base, out = str(tmp_path / "base"), str(tmp_path / "lora")
    save_tiny_bert(base)
    data = write_csv(tmp_path / "my.csv", LABELS)
    train = preprocess(load_splits(data)["train"], base, max_length=16)
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                      init_lora_weights=False))
    args = TrainingArguments(output_dir=out, flat_method="swa", average_start=0.25, average_freq=1, optim="sgd",
                             learning_rate=0.5, per_device_train_batch_size=4, max_steps=3, save_strategy="steps",
                             save_steps=3, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = FlatTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    trainer.save_model()  # the adapter with the averaged weights, as the final model holds them
    assert not os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, "adapter_config.json"))
    return base, out, os.path.join(out, "checkpoint-3"), data


def test_commands_load_a_lora_run_over_its_local_base_model(tmp_path, capsys):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from hf_flat.loading import load_weights

    base, out, checkpoint, data = lora_run(tmp_path)
    # by hand: the adapter merged into its base, saved whole (with the base's tokenizer)
    merged = str(tmp_path / "merged")
    PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), out).merge_and_unload().save_pretrained(merged)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    common = ["--data", data, "--max_length", "16", "--m", "4", "--n", "1", "--n_average", "1", "--directions", "2",
              "--hessian_iterations", "2"]
    keys = (("adversarial", "sharpness"), ("average", "sharpness"), ("asymmetry", "omega"), ("hessian", "eigenvalue"))
    by_hand = run(["sharpness", merged, "--output_dir", str(tmp_path / "s0"), *common])
    on_adapter = run(["sharpness", out, "--output_dir", str(tmp_path / "s1"), *common])
    for key, field in keys:
        assert on_adapter[key][field] == pytest.approx(by_hand[key][field], rel=1e-5, abs=1e-7), key
    assert "PEFT adapter merged into its base model" in on_adapter["weights"][out]

    on_checkpoint = run(["sharpness", checkpoint, "--output_dir", str(tmp_path / "s2"), *common])
    assert on_checkpoint["adversarial"]["sharpness"] is not None
    # --weights averaged on the checkpoint: the adapter's average (PEFT names) copied in before merging,
    # which is what the run's final model (the output folder) holds
    averaged, described = load_weights(checkpoint, "cpu", "averaged")
    assert described.startswith("averaged (swa, 3 snapshots")
    final, live = load_weights(out, "cpu")[0].state_dict(), load_weights(checkpoint, "cpu")[0].state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in live.items())
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6, msg=key)
    assert all(p.requires_grad for p in averaged.parameters())  # every weight is analysed, as for a model saved whole
    on_average = run(["sharpness", checkpoint, "--weights", "averaged", "--output_dir", str(tmp_path / "s3"), *common])
    for key, field in keys:
        assert on_average[key][field] == pytest.approx(by_hand[key][field], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("base, message", [
    ("/no/such/base_model", "is not a local folder;"),
    ("someone/not-cached-model", "is not a local folder, and the Hugging Face cache does not hold it"),
])
def test_an_adapter_whose_base_is_not_loadable_offline_is_refused(tmp_path, capsys, base, message):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    status = main(["sharpness", str(folder), "--data", "digits", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err and repr(base) in err and "base_model_name_or_path" in err
    assert "set base_model_name_or_path in" in err and "to the folder of the base model" in err
    assert ("hf download someone/not-cached-model" in err) == ("/" not in base[:1])


def test_averaged_weights_written_by_weight_averaging_on_its_own(tmp_path):
    """A plain Trainer with the `WeightAveraging` callback writes hf_flat_averaging.safetensors (not
    hf_flat_state): --weights averaged reads it too, LAWA's window included."""
    from transformers import Trainer, TrainingArguments

    from hf_flat import WeightAveraging

    model = tiny_vit(tmp_path / "init", 0)
    train = preprocess(load_splits("digits")["train"].select(range(32)), str(tmp_path / "init"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), optim="sgd", learning_rate=0.5, per_device_train_batch_size=8,
                             max_steps=6, save_strategy="steps", save_steps=6, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[WeightAveraging("lawa", start=0.25, freq=1, k=3)])
    trainer.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-6")
    assert sorted(n for n in os.listdir(checkpoint) if n.startswith("hf_flat")) == ["hf_flat_averaging.safetensors"]
    loaded = load_model(checkpoint, "cpu")
    assert load_average(loaded, checkpoint).startswith("averaged (lawa")
    final = dict(trainer.model.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p.detach(), final[name].detach(), rtol=0, atol=1e-6, msg=name)


# ---- item 12: compare --grid keys apply only to the methods they change -------------------------

#: Which flat-minima arguments change a run of each part of a flat_method, written out by hand from
#: what each method reads (hf_flat/methods/__init__.py, averaging.py, trainer.py) and what
#: FlatTrainingArguments refuses (looksam: no sam_m / sam_interval / 'micro' scope; esam: no sam_m
#: / 'step' scope).
TWO_PASS_WHERE_WHEN = {"sam_m", "sam_scope", "sam_start", "sam_interval"}
SCHEDULE = {"swa_lr", "swa_anneal_steps", "swa_anneal_strategy", "swa_cycle_steps"}
READS = {
    None: set(),
    "sam": {"sam_rho", *TWO_PASS_WHERE_WHEN},
    "asam": {"sam_rho", "asam_eta", *TWO_PASS_WHERE_WHEN},
    "avg_sam": {"sam_rho", *TWO_PASS_WHERE_WHEN},
    "gsam": {"sam_rho", "gsam_alpha", "gsam_rho_min", *TWO_PASS_WHERE_WHEN},
    "looksam": {"sam_rho", "looksam_k", "looksam_alpha", "sam_start"},
    "esam": {"sam_rho", "esam_beta", "esam_gamma", "sam_start", "sam_interval"},
    "saf": {"saf_lambda", "saf_tau", "saf_start_epoch", "saf_past_epochs"},
    "mesa": {"mesa_lambda", "mesa_tau", "mesa_decay", "mesa_start_epoch"},
    "swa": {"average_start", "average_freq", "average_bn_batches", "average_on_cpu", *SCHEDULE},
    "ema": {"average_start", "ema_decay", "average_bn_batches", "average_on_cpu", *SCHEDULE},
    "lawa": {"average_start", "average_freq", "lawa_k", "average_bn_batches", "average_on_cpu", *SCHEDULE},
}
#: A valid value other than the default for each flat argument (the schedule's need swa_lr).
OTHER_VALUES = {
    "sam_rho": [0.1], "asam_eta": [0.02], "sam_m": [2], "sam_scope": ["micro", "step"], "sam_start": [0.5],
    "sam_interval": [2], "gsam_alpha": [0.2], "gsam_rho_min": [0.01], "looksam_k": [3], "looksam_alpha": [0.5],
    "esam_beta": [0.5], "esam_gamma": [0.6], "saf_lambda": [0.1], "saf_tau": [2.0], "saf_start_epoch": [1],
    "saf_past_epochs": [2], "mesa_lambda": [0.1], "mesa_tau": [2.0], "mesa_decay": [0.99], "mesa_start_epoch": [1],
    "average_start": [0.5], "average_freq": [2], "ema_decay": [0.9], "average_bn_batches": [2], "average_on_cpu": [True],
    "lawa_k": [3], "swa_lr": [0.01], "swa_anneal_steps": [2], "swa_anneal_strategy": ["linear"], "swa_cycle_steps": [2],
}


def flat_fields():
    import dataclasses

    from hf_flat.args import FlatArgumentsMixin

    return [f.name for f in dataclasses.fields(FlatArgumentsMixin) if f.name != "flat_method"]


def test_the_applies_table_is_right_for_every_method_and_flat_argument():
    from hf_flat.args import accepted_flat_methods, parse_flat_method
    from hf_flat.commands.compare import applies, tunable

    assert set(flat_fields()) == set(OTHER_VALUES)  # (a new flat argument: add it to READS and OTHER_VALUES)
    wrong = []
    for method in accepted_flat_methods():
        perturbation, averaging = parse_flat_method(method)
        for name in flat_fields():
            expected = name in READS[perturbation] | READS[averaging]
            if applies(name, method) is not expected:
                wrong.append((method, name, applies(name, method), expected))
    assert wrong == []
    assert applies("learning_rate", "sam") is None  # not a flat argument: every method but 'none'
    assert tunable("sam", {"swa_lr": ["0.01"], "learning_rate": ["0.1"]}) == {"learning_rate": ["0.1"]}
    assert tunable("lawa", {"average_freq": ["1", "2"], "lawa_k": ["2"]}) == {"average_freq": ["1", "2"], "lawa_k": ["2"]}
    assert tunable("swa", {"lawa_k": ["2"], "ema_decay": ["0.9"]}) == {}


@pytest.mark.parametrize("method", ["sam", "asam", "avg_sam", "gsam", "looksam", "esam", "saf", "mesa", "swa", "ema",
                                    "lawa", "wasam", "looksam+lawa", "esam+ema", "mesa+lawa"])
def test_what_applies_is_accepted_and_read_and_what_does_not_is_refused_or_ignored(tmp_path, method):
    """Behaviour behind the table: a value of a setting that applies is accepted by FlatTrainingArguments
    with no 'has no effect' warning (so a --grid of it never makes the method's runs fail)."""
    import warnings

    from hf_flat import TrainingArguments
    from hf_flat.commands.compare import applies

    for name in flat_fields():
        if not applies(name, method):
            continue
        for value in OTHER_VALUES[name]:
            extra = {"swa_lr": 0.05} if name in SCHEDULE - {"swa_lr"} else {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                TrainingArguments(str(tmp_path), flat_method=method, report_to="none", use_cpu=True,
                                  per_device_train_batch_size=4, **{name: value, **extra})
            assert not [w for w in caught if "has no effect" in str(w.message)], (method, name, value)


@pytest.mark.parametrize("method", ["none", "sam", "looksam", "esam", "saf", "mesa", "swa", "ema", "lawa", "wasam",
                                    "mesa+lawa"])
def test_a_setting_the_method_does_not_read_warns_or_is_refused(tmp_path, method):
    """Nothing is silently ignored: every flat argument set away from its default for a method that
    does not read it (READS, written out above) warns that it has no effect, naming it, or is
    refused with a ValueError (e.g. sam_m with LookSAM)."""
    import warnings

    from hf_flat import TrainingArguments
    from hf_flat.args import parse_flat_method

    reads = set().union(*(READS[part] for part in parse_flat_method(method)))
    for name in flat_fields():
        if name in reads:
            continue
        for value in OTHER_VALUES[name]:
            extra = {"swa_lr": 0.05} if name in SCHEDULE - {"swa_lr"} else {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    TrainingArguments(str(tmp_path), flat_method=method, report_to="none", use_cpu=True,
                                      per_device_train_batch_size=4, **{name: value, **extra})
                except ValueError:
                    continue
            messages = [str(w.message) for w in caught if "has no effect" in str(w.message)]
            assert any(m.startswith(f"{name}={value!r} has no effect with flat_method={method!r}") for m in messages), (
                method, name, value, messages)


FLAT_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from dataclasses import dataclass
    from transformers import HfArgumentParser
    from hf_flat import TrainingArguments

    @dataclass
    class Extra:
        holdout_fraction: float = 0.0

    # a script that takes the FlatTrainingArguments flags, which refuse a setting its method cannot use
    args, extra = HfArgumentParser((TrainingArguments, Extra)).parse_args_into_dataclasses()
    score = 0.5 + 0.01 * args.seed + (0.02 if args.flat_averaging == "lawa" and args.average_freq == 2 else 0.0)
    score += 0.001 * (args.swa_lr or 0.0)
    os.makedirs(args.output_dir, exist_ok=True)
    json.dump({"eval_accuracy": score, "flat_method": args.flat_method},
              open(os.path.join(args.output_dir, "all_results.json"), "w"))
''')


def test_compare_grid_keys_reach_only_the_methods_they_change(tmp_path, capsys):
    script = tmp_path / "flat_script.py"
    script.write_text(FLAT_SCRIPT)

    def compare(name, *options):
        code = main(["compare", "--script", str(script), "--output_dir", str(tmp_path / name), "--quiet",
                     "--seeds", "0", *options])
        saved = tmp_path / name / "comparison.json"
        return code, (json.loads(saved.read_text()) if saved.exists() else None), capsys.readouterr().err

    # a global swa_lr grid: tuned for lawa, not passed to sam (whose runs FlatTrainingArguments would refuse)
    code, result, err = compare("global", "--methods", "sam", "lawa", "--grid", "swa_lr=0.01,0.02")
    assert code == 0 and result["failures"] == []
    assert result["chosen"]["sam"] == {} and "sam" not in result["tuning"]
    assert sorted(t["settings"]["swa_lr"] for t in result["tuning"]["lawa"]) == ["0.01", "0.02"]
    assert "--grid swa_lr" in err and "not for sam" in err

    # LAWA snapshots every average_freq steps: its own grid of it is tuned
    code, result, err = compare("lawa", "--methods", "sam", "lawa", "--grid", "lawa:average_freq=1,2")
    assert code == 0, err
    assert result["chosen"]["lawa"] == {"average_freq": "2"} and len(result["tuning"]["lawa"]) == 2

    # a method's own grid of a setting it does not read: refused before any run, naming what it does change
    code, result, err = compare("refused", "--methods", "sam", "lawa", "--grid", "sam:swa_lr=0.01,0.02")
    assert code == 2 and not (tmp_path / "refused" / "runs").exists()
    assert "--grid sam:swa_lr" in err and "swa_lr does not change a run of sam" in err and "lawa:swa_lr" in err


def test_a_classification_adapter_over_a_masked_lm_base_gets_its_head(tmp_path):
    """The usual LoRA set-up: a base saved as a masked LM, fine-tuned as a classifier
    (task_type SEQ_CLS, the head saved in the adapter): the commands load the classifier."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from hf_flat import FlatTrainer, TrainingArguments
    from hf_flat.loading import load_weights
    from test_cli_user_data import LABELS, save_tiny_bert, write_csv

    classifier, base, out = str(tmp_path / "cls"), str(tmp_path / "base"), str(tmp_path / "lora")
    save_tiny_bert(classifier, num_labels=3)  # (its tokenizer and encoder; the data is prepared for 3 classes)
    BertForMaskedLM.from_pretrained(classifier).save_pretrained(base)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(classifier).save_pretrained(base)
    data = write_csv(tmp_path / "my.csv", [label + 1 for label in LABELS])  # 3 classes, where the base has none
    train = preprocess(load_splits(data)["train"], classifier, max_length=16)
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base, num_labels=3),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"],
                                      init_lora_weights=False))
    args = TrainingArguments(output_dir=out, flat_method="sam", optim="sgd", learning_rate=0.5,
                             per_device_train_batch_size=4, max_steps=2, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    FlatTrainer(model=model, args=args, train_dataset=train).train()
    model.save_pretrained(out)

    # (the pooler, which the masked LM lacks and the adapter does not hold, is initialised afresh: seeded alike)
    torch.manual_seed(0)
    loaded, _ = load_weights(out, "cpu")
    assert isinstance(loaded, BertForSequenceClassification) and loaded.config.num_labels == 3
    torch.manual_seed(0)
    by_hand = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base, num_labels=3), out)
    by_hand = by_hand.merge_and_unload().state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, by_hand[key], rtol=0, atol=0, msg=key)
    run(["sharpness", out, "--data", data, "--max_length", "16", "--m", "4", "--n", "1", "--n_average", "1",
         "--directions", "2", "--hessian_iterations", "2", "--output_dir", str(tmp_path / "s")])
