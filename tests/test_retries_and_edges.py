"""Issue 24's findings on the trainer side: what `auto_find_batch_size` leaves behind after an
out-of-memory retry, radii and schedules at their edges, one-sample groups, ESAM's corner cases,
resume mismatches and the ViT resume repair. Each test failed before its fix."""

import copy

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback

from hf_flat import FlatTrainer, WeightAveraging
from helpers import (
    RecordingCollator, TinyData, TinyNet, assert_same_weights, group_steps, reference_where_and_when, sgd_args,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


# ---- auto_find_batch_size: a retry starts new flat state -------------------------------------------
class OutOfMemoryAt(TinyNet):
    """Raises, once, the error `auto_find_batch_size` retries on (accelerate's
    `should_reduce_batch_size`) at its `call`-th training forward."""

    def __init__(self, call):
        super().__init__()
        self.call, self.calls = call, 0

    def forward(self, x, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == self.call:
                raise RuntimeError("CUDA out of memory. (raised by the test)")
        return super().forward(x, labels)


class InOrder(FlatTrainer):
    """The training data in order, so that a retry and a fresh run see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class WeightsAtRetry(TrainerCallback):
    """Keeps a copy of the model's weights when the second attempt of `train()` begins."""

    def __init__(self):
        self.attempts, self.weights = 0, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attempts += 1
        if self.attempts == 2:
            self.weights = copy.deepcopy(model.state_dict())


RETRIED = {
    "sam": dict(flat_method="sam"),
    "asam": dict(flat_method="asam"),
    "n-sam": dict(flat_method="sam", sam_scope="step"),
    "sam_m": dict(flat_method="sam", sam_m=1),
    "sam schedule": dict(flat_method="sam", sam_start=0.3, sam_interval=2),
    "avg_sam": dict(flat_method="avg_sam"),
    "avg_sam step": dict(flat_method="avg_sam", sam_scope="step"),
    "gsam": dict(flat_method="gsam", gsam_rho_min=0.02, sam_rho=0.2, lr_scheduler_type="linear"),
    "gsam step": dict(flat_method="gsam", gsam_rho_min=0.02, sam_rho=0.2, lr_scheduler_type="linear", sam_scope="step"),
    "looksam": dict(flat_method="looksam", looksam_k=2),
    "esam": dict(flat_method="esam", esam_beta=0.6, esam_gamma=0.5),
    "saf": dict(flat_method="saf", saf_start_epoch=1, saf_past_epochs=1),
    "mesa": dict(flat_method="mesa", mesa_start_epoch=0),
    "swa": dict(flat_method="swa", average_start=0.0, average_freq=1),
    "swa_lr": dict(flat_method="swa", average_start=0.0, swa_lr=0.05, swa_anneal_steps=2, lr_scheduler_type="linear"),
    "ema": dict(flat_method="ema", average_start=0.0, ema_decay=0.5),
    "lawa": dict(flat_method="lawa", average_start=0.0, average_freq=1, lawa_k=2),
    "wasam": dict(flat_method="wasam", average_start=0.0, average_freq=1),
    "WeightAveraging callback": dict(flat_method="none", averaging_callback=True),
}


@pytest.mark.parametrize("failing_call", [1, 5], ids=["first forward", "step 3"])
@pytest.mark.parametrize("name", list(RETRIED))
def test_a_retry_with_a_smaller_batch_trains_as_a_fresh_run(tmp_path, name, failing_call):
    """`auto_find_batch_size` retries `train()`'s loop with a smaller batch after an out-of-memory
    error; the retry must train exactly as a fresh `train()` at that batch size from the weights
    the failed attempt left (no window, cached schedule, snapshot, draw count, teacher or memory
    of the abandoned attempt)."""
    settings = dict(RETRIED[name], gradient_accumulation_steps=2, num_train_epochs=3)
    averaging = [WeightAveraging("swa", start=0.0, freq=1)] if settings.pop("averaging_callback", False) else []
    model, at_retry = OutOfMemoryAt(failing_call), WeightsAtRetry()
    retried = InOrder(model=model, args=sgd_args(tmp_path / "a", auto_find_batch_size=True, **settings),
                      train_dataset=TinyData(), callbacks=[at_retry, *averaging])
    retried.train()
    smaller = retried._train_batch_size  # (recent accelerate retries with 90% of the batch, 3; 1.8 with half, 2)
    assert at_retry.attempts == 2 and smaller in (2, 3)

    fresh_model = TinyNet()
    fresh_model.load_state_dict(at_retry.weights)
    averaging = [WeightAveraging("swa", start=0.0, freq=1)] if averaging else []
    fresh = InOrder(model=fresh_model, args=sgd_args(tmp_path / "b", per_device_train_batch_size=smaller, **settings),
                    train_dataset=TinyData(), callbacks=averaging)
    fresh.train()
    assert retried.state.global_step == fresh.state.global_step == 3 * -(-16 // (2 * smaller))
    assert_same_weights(model, fresh_model)


# ---- SWA's schedule: what it cannot follow, and resumes that switch it ---------------------------------
@pytest.mark.parametrize("extra, message", [
    (dict(flat_method="swa", swa_lr=0.05), r"swa_lr=0.05 is not allowed with lr_scheduler_type='reduce_lr_on_plateau'"),
    (dict(flat_method="gsam", gsam_rho_min=0.01), r"gsam_rho_min=0.01 is not allowed with lr_scheduler_type="
                                                  r"'reduce_lr_on_plateau'.*gsam_rho_min=None"),
])
def test_schedules_that_step_on_metrics_are_refused_at_construction(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        sgd_args(tmp_path, lr_scheduler_type="reduce_lr_on_plateau", **extra)


def test_swa_lr_with_a_plateau_scheduler_passed_in_is_refused_before_the_first_step(tmp_path):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="swa", swa_lr=0.05),
                          train_dataset=TinyData(), optimizers=(optimizer, plateau))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"swa_lr=0.05 is not supported with a ReduceLROnPlateau scheduler"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("first, then, message", [
    (dict(), dict(swa_lr=0.05), r"swa_lr=0.05 from .*checkpoint-2: its scheduler.pt holds the Trainer's own schedule "
                                r"\(it was written with swa_lr=None\).*Resume with swa_lr=None"),
    (dict(swa_lr=0.05), dict(), r"swa_lr=None from .*checkpoint-2: its scheduler.pt holds SWA's schedule.*Resume "
                                r"with the swa_lr it was written with"),
])
def test_resuming_with_swa_lr_switched_on_or_off_is_refused_in_one_line(tmp_path, first, then, message):
    settings = dict(flat_method="swa", average_start=0.0, save_strategy="steps", save_steps=2, max_steps=4)
    FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, **settings, **first), train_dataset=TinyData()).train()
    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, **settings, **then), train_dataset=TinyData())
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_resuming_saf_with_another_number_of_past_epochs_is_refused(tmp_path):
    settings = dict(flat_method="saf", saf_start_epoch=0, save_strategy="steps", save_steps=4, num_train_epochs=4)
    FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, saf_past_epochs=2, **settings), train_dataset=TinyData()).train()
    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, saf_past_epochs=1, **settings), train_dataset=TinyData())
    with pytest.raises(ValueError, match=r"Cannot resume saf_past_epochs=1 from .*checkpoint-8: its SAF memory keeps 2 "
                                         r"past epoch\(s\).*Resume with saf_past_epochs=2"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


# ---- BatchNorm cannot normalise one sample: no one-sample group of hf-flat's making -------------------------
def forward_sizes(model):
    """The batch size of every training forward of `model`, in order."""
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["x"].shape[0]) if module.training
                                    else None, with_kwargs=True)
    return sizes


