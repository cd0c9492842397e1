"""SAF and MESA (seed 003): the trajectory term by hand, the SAF memory, the EMA teacher, resume."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

from hf_flat import FlatTrainer
from hf_flat.methods.trajectory import trajectory_loss, valid_positions
from helpers import RecordingCollator, TinyData, TinyNet, sgd_args


def kl_by_hand(p_logits, q_logits, tau):
    p = torch.softmax(p_logits / tau, -1)
    q = torch.softmax(q_logits / tau, -1)
    return (p * (p.log() - q.log())).sum(-1)


def test_trajectory_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    has = torch.tensor([True, False, True, True])
    expected = 0.3 * 25 * (kl_by_hand(target, logits, 5.0) * has).sum() / 4  # missing rows count in |B|
    assert trajectory_loss(logits, target, 0.3, 5.0, has_target=has).item() == pytest.approx(expected.item(), rel=1e-5)
    # regression head: lambda * squared error
    reg = trajectory_loss(logits[:, :1], target[:, :1], 0.8, 5.0)
    assert reg.item() == pytest.approx((0.8 * (logits[:, 0] - target[:, 0]) ** 2).mean().item(), rel=1e-6)


def test_per_token_kl_skips_padding_and_ignored_labels():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[5, 1, 2, -100], [3, -100, -100, -100]])
    seq2seq = valid_positions({"labels": labels}, logits, causal=False)
    causal = valid_positions({"labels": labels}, logits, causal=True)  # position t predicts label t + 1
    assert seq2seq.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert causal.tolist() == [[True, True, False, False], [False, False, False, False]]
    kl = kl_by_hand(target, logits, 2.0)
    expected = 0.5 * 4 * (kl * seq2seq).sum() / seq2seq.sum()
    assert trajectory_loss(logits, target, 0.5, 2.0, valid=seq2seq).item() == pytest.approx(expected.item(), rel=1e-5)
    noisy = logits.clone()
    noisy[~seq2seq] += 100.0  # what happens at ignored positions does not matter
    assert trajectory_loss(noisy, target, 0.5, 2.0, valid=seq2seq).item() == pytest.approx(expected.item(), rel=1e-5)
    attention = valid_positions({"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}, logits, causal=True)
    assert attention.sum().item() == 6


class ForwardRecorder(TrainerCallback):
    """Every training forward's (epoch, sample indices, logits), and the live weights per step."""

    def __init__(self, data):
        self.data, self.forwards, self.weights, self.trainer = data, [], {}, None

    def hook(self, module, args, kwargs, output):
        if module.training:
            x = kwargs["x"]
            indices = [int((self.data.x == row).all(1).nonzero()) for row in x]
            self.forwards.append((int(self.trainer.state.epoch), indices, output["logits"].detach().clone()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}


def run(tmp_path, model, data=None, **overrides):
    data = data if data is not None else TinyData()
    recorder = ForwardRecorder(data)
    model.register_forward_hook(recorder.hook, with_kwargs=True)
    trainer = FlatTrainer(
        model=model, args=sgd_args(tmp_path, **{"num_train_epochs": 4, **overrides}),
        train_dataset=data, data_collator=RecordingCollator(), callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    return trainer, recorder


def test_saf_memory_and_trajectory_term(tmp_path):
    trainer, rec = run(tmp_path, TinyNet(), flat_method="saf", saf_past_epochs=2, saf_start_epoch=2, saf_tau=2.0)
    saf = trainer.trajectory
    assert saf.logits.dtype == torch.float16 and saf.logits.shape == (2, 16, 3)
    assert saf.nbytes == 2 * 16 * 3 * 2 + 2 * 16 * 4
    by_epoch = {}
    for epoch, indices, logits in rec.forwards:
        for i, row in zip(indices, logits):
            by_epoch[(epoch, i)] = row
    for epoch in (2, 3):  # the memory holds exactly the logits of the last two epochs
        for i in range(16):
            assert saf.epochs[epoch % 2, i].item() == epoch
            assert torch.equal(saf.logits[epoch % 2, i], by_epoch[(epoch, i)].half())
    # the logged trajectory term: lambda tau^2 mean KL(logits two epochs ago || now), from epoch 2 on
    logged = [h.get("trajectory_loss") for h in trainer.state.log_history if "loss" in h]
    assert logged[:8] == [None] * 8  # epochs 0 and 1: no term
    for step, (epoch, indices, logits) in enumerate(rec.forwards):
        if epoch < 2:
            continue
        target = torch.stack([by_epoch[(epoch - 2, i)].half().float() for i in indices])
        expected = 0.3 * 4 * kl_by_hand(target, logits, 2.0).mean()
        assert logged[step] == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert log["task_loss"] == pytest.approx(log["loss"] - log["trajectory_loss"])


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_lambda_zero_is_the_plain_trainer(tmp_path, method):
    initial = TinyNet()
    flat = FlatTrainer(
        model=copy.deepcopy(initial), train_dataset=TinyData(), data_collator=RecordingCollator(),
        args=sgd_args(tmp_path / "flat", num_train_epochs=3, flat_method=method, saf_lambda=0.0, mesa_lambda=0.0,
                      saf_start_epoch=0, saf_past_epochs=1, mesa_start_epoch=0),
    )
    flat.train()
    plain = Trainer(model=copy.deepcopy(initial), args=sgd_args(tmp_path / "plain", num_train_epochs=3),
                    train_dataset=TinyData(), data_collator=RecordingCollator())
    plain.train()
    for (k, a), b in zip(flat.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_mesa_teacher_is_the_ema_and_the_term_matches(tmp_path):
    initial = TinyNet(batchnorm=True)
    trainer, rec = run(tmp_path, copy.deepcopy(initial), flat_method="mesa", mesa_decay=0.8, mesa_start_epoch=1,
                       mesa_tau=2.0, mesa_lambda=0.5, num_train_epochs=2)
    v = {k: p.detach().clone() for k, p in initial.named_parameters()}
    teachers = [copy.deepcopy(v)]  # the teacher used at step t + 1 is the EMA after step t
    for t in range(1, 9):
        v = {k: 0.8 * v[k] + 0.2 * rec.weights[t][k] for k in v}
        teachers.append(copy.deepcopy(v))
    for k, p in trainer.trajectory.teacher.named_parameters():
        torch.testing.assert_close(p, v[k], atol=1e-6, rtol=0)
    assert not trainer.trajectory.teacher.training
    logged = [h.get("trajectory_loss") for h in trainer.state.log_history if "loss" in h]
    assert logged[:4] == [None] * 4  # epoch 0: no term yet
    batches = trainer.data_collator.batches
    for step in range(4, 8):  # epoch 1: the term is on
        teacher = copy.deepcopy(initial).eval()
        state = {**rec.weights[step], **teachers[step]}  # buffers copied from the model after step
        teacher.load_state_dict(state)
        with torch.no_grad():
            target = teacher(batches[step]["x"])["logits"]
        expected = 0.5 * 4 * kl_by_hand(target, rec.forwards[step][2], 2.0).mean()
        assert logged[step] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_resume_continues_the_trajectory_term_exactly(tmp_path, method):
    common = dict(flat_method=method, saf_past_epochs=1, saf_start_epoch=1, mesa_start_epoch=1, mesa_decay=0.5,
                  num_train_epochs=3, save_strategy="steps", save_steps=5)
    full = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "full", **common), train_dataset=TinyData())
    full.train()
    resumed = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path / "resumed", **common), train_dataset=TinyData())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    full_terms = [h["trajectory_loss"] for h in full.state.log_history if "trajectory_loss" in h]
    resumed_terms = [h["trajectory_loss"] for h in resumed.state.log_history if "trajectory_loss" in h]
    assert resumed_terms == pytest.approx(full_terms, abs=1e-6) and any(t > 0 for t in full_terms[5:])


