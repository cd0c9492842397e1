"""The example scripts' plumbing (hf_flat/scripts.py), end to end on tiny local data and models:
resuming through each script, JSON configs with flags, training without evaluation data, the
saved image processor, `flat_method` / `flat_settings` / `flat_warnings` in all_results.json, and
one-line errors."""

import csv
import json
import os
import shutil
import sys

import pytest
import torch

from helpers import save_tiny_roberta, save_tiny_t5
from safetensors.torch import load_file

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
for name in ("vit", "glue", "fid"):
    sys.path.insert(0, os.path.join(EXAMPLES, name))

COMMON = ["--use_cpu", "true", "--report_to", "none", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return save_tiny_roberta(tmp_path_factory.mktemp("roberta"))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16, num_labels=2)).save_pretrained(path)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(path)
    return str(path)


def image_folder(path, classes=(("red", (220, 10, 10)), ("blue", (10, 10, 220))), n=4):
    from PIL import Image

    for label, color in classes:
        (path / label).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10, 10), tuple(max(0, c - 20 * i) for c in color)).save(path / label / f"{i}.png")
    return str(path)


def glue_csv(path):
    sentences = ["very good film", "not good", "bad plot", "a good plot", "very bad film", "not bad"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows([[s, int("good" in s)] for s in sentences] * 4)  # 24 rows
    return str(path)


def fid_json(path, n=8):
    base = [
        {"question": "who wrote hamlet", "answers": ["shakespeare"],
         "ctxs": [{"title": "hamlet", "text": "the play hamlet shakespeare"}, {"title": "paris", "text": "paris city"}]},
        {"question": "capital of france", "answers": ["paris"],
         "ctxs": [{"title": "france", "text": "the capital of france is paris"}]},
    ]
    path.write_text(json.dumps((base * n)[:n]))
    return str(path)


def script_args(script, method, tmp_path, models):
    """(module, flags) for 12 optimizer steps of `method` (3 epochs of 4 steps), checkpoints every 6."""
    schedule = ["--flat_method", method, "--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "6",
                "--eval_strategy", "no", "--learning_rate", "0.01", "--average_start", "0.4", "--average_freq", "2",
                "--saf_start_epoch", "1", "--saf_past_epochs", "1", "--mesa_start_epoch", "1", *COMMON]
    if script == "vit":
        import run_vit

        return run_vit, ["--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size",
                         "16", "--hidden_size", "16", "--num_hidden_layers", "1", *schedule]
    if script == "glue":
        import run_glue

        train = glue_csv(tmp_path / "train.csv")
        return run_glue, ["--model_name_or_path", models["glue"], "--train_file", train, "--validation_file", train,
                          "--max_train_samples", "16", "--per_device_train_batch_size", "4", *schedule]
    import run_fid

    (tmp_path / "config.json").write_text(json.dumps({  # a config too: it must keep remove_unused_columns=False
        "_source": "test", "model_name_or_path": models["fid"], "n_context": 2, "text_maxlength": 12,
        "answer_maxlength": 4, "per_device_train_batch_size": 2}))
    return run_fid, [str(tmp_path / "config.json"), "--train_file", fid_json(tmp_path / "train.json"), *schedule]


def count_training_steps(monkeypatch):
    from hf_flat import FlatTrainer

    calls = []
    original = FlatTrainer.training_step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlatTrainer, "training_step", counting)
    return calls