def test_sam_m_s_one_sample_last_chunk_joins_the_chunk_before_it_on_a_batchnorm_model(tmp_path):
    initial = TinyNet(batchnorm=True)
    collator = RecordingCollator()
    model = copy.deepcopy(initial)
    sizes = forward_sizes(model)
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="sam", sam_m=2), train_dataset=TinyData(n=15),
                          data_collator=collator)
    trainer.train()  # the plain Trainer trains on this data (a last batch of 3); a chunk of 1 sample would fail
    assert sizes == [2, 2, 2, 2] * 3 + [3, 3]
    steps = group_steps(collator.batches, 1, 4)
    expected = reference_where_and_when(initial, steps[:3], "sam", m=2)
    expected = reference_where_and_when(expected, steps[3:], "sam", m=None)  # (SGD keeps no state between the two)
    assert_same_weights(trainer.model, expected, atol=1e-6)
    assert torch.allclose(trainer.model.bn.running_mean, expected.bn.running_mean, atol=1e-6)


@pytest.mark.parametrize("method", ["gsam", "avg_sam"])
def test_other_chunked_methods_train_a_batchnorm_model_with_an_odd_last_batch(tmp_path, method):
    model = TinyNet(batchnorm=True)
    sizes = forward_sizes(model)
    FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method=method, sam_m=2), train_dataset=TinyData(n=15)).train()
    assert sizes[-1] == 3 and 1 not in sizes


