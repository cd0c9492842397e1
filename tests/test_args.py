"""FlatTrainingArguments: parsing, defaults and every bad input."""

import math
import re

import pytest
from transformers import HfArgumentParser

from hf_flat import FlatTrainer, FlatTrainingArguments, TrainingArguments, accepted_flat_methods
from helpers import TinyData, TinyNet


def make(output_dir="out", **kw):
    return TrainingArguments(output_dir, report_to="none", use_cpu=True, **kw)


def test_defaults_and_alias():
    args = make()
    assert TrainingArguments is FlatTrainingArguments
    assert (args.flat_method, args.sam_rho, args.asam_eta) == ("none", 0.05, 0.01)
    assert (args.flat_perturbation, args.flat_averaging) == (None, None)
    assert make(flat_method="ASAM").flat_perturbation == "asam"


def test_hf_argument_parser_gives_the_flags():
    parser = HfArgumentParser(FlatTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--flat_method", "asam", "--sam_rho", "0.5", "--asam_eta", "0", "--report_to", "none"]
    )
    assert (args.flat_method, args.sam_rho, args.asam_eta, args.flat_perturbation) == ("asam", 0.5, 0.0, "asam")


@pytest.mark.parametrize("value", ["sgd", "", "sam+", "swa+sam", "sam+asam", "swa+ema", "wasam+ema", "sam+saf", "saf+mesa",
                                   "lookahead", "lawa+swa"])
def test_unknown_or_unimplemented_flat_method(value):
    with pytest.raises(ValueError) as err:
        make(flat_method=value)
    message = str(err.value)
    assert f"flat_method={value!r}" in message
    for name in accepted_flat_methods():
        assert name in message
    perturbations = ["sam", "asam", "avg_sam", "gsam", "looksam", "esam", "saf", "mesa"]
    assert accepted_flat_methods() == [
        "none", *perturbations, "swa", "ema", "lawa",
        *(f"{p}+{a}" for p in perturbations for a in ("swa", "ema", "lawa")), "wasam",
    ]


@pytest.mark.parametrize(
    "value, parsed",
    [("swa", (None, "swa")), ("ema", (None, "ema")), ("wasam", ("sam", "swa")), ("asam+ema", ("asam", "ema"))],
)
def test_averaging_methods_and_combinations(value, parsed):
    args = make(flat_method=value)
    assert (args.flat_perturbation, args.flat_averaging) == parsed


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("average_start", 1.0, r"average_start=1.0 .* \[0, 1\)"),
        ("average_start", -0.1, r"average_start=-0.1 .* \[0, 1\)"),
        ("average_start", math.nan, r"average_start=nan"),
        ("average_freq", -1, r"average_freq=-1 .* integer >= 0"),
        ("average_freq", 1.5, r"average_freq=1.5 .* integer >= 0"),
        ("ema_decay", 1.0, r"ema_decay=1.0 .* \(0, 1\)"),
        ("ema_decay", 0.0, r"ema_decay=0.0 .* \(0, 1\)"),
    ],
)
def test_bad_averaging_arguments(field, value, message):
    with pytest.raises(ValueError, match=message):
        make(flat_method="swa", **{field: value})


def test_load_best_model_at_end_is_refused_with_averaging():
    with pytest.raises(ValueError, match=r"load_best_model_at_end=True is not supported with flat_method='wasam'.*eval_avg_loss"):
        make(
            flat_method="wasam", load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps",
            metric_for_best_model="eval_loss",
        )
    assert make(flat_method="sam", load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")


@pytest.mark.parametrize("rho", [0, -0.1, math.nan, math.inf, "0.1"])
def test_bad_sam_rho(rho):
    with pytest.raises(ValueError, match=r"sam_rho=.* must be a finite number > 0"):
        make(flat_method="sam", sam_rho=rho)


@pytest.mark.parametrize("eta", [-0.01, math.nan, math.inf])
def test_bad_asam_eta(eta):
    with pytest.raises(ValueError, match=r"asam_eta=.* must be a finite number >= 0"):
        make(flat_method="asam", asam_eta=eta)


def test_zero_eta_is_allowed():
    assert make(flat_method="asam", asam_eta=0.0).asam_eta == 0.0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["sam", "avg_sam", "mesa", "swa", "wasam"])