@pytest.mark.parametrize("script, method, how", [
    ("vit", "wasam", "path"), ("vit", "saf", "output_dir"), ("glue", "wasam", "true"), ("glue", "saf", "path"),
    ("fid", "wasam", "output_dir"), ("fid", "mesa", "path"),  # FiD refuses SAF (per-token logits)
])
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, tiny_roberta, tiny_t5, monkeypatch,
                                                              script, method, how):
    module, flags = script_args(script, method, tmp_path, {"glue": tiny_roberta, "fid": tiny_t5})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    full = module.main(flags + ["--output_dir", str(whole)])
    assert (whole / "checkpoint-6").is_dir()
    if how == "path":  # --resume_from_checkpoint PATH, into a new output_dir
        extra = ["--resume_from_checkpoint", str(whole / "checkpoint-6")]
    else:  # the output_dir of a run stopped after checkpoint-6: picked up by itself, or by 'true'
        resumed.mkdir()
        shutil.copytree(whole / "checkpoint-6", resumed / "checkpoint-6")
        extra = ["--resume_from_checkpoint", "true"] if how == "true" else []
    steps = count_training_steps(monkeypatch)
    again = module.main(flags + ["--output_dir", str(resumed)] + extra)
    assert len(steps) == 6  # it resumed: only steps 7 to 12 were trained
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    if "eval_loss" in full:
        assert abs(full["eval_loss"] - again["eval_loss"]) < 1e-6
    saved = json.loads((resumed / "all_results.json").read_text())
    assert saved["flat_method"] == method and isinstance(saved["flat_warnings"], list)
    # information (such as the SAF memory's size) is not recorded as a warning: `hf-flat compare`
    # marks a run with a warning as suspect
    for folder in (whole, resumed):
        warnings = json.loads((folder / "all_results.json").read_text())["flat_warnings"]
        assert not any("SAF memory" in w for w in warnings), warnings
    expected = {"wasam": {"sam_rho", "sam_m", "sam_scope", "sam_start", "sam_interval", "average_start", "average_freq",
                          "average_bn_batches", "swa_lr", "swa_anneal_steps", "swa_anneal_strategy", "swa_cycle_steps"},
                "saf": {"saf_lambda", "saf_tau", "saf_start_epoch", "saf_past_epochs"},
                "mesa": {"mesa_lambda", "mesa_tau", "mesa_decay", "mesa_start_epoch"}}[method]
    assert set(saved["flat_settings"]) == expected
    if method == "wasam":
        assert saved["flat_settings"]["average_freq"] == 2 and saved["flat_settings"]["sam_rho"] == 0.05


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_results(tmp_path, tiny_roberta):
    """The same command again in a finished run's --output_dir resumes from its last checkpoint, the
    end of the run: that trains nothing, so it stops with a one-line error before writing anything,
    and the run's model and all_results.json stay as they were."""
    from hf_flat.scripts import ScriptError

    module, flags = script_args("glue", "mesa", tmp_path, {"glue": tiny_roberta})
    out = tmp_path / "out"
    module.main(flags + ["--output_dir", str(out)])
    assert (out / "checkpoint-12").is_dir()
    results, model = (out / "all_results.json").read_bytes(), (out / "model.safetensors").read_bytes()
    with pytest.raises(ScriptError, match=r"nothing to train: .*checkpoint-12 is already the end of this run \(step 12 of 12\)"):
        module.main(flags + ["--output_dir", str(out)])
    assert (out / "all_results.json").read_bytes() == results and (out / "model.safetensors").read_bytes() == model
    # training longer from the same checkpoint still works
    module.main(flags[:flags.index("--num_train_epochs") + 1] + ["4"] + flags[flags.index("--num_train_epochs") + 2:]
                + ["--output_dir", str(out)])
    assert json.loads((out / "all_results.json").read_text())["epoch"] == 4


def test_resume_errors_name_the_value(tmp_path):
    import run_vit

    from hf_flat.scripts import ScriptError

    with pytest.raises(ScriptError, match="resume_from_checkpoint='.*nowhere' is not a checkpoint folder"):
        run_vit.main(["--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "nowhere"), *COMMON])
    with pytest.raises(ScriptError, match="resume_from_checkpoint=true but output_dir .* holds no checkpoint"):
        run_vit.main(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "true", *COMMON])
    with pytest.raises(ScriptError, match="model_name_or_path='./my-vit': no such folder"):
        run_vit.main(["--output_dir", str(tmp_path), "--model_name_or_path", "./my-vit", *COMMON])


def test_a_json_config_keeps_the_script_defaults_and_flags_win(tmp_path):
    import run_fid
    import run_glue
    import run_vit

    from hf_flat import FlatTrainingArguments
    from hf_flat.scripts import ScriptError, parse_script_args

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"_note": "ignored", "flat_method": "wasam", "num_train_epochs": 3,
                                  "output_dir": str(tmp_path / "out")}))
    for module, expected in ((run_vit, dict(per_device_train_batch_size=32, learning_rate=2e-3, eval_strategy="epoch")),
                             (run_fid, dict(remove_unused_columns=False)),
                             (run_glue, dict(eval_strategy="epoch"))):
        *_, args = parse_script_args((module.DataArguments, module.ModelArguments, FlatTrainingArguments),
                                     module.DEFAULTS, [str(config), "--num_train_epochs", "1"])
        assert (args.flat_method, args.num_train_epochs, args.output_dir) == ("wasam", 1, str(tmp_path / "out"))
        for key, value in expected.items():
            assert str(getattr(getattr(args, key), "value", getattr(args, key))) == str(value), (module, key)
    config.write_text(json.dumps({"sam_roh": 0.1}))
    with pytest.raises(ScriptError, match="unknown key.*sam_roh"):
        parse_script_args((run_vit.DataArguments, run_vit.ModelArguments, FlatTrainingArguments), run_vit.DEFAULTS,
                          [str(config)])


