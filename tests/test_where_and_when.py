"""Average SAM, m-sharpness (`sam_m`), n-SAM (`sam_scope="step"`) and SAM on a schedule
(`sam_start`, `sam_interval`), against references computed by hand (tests/helpers.py)."""

import copy
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_flat import FlatTrainer
from helpers import (
    RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_where_and_when, sgd_args,
)


def train_recorded(tmp_path, model, data=None, callbacks=(), **overrides):
    collator = RecordingCollator()
    trainer = FlatTrainer(
        model=model, args=sgd_args(tmp_path, **overrides), train_dataset=data if data is not None else TinyData(),
        data_collator=collator, callbacks=list(callbacks),
    )
    trainer.train()
    return trainer, collator.batches


def scheduled(total, start=0.0, interval=1):
    """The perturbed steps, written out from the definition: t >= s and (t - s) % interval == 0."""
    s = max(1, math.ceil(round(start * total, 9)))
    return {t for t in range(1, total + 1) if t >= s and (t - s) % interval == 0}


CASES = {
    "avg_sam": dict(flat_method="avg_sam", sam_rho=0.5),
    "avg_sam_m2": dict(flat_method="avg_sam", sam_rho=0.5, sam_m=2),
    "avg_sam_step": dict(flat_method="avg_sam", sam_rho=0.5, sam_scope="step"),
    "sam_m2": dict(flat_method="sam", sam_rho=0.5, sam_m=2),
    "asam_m1": dict(flat_method="asam", sam_rho=1.0, sam_m=1),
    "sam_step": dict(flat_method="sam", sam_rho=0.5, sam_scope="step"),
    "asam_step": dict(flat_method="asam", sam_rho=1.0, sam_scope="step"),
    "sam_interval3": dict(flat_method="sam", sam_rho=0.5, sam_interval=3),
    "sam_late": dict(flat_method="sam", sam_rho=0.5, sam_start=0.6),
    "asam_late_interval2_m2": dict(flat_method="asam", sam_rho=1.0, sam_start=0.3, sam_interval=2, sam_m=2),
    "sam_step_late": dict(flat_method="sam", sam_rho=0.5, sam_scope="step", sam_start=0.5, sam_interval=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_weights_after_training_match_the_hand_reference(tmp_path, case, grad_accum, max_grad_norm):
    flat = CASES[case]
    initial = TinyNet()
    trainer, batches = train_recorded(
        tmp_path, copy.deepcopy(initial), num_train_epochs=3, gradient_accumulation_steps=grad_accum,
        max_grad_norm=max_grad_norm, **flat,
    )
    total = trainer.state.global_step
    assert total == 3 * 16 // (4 * grad_accum)
    method = flat["flat_method"]
    steps = group_steps(batches, grad_accum, total)
    perturbed = scheduled(total, flat.get("sam_start", 0.0), flat.get("sam_interval", 1))
    reference = dict(rho=flat["sam_rho"], max_grad_norm=max_grad_norm, scope=flat.get("sam_scope", "micro"),
                     m=flat.get("sam_m"), perturbed_steps=perturbed)
    expected = reference_where_and_when(initial, steps, method, **reference)
    assert_same_weights(trainer.model, expected)
    # the setting matters: every step perturbed per micro-batch, or no step perturbed, ends elsewhere
    every_step = set(range(1, total + 1))
    for other in (dict(reference, scope="micro", m=None, perturbed_steps=every_step), dict(reference, perturbed_steps=set())):
        # (with one micro-batch per step on one process, SAM's n-SAM step is its m-SAM step)
        same_by_definition = grad_accum == 1 and reference["scope"] == "step" and method != "avg_sam" and other["m"] is None
        if other != reference and not (same_by_definition and other["perturbed_steps"]):
            elsewhere = reference_where_and_when(initial, steps, method, **other)
            assert not torch.allclose(elsewhere.fc1.weight, expected.fc1.weight, atol=1e-5)


# ---- bit-identity with the micro-batch SAM step as it was before these settings ------------------
class LegacyStepTrainer(FlatTrainer):
    """The SAM step as hf-flat ran it before scope and schedule existed, written out: one
    perturbation per micro-batch from its own gradient, pass 1 under no_sync, exact restore."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        from hf_flat.methods.sam import sam_perturbation
        from hf_flat.methods.two_pass import frozen_batchnorm_statistics

        params = [p for p in model.parameters() if p.requires_grad]
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model):
            loss = self.forward_backward(model, inputs, num_items_in_batch)
        active = [p for p in params if p.grad is not None]
        e = sam_perturbation([p.grad for p in active], self.args.sam_rho)
        with torch.no_grad():
            saved = [p.detach().clone() for p in active]
            torch._foreach_add_(active, e)
        for p, acc in zip(params, accumulated):
            p.grad = acc
        del e
        with frozen_batchnorm_statistics(model):
            self.forward_backward(model, inputs, num_items_in_batch)
        with torch.no_grad():
            torch._foreach_copy_(active, saved)
        return loss


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_default_schedule_and_full_micro_batch_chunks_are_bit_identical_to_the_plain_sam_step(tmp_path, grad_accum):
    initial = TinyNet(batchnorm=True)
    common = dict(flat_method="sam", sam_rho=0.5, num_train_epochs=2, gradient_accumulation_steps=grad_accum,
                  max_grad_norm=0.05)
    legacy = LegacyStepTrainer(model=copy.deepcopy(initial), args=sgd_args(tmp_path / "legacy", **common),
                               train_dataset=TinyData())
    legacy.train()
    for name, settings in {"defaults": {}, "explicit": dict(sam_interval=1, sam_start=0.0, sam_scope="micro"),
                           "m_is_the_batch": dict(sam_m=4)}.items():
        trainer = FlatTrainer(model=copy.deepcopy(initial), args=sgd_args(tmp_path / name, **common, **settings),
                              train_dataset=TinyData())
        trainer.train()
        for (key, a), b in zip(trainer.model.state_dict().items(), legacy.model.state_dict().values()):
            assert torch.equal(a, b), (name, key)


# ---- forward passes ----------------------------------------------------------------------------
class CountingNet(TinyNet):
    """Counts training forward passes per optimizer step (the step number is set by a callback)."""

    def __init__(self):
        super().__init__()
        self.step, self.passes = 1, {}

    def forward(self, x, labels=None):
        if self.training:
            self.passes[self.step] = self.passes.get(self.step, 0) + 1
        return super().forward(x, labels)


class StepCounter(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.step = state.global_step + 1


@pytest.mark.parametrize(
    "settings, passes_per_micro_batch",
    [
        (dict(flat_method="sam", sam_interval=3, sam_start=0.25), {True: 2, False: 1}),
        (dict(flat_method="asam", sam_m=2, sam_interval=2), {True: 4, False: 1}),  # 2 chunks x 2 passes
        (dict(flat_method="sam", sam_scope="step", sam_start=0.5), {True: 2, False: 1}),
        (dict(flat_method="avg_sam"), {True: 1, False: 1}),
        (dict(flat_method="avg_sam", sam_m=2, sam_scope="micro"), {True: 2, False: 1}),  # one pass per chunk
        (dict(flat_method="avg_sam+swa", sam_scope="step", average_start=0.5), {True: 1, False: 1}),
        (dict(flat_method="none"), {True: 1, False: 1}),
    ],
)
def test_forward_passes_per_step(tmp_path, settings, passes_per_micro_batch):
    model = CountingNet()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, num_train_epochs=3, gradient_accumulation_steps=2, **settings),
                          train_dataset=TinyData(), callbacks=[StepCounter()])
    trainer.train()
    total = trainer.state.global_step
    perturbed = scheduled(total, settings.get("sam_start", 0.0), settings.get("sam_interval", 1))
    if settings["flat_method"] == "none":
        perturbed = set()
    assert model.passes == {t: 2 * passes_per_micro_batch[t in perturbed] for t in range(1, total + 1)}


# ---- logs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["micro", "step"])
def test_perturbed_loss_and_sharpness_average_over_the_perturbed_steps_only(tmp_path, scope):
    initial = TinyNet()
    settings = dict(flat_method="sam", sam_rho=0.5, sam_interval=3, sam_start=0.2, sam_scope=scope)
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), num_train_epochs=4, logging_steps=4,
                                      gradient_accumulation_steps=2, **settings)
    total = trainer.state.global_step  # 8 steps, s = ceil(1.6) = 2: steps 2, 5 and 8 are perturbed
    perturbed_steps = scheduled(total, 0.2, 3)
    assert perturbed_steps == {2, 5, 8}
    perturbed, losses = [], []
    reference_where_and_when(initial, group_steps(batches, 2, total), "sam", rho=0.5, scope=scope,
                             perturbed_steps=perturbed_steps, perturbed_losses=perturbed, losses=losses)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2  # windows: steps 1-4 and 5-8
    for log, window in zip(logs, ([1, 2, 3, 4], [5, 6, 7, 8])):
        assert log["loss"] == pytest.approx(sum(losses[t - 1] for t in window) / len(window), abs=1e-6)
        hits = [t for t in window if t in perturbed_steps]
        mean_perturbed = sum(perturbed[t - 1] for t in hits) / len(hits)
        mean_at_w = sum(losses[t - 1] for t in hits) / len(hits)
        assert log["perturbed_loss"] == pytest.approx(mean_perturbed, abs=1e-6)
        assert log["sharpness"] == pytest.approx(mean_perturbed - mean_at_w, abs=1e-6)


def test_a_log_without_perturbed_steps_has_no_perturbed_loss(tmp_path):
    trainer, _ = train_recorded(tmp_path, TinyNet(), flat_method="sam", num_train_epochs=2, sam_start=0.5)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [("perturbed_loss" in h, "sharpness" in h) for h in logs] == [(False, False)] * 3 + [(True, True)] * 5


def test_average_sam_logs_the_loss_at_the_perturbed_weights(tmp_path):
    initial = TinyNet()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), flat_method="avg_sam", sam_rho=1.0,
                                      gradient_accumulation_steps=2, sam_interval=2)
    losses = []
    steps = group_steps(batches, 2, trainer.state.global_step)
    reference_where_and_when(initial, steps, "avg_sam", rho=1.0, perturbed_steps={1}, losses=losses)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logs] == pytest.approx(losses, abs=1e-6)
    assert not any("perturbed_loss" in h or "sharpness" in h for h in logs)
    plain = []
    reference_where_and_when(initial, steps, "avg_sam", rho=1.0, perturbed_steps=set(), losses=plain)
    assert losses[0] != pytest.approx(plain[0], abs=1e-4)  # step 1's loss is at w + e, not at w


# ---- average SAM's random numbers -------------------------------------------------------------
def test_average_sam_leaves_data_order_and_the_global_random_streams_alone(tmp_path):
    class Dropout(TinyNet):
        def forward(self, x, labels=None):
            return super().forward(torch.nn.functional.dropout(x, 0.5, self.training), labels)

    states = {}
    for method in ("none", "avg_sam"):
        trainer, batches = train_recorded(tmp_path / method, Dropout(), flat_method=method, num_train_epochs=2)
        states[method] = (torch.get_rng_state(), batches)
    assert torch.equal(states["none"][0], states["avg_sam"][0])  # no draw from torch's global generator
    for a, b in zip(states["none"][1], states["avg_sam"][1]):
        assert torch.equal(a["x"], b["x"])  # the same data order


def test_average_sam_directions_follow_the_seed_and_the_count(tmp_path):
    from hf_flat.methods.avg_sam import direction_seed

    seeds = {direction_seed(s, stream, k, i) for s in (0, 1) for stream in ("0", "1", "all") for k in (0, 1, 2)
             for i in (0, 1)}
    assert len(seeds) == 36 and all(0 <= s < 2**63 for s in seeds)
    assert 0 not in seeds and 1 not in seeds  # never the seed torch's global generator got
    finals = {}
    for seed in (0, 1):
        trainer, batches = train_recorded(tmp_path / str(seed), TinyNet(), flat_method="avg_sam", sam_rho=1.0,
                                          seed=seed, data_seed=0)
        finals[seed] = trainer.model.fc1.weight.detach().clone()
        assert trainer.perturbation.draws == trainer.state.global_step
        expected = reference_where_and_when(TinyNet(), group_steps(batches, 1, trainer.state.global_step), "avg_sam",
                                            rho=1.0, seed=seed)
        assert_same_weights(trainer.model, expected)
    assert not torch.allclose(finals[0], finals[1])


@pytest.fixture
def two_threads():
    """Two intra-op threads: average SAM then draws its segments side by side, in threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("settings", [
    dict(),
    dict(sam_m=2, gradient_accumulation_steps=2),  # several draws per optimizer step
    dict(sam_scope="step", sam_interval=2, gradient_accumulation_steps=2),  # unperturbed steps between draws
])
def test_average_sam_drawn_in_threads_matches_the_hand_reference(tmp_path, monkeypatch, settings):
    from hf_flat.methods.avg_sam import AverageSAM

    threaded = []  # per draw: whether its segments were drawn in threads
    draw = AverageSAM._draw

    def recording(self, stream, index):
        draw(self, stream, index)
        threaded.append(self._pool is not None)

    monkeypatch.setattr(AverageSAM, "_draw", recording)
    initial = TinyNet()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), num_train_epochs=3, flat_method="avg_sam",
                                      sam_rho=1.0, **settings)
    total, grad_accum = trainer.state.global_step, settings.get("gradient_accumulation_steps", 1)
    expected = reference_where_and_when(
        initial, group_steps(batches, grad_accum, total), "avg_sam", rho=1.0, scope=settings.get("sam_scope", "micro"),
        m=settings.get("sam_m"), perturbed_steps=scheduled(total, 0.0, settings.get("sam_interval", 1)),
    )
    assert_same_weights(trainer.model, expected)
    assert len(threaded) == trainer.perturbation.draws > 2 and all(threaded)
    # each parameter's part of the buffer is aligned as a tensor of its own (TinyNet's sizes are odd)
    assert all(view.data_ptr() % 64 == 0 for view in trainer.perturbation._views)