def test_deepspeed_is_refused_with_one_reason_per_zero_stage(method, stage):
    with pytest.raises(ValueError) as error:
        make(flat_method=method, deepspeed={"zero_optimization": {"stage": stage}})
    message = str(error.value)
    assert message.startswith(f"flat_method={method!r} cannot run under DeepSpeed (this configuration: stage {stage}).")
    for s in range(4):  # one sentence per stage
        assert message.count(f"ZeRO stage {s}:") == 1
    assert "Use FSDP instead" in message and "fsdp_config={'version': 2}" in message


def test_saf_runs_under_any_fsdp():
    # SAF reads only the model's outputs (under DeepSpeed too, which this machine cannot construct)
    make(flat_method="saf", fsdp="full_shard", fsdp_config={"version": 1})


@pytest.mark.parametrize("method", ["sam", "asam", "avg_sam", "sam+ema"])
@pytest.mark.parametrize("setting", [{"sam_scope": "micro"}, {"sam_m": 2}])
def test_fsdp_refuses_a_perturbation_per_process_or_micro_batch(method, setting):
    with pytest.raises(ValueError) as error:
        make(flat_method=method, fsdp="full_shard", per_device_train_batch_size=4, **setting)
    key, value = next(iter(setting.items()))
    message = str(error.value)
    assert message.startswith(f"{key}={value!r} is not allowed with flat_method={method!r} under FSDP")
    assert "all of them must add the same perturbation" in message and "sam_scope='step' or leave it None" in message


@pytest.mark.parametrize("method", ["sam", "asam", "avg_sam", "mesa", "swa", "ema", "wasam", "mesa+ema"])
def test_every_method_but_fsdp1_is_accepted_under_fsdp(method):
    args = make(flat_method=method, fsdp="full_shard", fsdp_config={"version": 2})
    assert args.sam_scope is None  # chosen when the trainer sees the sharded model: "step"
    if method in ("sam", "asam", "avg_sam"):
        make(flat_method=method, fsdp="full_shard", sam_scope="step")
    with pytest.raises(ValueError, match=re.escape(f"flat_method={method!r} works on FSDP2's sharded parameters, not on "
                                                   "FSDP1's flattened ones (FSDP version 1): set fsdp_config={'version': 2}")):
        make(flat_method=method, fsdp="full_shard", fsdp_config={"version": 1})


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise"])
def test_optimizers_that_step_inside_backward_are_refused(optim):
    with pytest.raises(ValueError, match=rf"optim='{optim}' updates the weights inside backward"):
        make(flat_method="sam", optim=optim)


@pytest.mark.parametrize(
    "flag, settings, message",
    [
        ("is_deepspeed_enabled", {}, r"flat_method='sam' cannot run under DeepSpeed\. ZeRO stage 0"),
        ("is_fsdp_enabled", {}, r"FSDP1's flattened ones \(FSDP version None\)"),  # no FSDP2 plugin behind the flag
        ("is_fsdp_enabled", {"sam_scope": "micro"}, r"sam_scope='micro' is not allowed .* under FSDP"),
    ],
)
def test_sharded_launch_is_refused_when_training_starts(tmp_path, flag, settings, message):
    """`accelerate launch --config_file ...` can turn DeepSpeed / FSDP on without any argument:
    the trainer checks what its Accelerator actually runs before the first step."""
    args = make(flat_method="sam", output_dir=str(tmp_path), **settings)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    setattr(trainer, flag, True)  # what accelerate's state says under such a launch config
    if settings:  # an FSDP2 plugin, so that only the scope is wrong
        trainer.accelerator.state.fsdp_plugin = type("Plugin", (), {"fsdp_version": 2})()
    try:
        with pytest.raises(ValueError, match=message):
            trainer.train()
    finally:
        trainer.accelerator.state.fsdp_plugin = None
    assert trainer.state.global_step == 0


