"""Flat arguments with `TrainingArguments` subclasses (Seq2Seq, user classes), re-checking, pickling."""

import copy
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from transformers import HfArgumentParser, Seq2SeqTrainingArguments
from transformers import TrainingArguments as HFTrainingArguments

from hf_flat import FlatSeq2SeqTrainingArguments, FlatTrainer, FlatTrainingArguments, TrainingArguments, flat_arguments_class
from hf_flat.args import FlatArgumentsMixin
from hf_flat.trainer import as_flat_args
from helpers import TinyData, TinyNet

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class MyArgs(HFTrainingArguments):
    """A user's own subclass, with one extra field and its own check (module level, so it pickles)."""

    my_field: int = field(default=3, metadata={"help": "An extra field of the user's."})

    def __post_init__(self):
        if self.my_field < 0:
            raise ValueError("my_field must be >= 0")
        super().__post_init__()


def small(output_dir, **kw):
    """Keyword arguments for a short CPU run of TinyNet on TinyData."""
    values = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, save_strategy="no", optim="sgd",
        per_device_train_batch_size=4, num_train_epochs=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    return {**values, **kw}


def test_flat_trainer_accepts_seq2seq_training_arguments(tmp_path):
    args = Seq2SeqTrainingArguments(**small(tmp_path, predict_with_generate=True, sortish_sampler=True))
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    assert isinstance(trainer.args, FlatSeq2SeqTrainingArguments)
    assert isinstance(trainer.args, Seq2SeqTrainingArguments)
    assert (trainer.args.predict_with_generate, trainer.args.sortish_sampler) == (True, True)
    assert (trainer.args.flat_method, trainer.args.flat_perturbation, trainer.args.flat_averaging) == ("none", None, None)
    trainer.train()
    assert trainer.state.global_step == 4


def test_as_flat_args_keeps_every_init_field_of_a_subclass(tmp_path):
    plain = Seq2SeqTrainingArguments(**small(tmp_path, generation_max_length=17, learning_rate=0.3, seed=5))
    flat = as_flat_args(plain)
    expected = plain.to_dict()
    assert {k: v for k, v in flat.to_dict().items() if k in expected} == expected
    assert as_flat_args(flat) is flat
    assert type(as_flat_args(MyArgs(**small(tmp_path), my_field=9))) is flat_arguments_class(MyArgs)
    assert as_flat_args(MyArgs(**small(tmp_path), my_field=9)).my_field == 9
    assert type(as_flat_args(HFTrainingArguments(**small(tmp_path)))) is FlatTrainingArguments


def test_flat_seq2seq_training_arguments_build_and_validate():
    args = FlatSeq2SeqTrainingArguments("out", flat_method="sam", predict_with_generate=True, report_to="none")
    assert (args.flat_perturbation, args.predict_with_generate) == ("sam", True)
    assert isinstance(args, Seq2SeqTrainingArguments) and isinstance(args, FlatArgumentsMixin)
    assert flat_arguments_class(Seq2SeqTrainingArguments) is FlatSeq2SeqTrainingArguments
    assert flat_arguments_class(FlatSeq2SeqTrainingArguments) is FlatSeq2SeqTrainingArguments
    assert flat_arguments_class(HFTrainingArguments) is FlatTrainingArguments is TrainingArguments
    with pytest.raises(ValueError, match=r"sam_rho=-1 is not allowed: it must be a finite number > 0"):
        FlatSeq2SeqTrainingArguments("out", flat_method="sam", sam_rho=-1, report_to="none")


def test_hf_argument_parser_gives_both_flag_sets():
    parser = HfArgumentParser(FlatSeq2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--flat_method", "wasam", "--sam_rho", "0.1", "--predict_with_generate",
         "--generation_max_length", "32", "--report_to", "none"]
    )
    assert (args.flat_perturbation, args.flat_averaging, args.sam_rho) == ("sam", "swa", 0.1)
    assert (args.predict_with_generate, args.generation_max_length) == (True, 32)