@pytest.mark.parametrize("one_pass", [True, False])  # (the CPU's way and a GPU's)
def test_average_sam_forms_w_plus_e_in_place_of_z(one_pass):
    from hf_flat.methods.avg_sam import add_scaled

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    z = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = [wi + 0.3 * zi for wi, zi in zip(w, z)]
    buffers = list(z)
    add_scaled(z, w, torch.tensor(0.3), one_pass=one_pass)
    for zi, buffer, e in zip(z, buffers, expected):
        assert zi is buffer
        torch.testing.assert_close(zi, e)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("layout", ["float64", "non-contiguous"])
def test_average_sam_perturbs_parameters_its_buffer_cannot_stand_in_for(tmp_path, layout):
    """float64 parameters, and a non-contiguous float32 one beside contiguous ones, get w + e in a
    tensor of their own."""
    initial, data = TinyNet(), TinyData()
    if layout == "float64":
        initial.double()
        data.x = data.x.double()
    else:
        initial.fc2.weight.data = initial.fc2.weight.data.t().contiguous().t()  # (same values, transposed layout)
        assert not initial.fc2.weight.is_contiguous()
    trainer, batches = train_recorded(tmp_path, copy.deepcopy(initial), data=data, flat_method="avg_sam", sam_rho=1.0)
    assert trainer.model.fc2.weight.dtype == (torch.float64 if layout == "float64" else torch.float32)
    expected = reference_where_and_when(initial, group_steps(batches, 1, trainer.state.global_step), "avg_sam", rho=1.0)
    assert_same_weights(trainer.model, expected)


