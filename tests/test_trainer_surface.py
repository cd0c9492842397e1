"""FlatTrainer on the rest of the Trainer's surface: hyperparameter search and `model_init`,
repeated `train()` calls, Hub pushes, best-checkpoint selection and early stopping on averaged
metrics, streamed data, resuming across methods, and the logging window."""

import concurrent.futures
import copy
import logging
import os
import re
import time
import types

import optuna
import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from hf_flat import FlatTrainer
from helpers import RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_two_pass, sgd_args

FLAT_STATE = "hf_flat_state.safetensors"


class TrialRecorder(TrainerCallback):
    """For every training run: its flat arguments, the index of its first recorded batch, and the
    final weights."""

    def __init__(self, collator):
        self.collator, self.runs = collator, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs.append({"flat_method": args.flat_method, "sam_rho": args.sam_rho, "first": len(self.collator.batches)})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runs[-1]["weights"] = copy.deepcopy(model)
        self.runs[-1]["steps"] = state.global_step


def test_hyperparameter_search_trains_each_trial_with_its_own_flat_arguments(tmp_path):
    """Through the Trainer's own trial set-up (optuna backend): every trial's weights equal the hand
    reference for that trial's flat_method and sam_rho."""
    initial, collator = TinyNet(), RecordingCollator()
    recorder = TrialRecorder(collator)
    trainer = FlatTrainer(
        model_init=lambda: copy.deepcopy(initial),
        args=sgd_args(tmp_path, flat_method="sam", sam_rho=0.05),
        train_dataset=TinyData(), eval_dataset=TinyData(n=8, seed=5), data_collator=collator, callbacks=[recorder],
    )
    grid = {"flat_method": ["sam", "asam"], "sam_rho": [0.05, 2.0]}
    trainer.hyperparameter_search(
        hp_space=lambda trial: {name: trial.suggest_categorical(name, values) for name, values in grid.items()},
        backend="optuna", n_trials=4, direction="minimize", sampler=optuna.samplers.GridSampler(grid),
    )
    tried = sorted((run["flat_method"], run["sam_rho"]) for run in recorder.runs)
    assert tried == [("asam", 0.05), ("asam", 2.0), ("sam", 0.05), ("sam", 2.0)]
    for run in recorder.runs:
        batches = collator.batches[run["first"]:]
        expected = reference_two_pass(
            initial, group_steps(batches, 1, run["steps"]), run["flat_method"], rho=run["sam_rho"]
        )
        assert_same_weights(run["weights"], expected)


def test_a_trial_with_a_bad_flat_value_is_refused():
    args = sgd_args("unused", flat_method="sam")
    trainer = FlatTrainer(model_init=lambda: TinyNet(), args=args, train_dataset=TinyData())
    trainer.hp_search_backend = "wandb"  # takes the trial's dict as it is
    with pytest.raises(ValueError, match=r"sam_rho=-1.0 is not allowed"):
        trainer.train(trial={"sam_rho": -1.0})


@pytest.mark.parametrize(
    "flat_method, extra",
    [("mesa", dict(mesa_start_epoch=1, mesa_decay=0.5)), ("saf", dict(saf_start_epoch=1, saf_past_epochs=1)),
     ("ema", dict(average_start=0.25, ema_decay=0.5))],
)
def test_a_second_train_call_starts_new_flat_state(tmp_path, flat_method, extra):
    """With `model_init` (as in every hyperparameter trial) a second `train()` equals a fresh
    trainer's run: no MESA teacher, SAF memory or average carries over."""
    initial = TinyNet()

    def trainer_in(folder):
        args = sgd_args(tmp_path / folder, flat_method=flat_method, num_train_epochs=3, **extra)
        return FlatTrainer(model_init=lambda: copy.deepcopy(initial), args=args, train_dataset=TinyData())

    twice = trainer_in("twice")
    twice.train()
    first = copy.deepcopy(twice.model)
    twice.train()
    fresh = trainer_in("fresh")
    fresh.train()
    assert_same_weights(twice.model, fresh.model, atol=0)
    assert_same_weights(first, fresh.model, atol=0)


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records the files of each uploaded folder at the
    moment the upload starts."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        self.uploads.append((path_in_repo, sorted(os.listdir(folder_path))))
        done = concurrent.futures.Future()
        done.set_result(None)
        return done


