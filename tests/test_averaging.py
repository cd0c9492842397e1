"""SWA, EMA and WASAM against references built from weights recorded by a test callback."""

import copy
import math

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from helpers import RecordingCollator, TinyData, TinyNet, sgd_args


class WeightRecorder(TrainerCallback):
    """The live weights after every optimizer step: {global_step: state_dict}."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(tmp_path, model=None, data=None, eval_data=None, **overrides):
    recorder = WeightRecorder()
    trainer = FlatTrainer(
        model=model if model is not None else TinyNet(),
        args=sgd_args(tmp_path, **{"num_train_epochs": 3, **overrides}),
        train_dataset=data if data is not None else TinyData(),
        eval_dataset=eval_data,
        data_collator=RecordingCollator(),
        callbacks=[recorder],
    )
    trainer.train()
    return trainer, recorder.weights


def mean_of(weights, steps, keys):
    return {k: torch.stack([weights[t][k].float() for t in steps]).mean(0) for k in keys}


def assert_model_holds(model, expected, atol=1e-6):
    state = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k].float(), v, atol=atol, rtol=0)


PARAMS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize(
    "freq, max_steps, expected_steps",
    [
        (2, -1, [6, 8, 10, 12]),  # 12 steps, start = ceil(0.5 * 12) = 6
        (5, -1, [10]),
        (0, -1, [8, 12]),  # epochs end at steps 4, 8, 12
        (0, 10, [8, 10]),  # max_steps ends the third epoch early, start = 5
    ],
)
def test_swa_snapshots_and_running_mean(tmp_path, freq, max_steps, expected_steps):
    trainer, weights = train(tmp_path, flat_method="swa", average_start=0.5, average_freq=freq, max_steps=max_steps)
    assert trainer.averaging.count == len(expected_steps)
    assert trainer.averaging.start_step == math.ceil(0.5 * trainer.state.max_steps)
    assert_model_holds(trainer.model, mean_of(weights, expected_steps, PARAMS))
    # the live weights were different: the model really was replaced
    assert not torch.allclose(trainer.model.fc1.weight, weights[trainer.state.global_step]["fc1.weight"])


def test_average_start_zero_starts_at_step_one(tmp_path):
    trainer, weights = train(tmp_path, flat_method="swa", average_start=0.0, average_freq=1, num_train_epochs=1)
    assert trainer.averaging.start_step == 1
    assert_model_holds(trainer.model, mean_of(weights, [1, 2, 3, 4], PARAMS))


def test_ema_reference(tmp_path):
    trainer, weights = train(tmp_path, flat_method="ema", average_start=0.5, ema_decay=0.9)
    v = {k: weights[6][k].float() for k in PARAMS}  # initialised at start_step = 6
    for t in range(7, 13):
        v = {k: 0.9 * v[k] + 0.1 * weights[t][k] for k in PARAMS}
    assert trainer.averaging.count == 7
    assert_model_holds(trainer.model, v)


@pytest.mark.parametrize("flat_method, base", [("wasam", "sam"), ("asam+swa", "asam"), ("sam+ema", "sam")])
def test_perturbation_plus_averaging(tmp_path, flat_method, base):
    """The trajectory is the perturbation method's own; the final model is its average."""
    initial = TinyNet()
    combined, weights = train(
        tmp_path / "combined", copy.deepcopy(initial), flat_method=flat_method, average_start=0.5, average_freq=2,
        ema_decay=0.5,
    )
    alone, alone_weights = train(tmp_path / "alone", copy.deepcopy(initial), flat_method=base)
    for t in weights:
        for k in PARAMS:
            assert torch.equal(weights[t][k], alone_weights[t][k]), (t, k)
    if combined.args.flat_averaging == "swa":
        expected = mean_of(weights, [6, 8, 10, 12], PARAMS)
    else:
        expected = {k: weights[6][k] for k in PARAMS}
        for t in range(7, 13):
            expected = {k: 0.5 * expected[k] + 0.5 * weights[t][k] for k in PARAMS}
    assert_model_holds(combined.model, expected)
    assert any("perturbed_loss" in h for h in combined.state.log_history)


def batchnorm_by_hand(model, averaged, data, batch_size=4):
    """Running statistics of `averaged` weights: reset, momentum None, one in-order pass."""
    model = copy.deepcopy(model)
    model.load_state_dict({**model.state_dict(), **averaged})
    model.bn.reset_running_stats()
    model.bn.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            model(torch.stack([data[j]["x"] for j in range(i, min(i + batch_size, len(data)))]))
    return model.bn