@pytest.mark.parametrize("settings", [dict(flat_method="avg_sam"), dict(flat_method="avg_sam+swa", average_start=0.3),
                                      dict(flat_method="avg_sam", sam_scope="step", sam_interval=2)])
def test_a_resumed_average_sam_run_equals_the_uninterrupted_run(tmp_path, settings):
    from safetensors import safe_open

    common = dict(num_train_epochs=3, sam_rho=1.0, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2,
                  **settings)
    full = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "full", **common), train_dataset=TinyData())
    full.train()
    # draws by step 2: one per micro-batch (2 x 2), or one per perturbed step (step 1 of steps 1, 3, 5)
    with safe_open(str(tmp_path / "full" / "checkpoint-2" / "hf_flat_state.safetensors"), "pt") as f:
        assert int(f.metadata()["avg_sam_draws"]) == (1 if settings.get("sam_scope") == "step" else 4)
    resumed = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "resumed", **common), train_dataset=TinyData())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.perturbation.draws == full.perturbation.draws
    assert_same_weights(resumed.model, full.model)
    # without the saved count the directions would restart: the weights would end elsewhere
    restarted = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "restarted", **common), train_dataset=TinyData())
    restarted._load_flat_state = lambda checkpoint: None
    restarted.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert not torch.allclose(restarted.model.fc1.weight, full.model.fc1.weight, atol=1e-5)