def test_esam_keeps_two_samples_of_a_batchnorm_model(tmp_path):
    model = TinyNet(batchnorm=True)
    sizes = forward_sizes(model)
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="esam", esam_gamma=0.5),
                          train_dataset=TinyData(n=14))
    trainer.train()
    assert sizes[-3:] == [2, 2, 2]  # the last batch of 2: pass 1, selection, pass 2 on both samples
    assert 1 not in sizes
    from hf_flat.methods.esam import ESAM
    rise, counted = torch.tensor([0.3, 0.1]), torch.ones(2)
    batch = {"x": torch.arange(2.0), "labels": torch.arange(2)}
    assert ESAM(gamma=0.5).select(batch, rise, counted)[0]["x"].tolist() == [0.0]  # one sample without BatchNorm
    assert ESAM(gamma=0.5).select(batch, rise, counted, two_or_more=True)[0]["x"].tolist() == [0.0, 1.0]


# ---- ESAM's corner cases ---------------------------------------------------------------------------------
class TupleNet(TinyNet):
    """TinyNet with tuple outputs, as a transformers model with ``return_dict=False``: ``(loss, logits)``
    when given labels, else ``(logits,)``; and extra trainable tensors that its forward never uses."""

    def __init__(self, unused=False):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()  # (the Trainer reads it for label smoothing)
        if unused:
            self.spare = torch.nn.Linear(3, 3)

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["logits"],) if labels is None else (out["loss"], out["logits"])


def test_esam_ranks_by_the_label_smoothed_loss_of_tuple_outputs(tmp_path):
    """With label_smoothing_factor the Trainer pops the labels and smooths; ESAM ranks the samples by
    that smoothed loss, read from tuple outputs without labels (an IndexError before issue 23's
    hooks)."""
    from hf_flat.methods.esam import sample_losses
    from hf_flat.methods.outputs import captured_forward

    model = TupleNet()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="esam", label_smoothing_factor=0.3),
                          train_dataset=TinyData())
    batch = {"x": TinyData().x[:4], "labels": TinyData().y[:4]}
    with captured_forward(model) as seen:
        trainer.compute_loss(model, dict(batch))  # pops the labels, as in training
    losses, counted = sample_losses(trainer, seen, batch)
    logits = model(batch["x"])[0]
    by_hand = torch.stack([trainer.label_smoother((logits[i:i + 1],), batch["labels"][i:i + 1]) for i in range(4)])
    assert torch.allclose(losses, by_hand, atol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert not torch.allclose(losses, plain, atol=1e-3)  # the smoothing does change each sample's loss
    trainer.train()  # and a whole ESAM run trains on these outputs


def test_an_esam_draw_of_tensors_the_forward_does_not_use_perturbs_every_tensor(tmp_path):
    from hf_flat.methods.esam import esam_subset

    initial = TupleNet(unused=True)
    names = [n for n, _ in initial.named_parameters()]
    draws = [esam_subset(0, "0", index, len(names), 0.3) for index in range(8)]
    only_unused = [d for d in draws if any(d) and not any(c for c, n in zip(d, names) if not n.startswith("spare"))]
    assert only_unused  # (this seed does draw such a subset, so the test exercises it)
    collator = RecordingCollator()
    trainer = FlatTrainer(model=copy.deepcopy(initial), args=sgd_args(tmp_path, flat_method="esam", esam_beta=0.3,
                                                                       num_train_epochs=2),
                          train_dataset=TinyData(), data_collator=collator)
    trainer.train()  # RuntimeError "element 0 of tensors does not require grad" before the fix
    from helpers import reference_flat_family

    class DictOut(torch.nn.Module):  # the reference reads dict outputs
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, labels=None):
            return TinyNet.forward(self.net, x, labels)

    reference = reference_flat_family(DictOut(initial), group_steps(collator.batches, 1, 8), "esam", beta=0.3,
                                      unused=("net.spare.weight", "net.spare.bias"))
    assert_same_weights(trainer.model, reference.net, atol=1e-5)


# ---- transformers' resume of a ViT ---------------------------------------------------------------------------
def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               num_labels=3))


class Pixels(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(1, 8, 8, generator=g), "labels": torch.tensor(i % 3)}


def test_a_resumed_vit_ends_where_the_uninterrupted_run_ends(tmp_path):
    """transformers 5.2x saves ViT's weights under their older names and the Trainer's resume loads
    them raw (strict=False), leaving the encoder at its initial weights; FlatTrainer repairs it."""
    # one batch per epoch, so the data order cannot differ after the resume
    common = dict(flat_method="wasam", average_start=0.25, average_freq=1, per_device_train_batch_size=8,
                  num_train_epochs=4, save_strategy="steps", save_steps=2)
    full = InOrder(model=tiny_vit(), args=sgd_args(tmp_path / "full", **common), train_dataset=Pixels())
    full.train()
    resumed = InOrder(model=tiny_vit(), args=sgd_args(tmp_path / "resumed", **common), train_dataset=Pixels())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_weights(resumed.model, full.model, atol=1e-6)