def test_batchnorm_statistics_are_recomputed_for_the_average(tmp_path):
    data = TinyData()
    trainer, weights = train(tmp_path, TinyNet(batchnorm=True), data, flat_method="swa", average_start=0.5)
    averaged = mean_of(weights, [8, 12], PARAMS + ["bn.weight", "bn.bias"])
    assert_model_holds(trainer.model, averaged)
    bn = batchnorm_by_hand(TinyNet(batchnorm=True), averaged, data)
    torch.testing.assert_close(trainer.model.bn.running_mean, bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(trainer.model.bn.running_var, bn.running_var, atol=1e-6, rtol=0)
    assert trainer.model.bn.momentum == 0.1  # restored
    # and they differ from the live run's statistics
    assert not torch.allclose(trainer.model.bn.running_mean, weights[12]["bn.running_mean"], atol=1e-4)


class DropoutNet(TinyNet):
    """TinyNet with BatchNorm and dropout: training consumes random numbers."""

    def __init__(self):
        super().__init__(batchnorm=True)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, labels=None):
        logits = self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_evaluation_of_the_average_leaves_training_untouched(tmp_path):
    """eval_avg_ metrics appear once averaging has begun and equal a hand computation; the live
    weights are bit for bit those of the same run without the averaged evaluations (SAM with the
    same evaluation schedule: the Trainer's own evaluation draws from the random stream, so the
    control keeps it)."""
    data, eval_data = TinyData(), TinyData(n=8, seed=5)
    initial = DropoutNet()
    schedule = dict(eval_strategy="steps", eval_steps=3)
    evaluated, weights = train(
        tmp_path / "eval", copy.deepcopy(initial), data, eval_data,
        flat_method="wasam", average_start=0.5, average_freq=2, **schedule,
    )
    control, control_weights = train(tmp_path / "control", copy.deepcopy(initial), data, eval_data, flat_method="sam", **schedule)
    assert sorted(weights) == sorted(control_weights) == list(range(1, 13))
    for t in control_weights:
        for k, v in control_weights[t].items():
            assert torch.equal(weights[t][k], v), (t, k)
    control_evals = [h["eval_loss"] for h in control.state.log_history if "eval_loss" in h]
    assert [h["eval_loss"] for h in evaluated.state.log_history if "eval_loss" in h] == control_evals

    evals = {h["step"]: h for h in evaluated.state.log_history if "eval_loss" in h}
    avg_evals = {h["step"]: h for h in evaluated.state.log_history if "eval_avg_loss" in h}
    assert sorted(evals) == [3, 6, 9, 12]
    assert sorted(avg_evals) == [3, 6, 9, 12]
    # before the first snapshot (step 6) the average is the live model
    assert avg_evals[3]["eval_avg_loss"] == evals[3]["eval_loss"] and "eval_avg_runtime" not in avg_evals[3]
    keys = PARAMS + ["bn.weight", "bn.bias"]
    for step, snapshots in [(6, [6]), (9, [6, 8]), (12, [6, 8, 10, 12])]:
        bn = batchnorm_by_hand(initial, mean_of(weights, snapshots, keys), data)
        model = copy.deepcopy(initial).eval()
        model.load_state_dict({**model.state_dict(), **mean_of(weights, snapshots, keys)})
        model.bn.running_mean.copy_(bn.running_mean)
        model.bn.running_var.copy_(bn.running_var)
        with torch.no_grad():
            loss = model(eval_data.x, eval_data.y)["loss"].item()
        assert avg_evals[step]["eval_avg_loss"] == pytest.approx(loss, abs=1e-5), step
        assert "eval_avg_runtime" in avg_evals[step]


def test_evaluate_returns_both_and_after_training_evaluates_the_average(tmp_path):
    eval_data = TinyData(n=8, seed=5)
    trainer, _ = train(tmp_path, eval_data=eval_data, flat_method="swa", average_start=0.5, eval_strategy="epoch")
    last = [h for h in trainer.state.log_history if "eval_avg_loss" in h][-1]
    metrics = trainer.evaluate()  # after training: the model holds the average
    assert "eval_avg_loss" not in metrics
    assert metrics["eval_loss"] == pytest.approx(last["eval_avg_loss"], abs=1e-6)


def test_checkpoint_holds_the_average_and_resume_reproduces_it(tmp_path):
    common = dict(flat_method="wasam", average_start=0.25, average_freq=2, save_strategy="steps", save_steps=3)
    full, weights = train(tmp_path / "full", **common)
    state_file = tmp_path / "full" / "checkpoint-9" / "hf_flat_state.safetensors"
    with safe_open(state_file, framework="pt") as f:  # plain safetensors: loads without running code
        meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["averaging"] == "swa" and meta["averaging_count"] == "3"  # snapshots 4, 6, 8
    expected = mean_of(weights, [4, 6, 8], PARAMS)
    for k in PARAMS:
        assert saved[f"averaging.{k}"].dtype == torch.float32
        torch.testing.assert_close(saved[f"averaging.{k}"], expected[k], atol=1e-6, rtol=0)

    for checkpoint in ["checkpoint-3", "checkpoint-9"]:
        resumed = FlatTrainer(
            model=TinyNet(), args=sgd_args(tmp_path / f"resumed-{checkpoint}", num_train_epochs=3, **common),
            train_dataset=TinyData(),
        )
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / checkpoint))
        assert resumed.averaging.count == full.averaging.count == 5
        assert_model_holds(resumed.model, {k: v.float() for k, v in full.model.state_dict().items()}, atol=1e-6)