def test_resuming_average_sam_from_a_sam_checkpoint_is_refused(tmp_path):
    common = dict(num_train_epochs=1, save_strategy="steps", save_steps=2)
    FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "sam", flat_method="sam", **common), train_dataset=TinyData()).train()
    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "avg", flat_method="avg_sam", **common),
                          train_dataset=TinyData())
    with pytest.raises(ValueError, match="no state for avg_sam"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "sam" / "checkpoint-2"))


# ---- bad values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sam_m=3), "sam_m=3 is not allowed with per_device_train_batch_size=4: it must divide the per-device "
                        "batch size (one perturbation per sam_m samples). Divisors of 4: 1, 2, 4."),
        (dict(sam_m=0), "sam_m=0 is not allowed: it must be None or an integer >= 1."),
        (dict(sam_m=2.0), "sam_m=2.0 is not allowed: it must be None or an integer >= 1."),
        (dict(sam_m=2, sam_scope="step"), "sam_m=2 is not allowed with sam_scope='step'"),
        (dict(sam_scope="batch"), "sam_scope='batch' is not allowed: it must be None, 'micro' or 'step'."),
        (dict(sam_start=1.0), "sam_start=1.0 is not allowed: it must be a number in [0, 1)."),
        (dict(sam_start=-0.1), "sam_start=-0.1 is not allowed: it must be a number in [0, 1)."),
        (dict(sam_interval=0), "sam_interval=0 is not allowed: it must be an integer >= 1."),
        (dict(sam_interval=2.5), "sam_interval=2.5 is not allowed: it must be an integer >= 1."),
    ],
)
def test_bad_values_are_refused_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError) as error:
        sgd_args(tmp_path, flat_method="sam", **settings)
    assert message in str(error.value)