def test_megatron_and_models_sharded_at_load_time_are_refused_when_training_starts(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    trainer = FlatTrainer(model=TinyNet(), args=make(flat_method="swa", output_dir=str(tmp_path)), train_dataset=TinyData())
    monkeypatch.setattr(trainer.accelerator.state, "distributed_type", DistributedType.MEGATRON_LM)
    with pytest.raises(ValueError, match=r"flat_method='swa' is not supported with Megatron-LM.*Use FSDP"):
        trainer.train()
    monkeypatch.undo()
    trainer = FlatTrainer(model=TinyNet(), args=make(flat_method="asam", output_dir=str(tmp_path)), train_dataset=TinyData())
    trainer.is_distributed_loading_by_transformers = True  # from_pretrained(..., distributed loading) did the sharding
    with pytest.raises(ValueError, match=r"flat_method='asam' does not support a model sharded at load time.*"
                                         r"pass fsdp='full_shard' with fsdp_config=\{'version': 2\}"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_non_flat_args_are_refused():
    with pytest.raises(TypeError, match="FlatTrainingArguments"):
        FlatTrainer(model=TinyNet(), args={"flat_method": "sam"})


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("saf_lambda", -0.1, "a finite number >= 0"),
        ("mesa_lambda", float("nan"), "a finite number >= 0"),
        ("saf_tau", 0.0, "a finite number > 0"),
        ("mesa_tau", -1.0, "a finite number > 0"),
        ("saf_start_epoch", -1, "an integer >= 0"),
        ("mesa_start_epoch", 1.5, "an integer >= 0"),
        ("saf_past_epochs", 0, "an integer >= 1"),
        ("mesa_decay", 1.0, r"in \(0, 1\)"),
    ],
)
def test_bad_saf_and_mesa_arguments(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}=.* is not allowed: it must be {allowed}"):
        make(flat_method="saf", **{field: value})


def test_saf_is_not_a_two_pass_method():
    make(flat_method="saf", optim="lomo")  # one pass: fine with optimizers that step inside backward


@pytest.mark.parametrize(
    "method, setting, message",
    [
        ("looksam", {"sam_scope": "micro"}, "its SAM steps take the whole step's gradient, so that g_v is the same"),
        ("looksam", {"sam_m": 2}, "its SAM steps take the whole step's gradient: leave sam_m None"),
        ("looksam+swa", {"sam_interval": 2}, "its SAM steps come every looksam_k steps: set looksam_k instead"),
        ("esam", {"sam_scope": "step"}, "ESAM perturbs each micro-batch on its own"),
        ("esam", {"sam_m": 2}, "ESAM perturbs each micro-batch on its own"),
    ],
)
def test_settings_that_looksam_and_esam_cannot_honour_are_refused(method, setting, message):
    (key, value), = setting.items()
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} is not allowed with flat_method={method!r}: ")
                       + ".*" + re.escape(message)):
        make(flat_method=method, per_device_train_batch_size=4, **setting)


def test_esam_is_refused_under_fsdp_with_what_to_use_instead():
    with pytest.raises(ValueError, match=r"flat_method='esam' cannot run under FSDP: ESAM perturbs each micro-batch "
                                         r"and process on its own.*Use ESAM with DDP, or under FSDP flat_method='sam'"):
        make(flat_method="esam", fsdp="full_shard")
    make(flat_method="gsam", fsdp="full_shard")  # GSAM and LookSAM run under FSDP (tests/test_fsdp.py)
    make(flat_method="looksam", fsdp="full_shard")