def test_hub_checkpoint_push_contains_the_flat_state(tmp_path, monkeypatch):
    import transformers.trainer

    hub = FakeHub()
    if hasattr(transformers.trainer, "hf_api"):  # transformers >= 5.2x
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    else:  # earlier 5.x call huggingface_hub's functions directly
        monkeypatch.setattr(transformers.trainer, "create_repo", hub.create_repo)
        monkeypatch.setattr(transformers.trainer, "upload_folder", hub.upload_folder)
    trainer = FlatTrainer(
        model=TinyNet(),
        args=sgd_args(tmp_path, flat_method="wasam", average_start=0.25, average_freq=1, save_strategy="steps",
                      save_steps=2, push_to_hub=True, hub_model_id="me/tiny", hub_strategy="checkpoint"),
        train_dataset=TinyData(),
    )
    trainer.train()
    checkpoint_pushes = [files for path, files in hub.uploads if path == "last-checkpoint"]
    assert len(checkpoint_pushes) == 2
    assert all(FLAT_STATE in files for files in checkpoint_pushes)


def eval_args(tmp_path, **overrides):
    values = dict(num_train_epochs=3, flat_method="swa", average_start=0.5, average_freq=1, eval_strategy="steps",
                  eval_steps=2)
    return sgd_args(tmp_path, **{**values, **overrides})


def test_best_checkpoint_selection_on_averaged_metrics(tmp_path):
    """save_strategy='best' with metric_for_best_model='eval_avg_loss', evaluating from step 2
    while averaging starts at step 6: eval_avg_loss is defined throughout (the live model's until
    the first snapshot) and selects the checkpoints."""
    trainer = FlatTrainer(
        model=TinyNet(), args=eval_args(tmp_path, save_strategy="best", metric_for_best_model="eval_avg_loss"),
        train_dataset=TinyData(), eval_dataset=TinyData(n=8, seed=5),
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8, 10, 12]
    assert evals[0]["eval_avg_loss"] == evals[0]["eval_loss"]  # no snapshot yet
    assert evals[-1]["eval_avg_loss"] != evals[-1]["eval_loss"]
    best = min(evals, key=lambda h: h["eval_avg_loss"])
    assert trainer.state.best_metric == best["eval_avg_loss"]
    improving = [h["step"] for i, h in enumerate(evals) if h["eval_avg_loss"] < min([e["eval_avg_loss"] for e in evals[:i]], default=float("inf"))]
    saved = sorted(int(name.split("-")[1]) for name in os.listdir(tmp_path) if name.startswith("checkpoint-"))
    assert saved == improving and improving[-1] == best["step"]  # a checkpoint at each new best, by eval_avg_loss


def test_early_stopping_sees_averaged_metrics(tmp_path):
    """With an early-stopping threshold no change can pass, training stops after `patience`
    evaluations that follow the first: it only can if the callback finds eval_avg_loss."""
    trainer = FlatTrainer(
        model=TinyNet(), args=eval_args(tmp_path, metric_for_best_model="eval_avg_loss"),
        train_dataset=TinyData(), eval_dataset=TinyData(n=8, seed=5),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9)],
    )
    trainer.train()
    assert trainer.state.global_step == 6  # evaluations at steps 2, 4 and 6


class EndlessStream(torch.utils.data.IterableDataset):
    """An endless stream of TinyData's examples."""

    def __iter__(self):
        data = TinyData()
        while True:
            yield from (data[i] for i in range(len(data)))


def test_batchnorm_recomputation_on_a_stream_needs_a_bound(tmp_path):
    args = sgd_args(tmp_path, flat_method="swa", max_steps=4, average_start=0.5, average_freq=1)
    with pytest.raises(ValueError, match="average_bn_batches"):
        FlatTrainer(model=TinyNet(batchnorm=True), args=args, train_dataset=EndlessStream()).train()
    # a model without BatchNorm reads nothing, so needs no bound
    FlatTrainer(model=TinyNet(), args=args, train_dataset=EndlessStream()).train()


def test_batchnorm_recomputation_reads_average_bn_batches(tmp_path):
    args = sgd_args(tmp_path, flat_method="swa", max_steps=4, average_start=0.5, average_freq=1, average_bn_batches=2)
    trainer = FlatTrainer(model=TinyNet(batchnorm=True), args=args, train_dataset=EndlessStream())
    trainer.train()  # finishes: the stream is endless
    assert trainer.model.bn.num_batches_tracked.item() == 2
    bn = copy.deepcopy(trainer.model).train()
    bn.bn.reset_running_stats()
    bn.bn.momentum = None
    data = TinyData()
    with torch.no_grad():
        bn(data.x[:4])
        bn(data.x[4:8])
    torch.testing.assert_close(trainer.model.bn.running_mean, bn.bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(trainer.model.bn.running_var, bn.bn.running_var, atol=1e-6, rtol=0)


def test_no_snapshot_warning_says_what_happened(tmp_path, caplog):
    args = sgd_args(tmp_path, flat_method="swa", max_steps=10, num_train_epochs=3, average_start=0.75, average_freq=6)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    with caplog.at_level(logging.WARNING):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "average_freq=6" in r.getMessage()]
    assert len(messages) == 2  # when training begins, and when it ends
    assert "multiples of 6" in messages[0] and "step 8" in messages[0] and "10 optimizer steps" in messages[0]
    assert "ended at step 10" in messages[1] and "no averaged weights were taken" in messages[1]
    assert trainer.averaging.count == 0