def test_lora_averages_the_adapters_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer, weights = train(tmp_path, model, flat_method="swa", average_start=0.5, average_freq=3)
    assert all("lora_" in n for n in trainer.averaging.average) and len(trainer.averaging.average) == 2
    lora_keys = [k for k in weights[12] if "lora_" in k]
    assert_model_holds(trainer.model, mean_of(weights, [6, 9, 12], lora_keys))
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_average_on_cpu_gives_the_same_result(tmp_path):
    a, _ = train(tmp_path / "a", flat_method="swa", average_start=0.5, average_freq=2)
    b, _ = train(tmp_path / "b", flat_method="swa", average_start=0.5, average_freq=2, average_on_cpu=True)
    assert all(t.device.type == "cpu" for t in b.averaging.average.values())
    assert_model_holds(b.model, {k: v.float() for k, v in a.model.state_dict().items()}, atol=0)


def test_save_model_writes_the_averaged_weights(tmp_path):
    from safetensors.torch import load_file

    trainer, weights = train(tmp_path, flat_method="ema", average_start=0.5, ema_decay=0.5)
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    for k in PARAMS:
        assert torch.equal(saved[k], trainer.model.state_dict()[k])
        assert not torch.equal(saved[k], weights[12][k])


def test_models_without_batchnorm_skip_the_recomputation():
    from hf_flat.averaging import recompute_batchnorm

    def no_batches():
        raise AssertionError("the training data must not be read for a model without BatchNorm")

    assert recompute_batchnorm(TinyNet(), no_batches) is False
    model = TinyNet(batchnorm=True)
    assert recompute_batchnorm(model, lambda: [{"x": torch.randn(4, 4)}]) is True
    assert model.bn.num_batches_tracked.item() == 1 and model.bn.momentum == 0.1


def test_a_dict_of_eval_sets_gets_eval_avg_metrics_for_each(tmp_path):
    evals = {"a": TinyData(n=8, seed=5), "b": TinyData(n=8, seed=6)}
    trainer, _ = train(tmp_path, eval_data=evals, flat_method="ema", average_start=0.5, eval_strategy="epoch")
    last = {k: v for h in trainer.state.log_history for k, v in h.items()}
    for name in evals:
        assert f"eval_{name}_loss" in last and f"eval_avg_{name}_loss" in last


class GradualUnfreezing(TrainerCallback):
    """fc1 is frozen at the start and joins the trainable set after step `join` (at the end of that
    step, or at the beginning of the next one: then it trains in that step); fc2 leaves it after
    step `leave` (as gradual unfreezing / freezing callbacks do)."""

    def __init__(self, join, leave, event="on_step_end"):
        self.join, self.leave, self.event = join, leave, event

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.event == "on_step_begin" and state.global_step == self.join:
            model.fc1.requires_grad_(True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.event == "on_step_end" and state.global_step == self.join:
            model.fc1.requires_grad_(True)
        if state.global_step == self.leave:
            model.fc2.requires_grad_(False)


@pytest.mark.parametrize("event", ["on_step_end", "on_step_begin"])
@pytest.mark.parametrize("method", ["swa", "ema"])
def test_parameters_joining_and_leaving_the_trainable_set_keep_their_own_average(tmp_path, method, event):
    """The average is kept by name: each layer gets its own trajectory's mean, including a layer
    that joins after averaging began (its frozen value stands for the earlier snapshots) and one
    that leaves (its frozen value keeps entering). eval_avg_loss is the loss of that average."""
    model = TinyNet()
    model.fc1.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # holds fc1 too, so it trains once unfrozen
    recorder, eval_data = WeightRecorder(), TinyData(n=8, seed=5)
    trainer = FlatTrainer(
        model=model,
        args=sgd_args(tmp_path, num_train_epochs=3, flat_method=method, average_start=0.25, average_freq=1,
                      ema_decay=0.5, eval_strategy="steps", eval_steps=12),
        train_dataset=TinyData(), eval_dataset=eval_data, data_collator=RecordingCollator(),
        callbacks=[recorder, GradualUnfreezing(join=5, leave=9, event=event)], optimizers=(optimizer, None),
    )
    trainer.train()
    weights = recorder.weights
    assert not torch.equal(weights[4]["fc1.weight"], weights[12]["fc1.weight"])  # fc1 did train
    assert torch.equal(weights[9]["fc2.weight"], weights[12]["fc2.weight"])  # fc2 did stop
    steps = list(range(3, 13))  # start_step = ceil(0.25 * 12) = 3, a snapshot every step
    if method == "swa":
        expected = mean_of(weights, steps, PARAMS)
    else:
        expected = {k: weights[3][k].float() for k in PARAMS}
        for t in steps[1:]:
            expected = {k: 0.5 * expected[k] + 0.5 * weights[t][k] for k in PARAMS}
    [avg_eval] = [h for h in trainer.state.log_history if "eval_avg_loss" in h]
    assert_model_holds(trainer.model, expected)
    by_hand = TinyNet()
    by_hand.load_state_dict(expected)
    with torch.no_grad():
        assert avg_eval["eval_avg_loss"] == pytest.approx(by_hand(eval_data.x, eval_data.y)["loss"].item(), abs=1e-6)