def test_user_subclass_through_flat_arguments_class():
    cls = flat_arguments_class(MyArgs)
    assert cls is flat_arguments_class(MyArgs)  # cached
    assert issubclass(cls, MyArgs) and issubclass(cls, FlatArgumentsMixin)
    args = cls("out", my_field=7, flat_method="asam", sam_rho=0.5, report_to="none")
    assert (args.my_field, args.flat_perturbation, args.sam_rho) == (7, "asam", 0.5)
    with pytest.raises(ValueError, match=r"sam_rho=0 is not allowed"):
        cls("out", flat_method="sam", sam_rho=0, report_to="none")
    with pytest.raises(ValueError, match="my_field must be >= 0"):  # the user's own check still runs
        cls("out", my_field=-1, report_to="none")
    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(
        ["--output_dir", "out", "--my_field", "11", "--flat_method", "ema", "--report_to", "none"]
    )
    assert (parsed.my_field, parsed.flat_averaging) == (11, "ema")
    with pytest.raises(TypeError, match="TrainingArguments subclass"):
        flat_arguments_class(dict)


_LOAD_IN_FRESH_PROCESS = """
import json, sys, torch
from test_args_subclasses import MyArgs
args = torch.load(sys.argv[1], weights_only=False)
print(json.dumps({"type": type(args).__name__, "is_my_args": isinstance(args, MyArgs), "my_field": args.my_field,
                  "flat": [args.flat_perturbation, args.flat_averaging], "dict": args.to_json_string()}))
"""


def test_dynamic_class_survives_pickle_in_a_fresh_process(tmp_path):
    args = flat_arguments_class(MyArgs)(**small(tmp_path), my_field=8, flat_method="sam+ema", average_start=0.5)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    trainer.train()
    trainer.save_model()  # writes training_args.bin with torch.save(self.args)
    assert os.path.exists(tmp_path / "training_args.bin")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(tmp_path / "training_args.bin")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["type"] == "FlatMyArgs" and loaded["is_my_args"] and loaded["my_field"] == 8
    assert loaded["flat"] == ["sam", "ema"]
    assert json.loads(loaded["dict"]) == json.loads(args.to_json_string())
    # the same in this process, and through copy
    for again in (pickle.loads(pickle.dumps(args)), copy.deepcopy(args), copy.copy(args)):
        assert type(again) is type(args) and again.to_dict() == args.to_dict()


def test_subclass_of_a_dynamic_class_pickles_as_itself():
    again = pickle.loads(pickle.dumps(MyFlatArgs("out", flat_method="sam", report_to="none")))
    assert type(again) is MyFlatArgs and again.flat_perturbation == "sam"


@dataclass
class MyFlatArgs(flat_arguments_class(MyArgs)):
    """A user class built on top of a class that `flat_arguments_class` made."""


def test_check_flat_arguments_catches_values_set_after_construction():
    args = TrainingArguments("out", flat_method="sam", report_to="none", use_cpu=True)
    args.check_flat_arguments()  # a constructed (post-processed) instance passes
    args.sam_rho = -1
    with pytest.raises(ValueError, match=r"sam_rho=-1 is not allowed: it must be a finite number > 0"):
        args.check_flat_arguments()
    args.sam_rho, args.flat_method = 0.05, "lookahead"
    with pytest.raises(ValueError, match=r"flat_method='lookahead' is not supported"):
        args.check_flat_arguments()
    args = TrainingArguments("out", fsdp="full_shard", report_to="none", use_cpu=True)
    args.flat_method, args.sam_m = "asam", 2
    with pytest.raises(ValueError, match=r"sam_m=2 is not allowed with flat_method='asam' under FSDP"):
        args.check_flat_arguments()
    args = TrainingArguments("out", optim="lomo", report_to="none", use_cpu=True)
    args.flat_method = "sam"
    with pytest.raises(ValueError, match=r"optim='lomo' updates the weights inside backward"):
        args.check_flat_arguments()
    args = flat_arguments_class(MyArgs)(
        "out", load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", report_to="none"
    )
    args.flat_method = "swa"
    with pytest.raises(ValueError, match=r"load_best_model_at_end=True is not supported with flat_method='swa'"):
        args.check_flat_arguments()


def test_flat_properties_follow_flat_method_and_are_read_only():
    args = FlatSeq2SeqTrainingArguments("out", report_to="none")
    assert (args.flat_perturbation, args.flat_averaging) == (None, None)
    args.flat_method = "wasam"  # what a hyperparameter search does
    assert (args.flat_perturbation, args.flat_averaging) == ("sam", "swa")
    args.flat_method = "EMA"
    assert (args.flat_perturbation, args.flat_averaging) == (None, "ema")
    with pytest.raises(AttributeError):
        args.flat_perturbation = "sam"
    assert "flat_perturbation" not in args.to_dict() and "flat_perturbation" not in str(args)