@pytest.mark.parametrize("script, config", [("vit", "vit_b16_cifar10_wasam.json"), ("vit", "vit_b16_cifar100_wasam.json"),
                                            ("glue", "roberta_base_rte.json"), ("glue", "roberta_base_sst2.json"),
                                            ("fid", "fid_base_nq.json")])
def test_the_shipped_configs_load(script, config):
    from hf_flat import FlatTrainingArguments
    from hf_flat.scripts import parse_script_args

    module = __import__(f"run_{script}")
    path = os.path.join(EXAMPLES, script, "configs", config)
    data, model, args = parse_script_args((module.DataArguments, module.ModelArguments, FlatTrainingArguments),
                                          module.DEFAULTS, [path, "--use_cpu", "true"])
    written = json.loads(open(path).read())
    assert args.flat_method == written["flat_method"] and model.model_name_or_path == written["model_name_or_path"]
    if script == "fid":
        assert args.remove_unused_columns is False and data.n_context == 100


def test_an_image_folder_run_without_evaluation_saves_the_model_and_its_processor(tmp_path, tiny_vit):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import run_vit

    train = image_folder(tmp_path / "train")
    out = tmp_path / "out"
    metrics = run_vit.main(["--train_dir", train, "--model_name_or_path", tiny_vit, "--output_dir", str(out),
                            "--eval_strategy", "no", "--flat_method", "saf", "--num_train_epochs", "1",
                            "--per_device_train_batch_size", "4", *COMMON])
    assert not any(k.startswith("eval_") for k in metrics)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "blue", 1: "red"}
    AutoImageProcessor.from_pretrained(out)  # what `hf-flat plane` / `interpolate` load
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["flat_method"] == "saf" and saved["flat_settings"]["saf_start_epoch"] == 5
    assert any("SAF is off for this run" in w for w in saved["flat_warnings"])
    assert not (out / "eval_results.json").exists()
    # with evaluation on (the default) but no evaluation data: a message that says what to do
    with pytest.raises(ValueError, match="no evaluation data: give --validation_dir .* --eval_strategy no"):
        run_vit.main(["--train_dir", train, "--model_name_or_path", tiny_vit, "--output_dir", str(tmp_path / "x"), *COMMON])


def test_image_folders_share_their_class_ids(tmp_path, tiny_vit):
    import run_vit

    from hf_flat.scripts import ScriptError

    train = image_folder(tmp_path / "train", n=2)  # blue = 0, red = 1
    red_only = image_folder(tmp_path / "val", classes=(("red", (200, 0, 0)),), n=2)
    _, evaluation, names, _ = run_vit.load_data(run_vit.DataArguments(train_dir=train, validation_dir=red_only))
    assert names == ["blue", "red"] and list(evaluation["labels"]) == [1, 1]  # alone, 'red' would be 0
    odd = image_folder(tmp_path / "odd", classes=(("green", (0, 200, 0)),), n=2)
    with pytest.raises(ScriptError, match="class\\(es\\) green that the training data lacks"):
        run_vit.main(["--train_dir", train, "--validation_dir", odd, "--model_name_or_path", tiny_vit,
                      "--output_dir", str(tmp_path / "out2"), *COMMON])


def test_glue_without_evaluation_data_saves_the_model(tmp_path, tiny_roberta):
    import run_glue

    out = tmp_path / "out"
    metrics = run_glue.main(["--model_name_or_path", tiny_roberta, "--train_file", glue_csv(tmp_path / "train.csv"),
                             "--output_dir", str(out), "--eval_strategy", "no", "--num_train_epochs", "1", *COMMON])
    assert not any(k.startswith("eval_") for k in metrics) and (out / "model.safetensors").exists()
    assert json.loads((out / "all_results.json").read_text())["flat_method"] == "none"


def test_run_fid_without_train_file_is_one_line(tmp_path, monkeypatch, capsys):
    import run_fid

    from hf_flat.scripts import run

    monkeypatch.setattr(sys, "argv", ["run_fid.py", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        run(run_fid.main)  # what `python run_fid.py --output_dir DIR` runs
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("run_fid.py: error: --train_file is required: a FiD JSON file of "
                                       "{question, answers, ctxs} examples\n")