def test_load_best_model_at_end_loads_a_vit_s_best_checkpoint_whole(tmp_path):
    from transformers import ViTForImageClassification

    args = sgd_args(tmp_path, flat_method="sam", per_device_train_batch_size=8, num_train_epochs=4, learning_rate=0.5,
                    eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                    metric_for_best_model="eval_loss")
    trainer = FlatTrainer(model=tiny_vit(), args=args, train_dataset=Pixels(), eval_dataset=Pixels())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert not best.endswith("checkpoint-4")  # (the best is not the last step, so loading it changes the model)
    assert_same_weights(trainer.model, ViTForImageClassification.from_pretrained(best), atol=0)


def test_sam_m_1_on_a_batchnorm_model_is_refused_before_the_first_step(tmp_path):
    model = TinyNet(batchnorm=True)
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="sam", sam_m=1), train_dataset=TinyData())
    with pytest.raises(ValueError, match=r"sam_m=1 perturbs each sample on its own, but TinyNet has BatchNorm layers.*"
                                         r"Use sam_m >= 2"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_esam_ranks_by_plain_cross_entropy_when_a_compute_loss_func_replaces_the_smoother(tmp_path):
    from hf_flat.methods.esam import sample_losses
    from hf_flat.methods.outputs import captured_forward

    model = TupleNet()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, flat_method="esam", label_smoothing_factor=0.3),
                          train_dataset=TinyData(),
                          compute_loss_func=lambda outputs, labels, num_items_in_batch=None:
                          torch.nn.functional.cross_entropy(outputs[0], labels))
    batch = {"x": TinyData().x[:4], "labels": TinyData().y[:4]}
    with captured_forward(model) as seen:
        trainer.compute_loss(model, dict(batch))
    plain = torch.nn.functional.cross_entropy(model(batch["x"])[0], batch["labels"], reduction="none")
    assert torch.allclose(sample_losses(trainer, seen, batch)[0], plain, atol=1e-6)


def test_lawa_with_a_snapshot_per_epoch_on_a_stream_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = TinyData()
            while True:
                yield from (data[i] for i in range(len(data)))

    args = sgd_args(tmp_path, flat_method="lawa", max_steps=4, average_start=0.0)
    with pytest.raises(ValueError, match=r"flat_method='lawa' with average_freq=0 takes a snapshot at the end of every "
                                         r"epoch, but the training data has no length"):
        FlatTrainer(model=TinyNet(), args=args, train_dataset=Stream()).train()


def test_a_resume_that_would_drop_the_average_says_so_before_the_schedule(tmp_path):
    settings = dict(save_strategy="steps", save_steps=2, max_steps=4)
    FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="wasam", average_start=0.0, swa_lr=0.05, **settings),
                train_dataset=TinyData()).train()
    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="sam", **settings), train_dataset=TinyData())
    with pytest.raises(ValueError, match=r"Cannot resume flat_method='sam' .*its state for swa would be dropped"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_an_esam_draw_that_a_later_batch_does_not_use_is_refused_clearly(tmp_path):
    """A forward that uses some weights on the first batch only (as mixture-of-experts routing may):
    a later draw of only those cannot be trained on; ESAM says so instead of a backward error."""
    from hf_flat.methods.esam import esam_subset

    class FirstBatchOnly(TinyNet):
        def __init__(self):
            super().__init__()
            self.extra, self.calls = torch.nn.Linear(3, 3), 0

        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            self.calls += 1
            if self.calls == 1:
                out["logits"] = self.extra(out["logits"])
                out["loss"] = torch.nn.functional.cross_entropy(out["logits"], labels)
            return out

    draws = [esam_subset(0, "0", index, 6, 0.3) for index in range(1, 4)]
    assert any(any(d) and not any(d[:4]) for d in draws)  # (a draw of the extra layer's tensors only comes soon)
    trainer = FlatTrainer(model=FirstBatchOnly(), args=sgd_args(tmp_path, flat_method="esam", esam_beta=0.3),
                          train_dataset=TinyData())
    with pytest.raises(ValueError, match=r"flat_method='esam' drew a subset of the trainable tensors \(esam_beta=0.3\) "
                                         r"of which this batch's forward uses none.*Use esam_beta=1"):
        trainer.train()