@pytest.mark.parametrize("method, extra, expected, unexpected", [
    # SWA's cyclical schedule: the first snapshot closes the first cycle, after the end; average_freq is not the way out
    ("swa", dict(average_start=0.5, swa_lr=0.05, swa_cycle_steps=8),
     "with swa_cycle_steps=8 the first snapshot is taken at the end of the first cycle, step 12 (averaging starts at "
     "step 5, average_start=0.5)", "average_freq"),
    ("lawa", dict(average_start=0.5, swa_lr=0.05, swa_cycle_steps=8), "Lower average_start or swa_cycle_steps", "average_freq"),
    ("lawa", dict(average_start=0.75, average_freq=6), "average_freq=6 takes snapshots at multiples of 6", None),
])
def test_no_snapshot_warning_names_the_rule_that_left_no_snapshot(tmp_path, caplog, method, extra, expected, unexpected):
    args = sgd_args(tmp_path, flat_method=method, max_steps=10, num_train_epochs=3, **extra)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    with caplog.at_level(logging.WARNING):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "no averaged weights" in r.getMessage()]
    assert len(messages) == 2 and all(expected in m for m in messages), messages
    assert unexpected is None or not any(unexpected in m for m in messages)


def checkpoint_of(tmp_path, flat_method, **extra):
    folder = tmp_path / flat_method.replace("+", "_")
    args = sgd_args(folder, flat_method=flat_method, save_strategy="steps", save_steps=2, max_steps=2, **extra)
    FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData()).train()
    return folder / "checkpoint-2"


@pytest.mark.parametrize(
    "written, resumed, problem",
    [
        ("sam", "sam+swa", "holds no state for swa"),
        ("saf", "saf+swa", "holds no state for swa"),
        ("wasam", "sam", "its state for swa would be dropped"),
        ("saf", "mesa", "holds no state for mesa.*its state for saf would be dropped"),
    ],
)
def test_resuming_with_other_flat_state_is_refused(tmp_path, written, resumed, problem):
    checkpoint = checkpoint_of(tmp_path, written, saf_start_epoch=0)
    args = sgd_args(tmp_path / "resumed", flat_method=resumed, max_steps=4, saf_start_epoch=0, mesa_start_epoch=0)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    with pytest.raises(ValueError, match=f"Cannot resume flat_method='{re.escape(resumed)}'.*{problem}.*Resume with the flat_method"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resuming_with_another_stateless_method_is_allowed(tmp_path):
    checkpoint = checkpoint_of(tmp_path, "sam")
    assert not (checkpoint / FLAT_STATE).exists()
    args = sgd_args(tmp_path / "resumed", flat_method="asam", max_steps=4)
    trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4


def test_trajectory_loss_is_averaged_over_the_whole_logging_window(tmp_path):
    """The term starts in epoch 1 (steps 5-8); a log every 8 steps averages it over all 8 steps,
    as the Trainer averages `loss`, so `task_loss` = `loss` - `trajectory_loss` stays the task's."""

    def run(folder, logging_steps):
        args = sgd_args(tmp_path / folder, flat_method="mesa", mesa_start_epoch=1, num_train_epochs=2,
                        logging_steps=logging_steps)
        trainer = FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
        trainer.train()
        return [h for h in trainer.state.log_history if "trajectory_loss" in h]

    per_step, window = run("every", 1), run("window", 8)
    assert [h["step"] for h in window] == [8]
    terms = {h["step"]: h["trajectory_loss"] for h in per_step}
    assert sorted(terms) == [5, 6, 7, 8] and all(term > 0 for term in terms.values())
    assert window[0]["trajectory_loss"] == pytest.approx(sum(terms.values()) / 8, rel=1e-5)
    assert window[0]["task_loss"] == pytest.approx(window[0]["loss"] - window[0]["trajectory_loss"], rel=1e-6)


def test_averaged_metrics_only_during_training(tmp_path):
    trainer = FlatTrainer(
        model=TinyNet(), args=eval_args(tmp_path),
        train_dataset=TinyData(), eval_dataset=TinyData(n=8, seed=5),
    )
    trainer.train()
    last = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert last["step"] == 12 and last["eval_avg_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], abs=1e-6)
    assert "eval_avg_loss" not in trainer.predict(TinyData(n=8, seed=5)).metrics  # after training: no second set


class SeesTheFinalModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = copy.deepcopy(model.state_dict())


def test_callbacks_added_later_see_the_averaged_weights_at_train_end(tmp_path):
    trainer = FlatTrainer(model=TinyNet(), args=eval_args(tmp_path, eval_strategy="no"), train_dataset=TinyData())
    late = SeesTheFinalModel()
    trainer.add_callback(late)
    trainer.train()
    assert trainer.averaging.count == 7
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(late.weights[k], v)


def test_live_speed_metrics_leave_out_the_averaged_evaluation(tmp_path, monkeypatch):
    from hf_flat.averaging import WeightAveraging

    swapped_in = WeightAveraging.swapped_in

    def slow_swap(self, model):
        time.sleep(0.5)
        return swapped_in(self, model)

    monkeypatch.setattr(WeightAveraging, "swapped_in", slow_swap)
    trainer = FlatTrainer(model=TinyNet(), args=eval_args(tmp_path), train_dataset=TinyData(),
                          eval_dataset=TinyData(n=8, seed=5))
    trainer.train()
    last = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert last["eval_avg_runtime"] >= 0.5 > last["eval_runtime"]
    assert last["eval_samples_per_second"] > 8 / 0.5  # the live pass's own speed (a rate, rounded: no tighter check)
    assert "eval_avg_steps_per_second" in last


def test_hyperparameter_search_objective_defaults_to_the_live_metrics(tmp_path):
    trainer = FlatTrainer(model_init=lambda: TinyNet(), args=eval_args(tmp_path), train_dataset=TinyData(),
                          eval_dataset=TinyData(n=8, seed=5))
    best = trainer.hyperparameter_search(hp_space=lambda trial: {}, backend="optuna", n_trials=1)
    last = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert best.objective == last["eval_loss"] != last["eval_avg_loss"]


def test_a_single_swa_snapshot_is_reported(tmp_path, caplog):
    """The defaults (3 epochs, average_start 0.75, one snapshot per epoch) give one snapshot."""
    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="swa", num_train_epochs=3),
                          train_dataset=TinyData())
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.averaging.count == 1
    assert any("SWA took a single snapshot" in r.getMessage() for r in caplog.records)