def test_settings_for_a_method_that_does_not_read_them_are_reported(tmp_path):
    with pytest.warns(UserWarning, match=r"sam_interval=5 has no effect with flat_method='swa'"):
        sgd_args(tmp_path, flat_method="swa", sam_interval=5)


def test_a_batch_size_that_sam_m_does_not_divide_is_refused_when_training_starts(tmp_path):
    class AutoFoundBatchSize(TrainerCallback):  # what auto_find_batch_size may set once training has started
        def on_train_begin(self, args, state, control, **kwargs):
            trainer._train_batch_size = 3

    model = CountingNet()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="sam", sam_m=2, sam_start=0.5),
                          train_dataset=TinyData(), callbacks=[AutoFoundBatchSize()])
    with pytest.raises(ValueError, match=r"sam_m=2 must divide the per-device batch size, which is 3 in this run"):
        trainer.train()
    assert model.passes == {}  # refused before the first step, not at the first perturbed one


def test_inputs_that_cannot_be_cut_into_chunks_are_refused():
    from hf_flat.methods.two_pass import split_batch

    batch = {"x": torch.zeros(4, 2), "labels": torch.zeros(4), "mask": torch.zeros(3, 4), "flag": True}
    with pytest.raises(ValueError, match=r"input 'mask' has shape \(3, 4\) while the batch has 4 samples"):
        split_batch(batch, 2)
    chunks = split_batch({"x": torch.arange(5), "texts": list("abcde"), "flag": True}, 2)
    assert [(c["x"].tolist(), c["texts"], c["flag"], n) for c, n in chunks] == [
        ([0, 1], ["a", "b"], True, 2), ([2, 3], ["c", "d"], True, 2), ([4], ["e"], True, 1)]