def test_saf_index_survives_column_removal_and_custom_collators(tmp_path):
    import datasets

    data = TinyData()
    table = datasets.Dataset.from_dict(
        {"x": data.x.tolist(), "labels": data.y.tolist(), "text": [f"sample {i}" for i in range(16)]}
    ).with_format("torch")
    seen = []

    def collate(features):  # a custom collator that would break on unknown keys
        assert set(features[0]) == {"x", "labels"}, features[0].keys()
        seen.append(len(features))
        return {"x": torch.stack([f["x"] for f in features]), "labels": torch.stack([f["labels"] for f in features])}

    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="saf", saf_past_epochs=1,
                          saf_start_epoch=1, num_train_epochs=2), train_dataset=table, data_collator=collate)
    trainer.train()  # TinyNet.forward(x, labels) would raise on an index keyword
    assert seen and (trainer.trajectory.epochs >= 0).all()


def test_saf_refuses_iterable_data_and_per_token_outputs(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(TinyData())

    trainer = FlatTrainer(model=TinyNet(), args=sgd_args(tmp_path, flat_method="saf", max_steps=2), train_dataset=Stream())
    with pytest.raises(ValueError, match="IterableDataset.*flat_method='mesa'"):
        trainer.train()

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    tokens = [{"input_ids": torch.randint(0, 20, (6,)), "labels": torch.randint(0, 20, (6,))} for _ in range(4)]
    args = sgd_args(tmp_path, flat_method="saf", saf_start_epoch=0, saf_past_epochs=1, num_train_epochs=2)
    trainer = FlatTrainer(model=lm, args=args, train_dataset=tokens)
    with pytest.raises(ValueError, match=r"one distribution per token.*flat_method='mesa'"):
        trainer.train()  # refused before the first step


def test_mesa_on_a_causal_lm_with_padding(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lm = GPT2LMHeadModel(config)
    tokens = []
    for i in range(8):
        ids = torch.randint(0, 20, (6,))
        labels = ids.clone()
        labels[4 + i % 2 :] = -100  # padded tails
        tokens.append({"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()})
    trainer = FlatTrainer(model=lm, train_dataset=tokens,
                          args=sgd_args(tmp_path, flat_method="mesa", mesa_start_epoch=0, num_train_epochs=2))
    trainer.train()
    terms = [h["trajectory_loss"] for h in trainer.state.log_history if "trajectory_loss" in h]
    assert len(terms) == 4 and terms[0] == pytest.approx(0.0, abs=1e-7) and terms[-1] > 0  # teacher = model at step 1


def test_mesa_on_a_seq2seq_model_with_padded_labels(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=20, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    examples = []
    for i in range(8):
        labels = torch.randint(1, 20, (5,))
        labels[3 + i % 2 :] = -100
        examples.append({"input_ids": torch.randint(1, 20, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
                         "labels": labels})
    trainer = FlatTrainer(model=model, train_dataset=examples,
                          args=sgd_args(tmp_path, flat_method="mesa", mesa_start_epoch=0, num_train_epochs=2))
    trainer.train()
    terms = [h["trajectory_loss"] for h in trainer.state.log_history if "trajectory_loss" in h]
    assert len(terms) == 4 and terms[0] == pytest.approx(0.0, abs=1e-5) and terms[-1] > 0


def test_saf_fetches_a_batch_of_a_datasets_dataset_in_one_call():
    """IndexedDataset passes torch's batched fetch (`__getitems__`) through to a `datasets.Dataset`:
    the same examples, with their indices, in one read per batch (one read per example made SAF
    cost a third of a small model's step)."""
    from datasets import Dataset

    from hf_flat.methods.saf import INDEX_KEY, IndexedDataset

    class Counted(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data, self.batched, self.single = data, 0, 0

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            self.single += 1
            return self.data[i]

        def __getitems__(self, indices):
            self.batched += 1
            return self.data.__getitems__(indices)

    data = Dataset.from_dict({"x": [[float(i), -float(i)] for i in range(10)], "labels": list(range(10))}).with_format("torch")
    counted = Counted(data)
    indexed = IndexedDataset(counted)
    batch = indexed.__getitems__([3, 7, 1])
    assert [b[INDEX_KEY] for b in batch] == [3, 7, 1]
    for b, i in zip(batch, [3, 7, 1]):
        assert torch.equal(b["x"], data[i]["x"]) and b["labels"] == data[i]["labels"]
    loader = torch.utils.data.DataLoader(indexed, batch_size=4, collate_fn=list)
    assert sum(len(b) for b in loader) == 10
    assert counted.batched == 1 + 3 and counted.single == 0  # one read per batch, none per example
    plain = IndexedDataset([{"x": torch.zeros(2)}, {"x": torch.ones(2)}])  # a list: example by example
    assert [b[INDEX_KEY] for b in plain.__getitems__([1, 0])] == [1, 0]
    with pytest.raises(TypeError, match="map names to values"):
        IndexedDataset([torch.zeros(2)]).__getitems__([0])