def test_epoch_snapshots_on_a_stream_are_refused(tmp_path):
    args = sgd_args(tmp_path, flat_method="swa", max_steps=4, average_start=0.5)
    with pytest.raises(ValueError, match="average_freq=0 takes a snapshot at the end of every epoch"):
        FlatTrainer(model=TinyNet(), args=args, train_dataset=EndlessStream()).train()


def test_a_trajectory_term_that_never_started_is_reported(tmp_path, caplog):
    args = sgd_args(tmp_path, flat_method="mesa", max_steps=6, mesa_start_epoch=1)
    with caplog.at_level(logging.WARNING):
        FlatTrainer(model=TinyNet(), args=args, train_dataset=EndlessStream()).train()
    assert any("MESA never changed the loss" in r.getMessage() for r in caplog.records)


def test_flat_state_files_are_checked_on_load(tmp_path):
    """A newer layout version, a damaged file, a SAF memory for another data set and a MESA
    teacher for another model are refused with errors that say so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = checkpoint_of(tmp_path, "wasam", average_start=0.25, average_freq=1)
    state = checkpoint / FLAT_STATE

    def resume_wasam():
        args = sgd_args(tmp_path / "resumed", flat_method="wasam", max_steps=4, average_start=0.25, average_freq=1)
        FlatTrainer(model=TinyNet(), args=args, train_dataset=TinyData()).train(resume_from_checkpoint=str(checkpoint))

    with safe_open(state, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, state, metadata={**meta, "averaging_version": "2"})
    with pytest.raises(ValueError, match="averaging_version='2', which this hf-flat cannot read"):
        resume_wasam()
    state.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be read as a flat state file"):
        resume_wasam()

    saf_args = dict(flat_method="saf", saf_start_epoch=1, saf_past_epochs=1, num_train_epochs=3)
    FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "saf", save_strategy="steps", save_steps=6, **saf_args),
                train_dataset=TinyData()).train()
    with pytest.raises(ValueError, match="rows for 16 samples but train_dataset has 12"):
        FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "saf-resumed", **saf_args),
                    train_dataset=TinyData(n=12)).train(resume_from_checkpoint=str(tmp_path / "saf" / "checkpoint-6"))

    class WiderNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc2 = torch.nn.Linear(6, 5)

    from hf_flat.state_file import load_flat_state
    from hf_flat.methods import MESA

    mesa = MESA()  # (the Trainer itself refuses such a model's weights first; the teacher checks its own)
    mesa.load_state_dict(*load_flat_state(checkpoint_of(tmp_path, "mesa", mesa_start_epoch=0) / FLAT_STATE))
    with pytest.raises(ValueError, match="MESA teacher in the checkpoint does not fit the model: fc2.weight"):
        mesa.build_teacher(WiderNet())