# ---- fp16 overflow under n-SAM -----------------------------------------------------------------
class OverflowAt(TinyNet):
    """Multiplies the training loss by 1e36 (inf under a 2^14 loss scale) on one forward call."""

    def __init__(self, call):
        super().__init__()
        self.call, self.calls = call, 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.calls += 1
            if self.calls == self.call:
                return {**out, "loss": out["loss"] * 1e36}
        return out


@pytest.mark.parametrize("method", ["sam", "asam"])
@pytest.mark.parametrize("call", [1, 2])  # pass 1 of the first or of the second micro-batch of step 1
def test_an_overflow_in_the_window_skips_the_step_without_nan(tmp_path, method, call):
    from test_precision import Recorder, scaler_trainer

    initial = OverflowAt(call)
    trainer = scaler_trainer(tmp_path, copy.deepcopy(initial), 2.0**14, flat_method=method, sam_scope="step",
                             gradient_accumulation_steps=2)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.scales == [2.0**13, 2.0**13]  # step 1 found inf and was skipped; step 2 was taken
    # both passes in both steps: step 1's pass 2 runs at the non-finite w + e (decided on the device), and its
    # non-finite gradient makes the GradScaler skip the step
    assert trainer.model.calls == 4 + 4
    for key, value in initial.state_dict().items():
        assert torch.equal(recorder.weights[0][key], value), key
    assert any(not torch.equal(recorder.weights[1][k], v) for k, v in initial.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    first, second = [h for h in trainer.state.log_history if "loss" in h][:2]
    assert "sharpness" not in first and "perturbed_loss" not in first  # its only perturbed value was not finite
    assert all(map(math.isfinite, (second["sharpness"], second["perturbed_loss"])))


def test_command_line_flags():
    from transformers import HfArgumentParser

    from hf_flat import TrainingArguments

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--flat_method", "avg_sam+swa", "--sam_m", "2", "--sam_start", "0.8", "--sam_interval", "5",
         "--report_to", "none", "--per_device_train_batch_size", "4"])
    assert (args.flat_perturbation, args.flat_averaging) == ("avg_sam", "swa")
    assert (args.sam_m, args.sam_scope, args.sam_start, args.sam_interval) == (2, None, 0.8, 5)  # None: "micro" unsharded
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--flat_method", "sam", "--sam_scope", "step", "--report_to", "none"])
    assert (args.sam_m, args.sam_scope) == (None, "step")


def test_compare_tunes_the_new_settings_for_the_methods_that_read_them():
    from hf_flat.commands.compare import tunable

    grid = {"sam_interval": ["2", "5"], "sam_m": ["2"], "sam_rho": ["0.5", "1.0"], "average_start": ["0.5"]}
    assert tunable("avg_sam+swa", grid) == grid
    assert tunable("asam", grid) == {k: grid[k] for k in ("sam_interval", "sam_m", "sam_rho")}
    assert tunable("swa", grid) == {"average_start": ["0.5"]}
    assert tunable("saf", grid) == {}
