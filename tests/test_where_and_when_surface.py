"""Where and when (`sam_m`, `sam_scope`, `sam_start` / `sam_interval`, average SAM) on the rest of the
Trainer's surface: losses normalised by `num_items_in_batch`, a final batch that `sam_m` leaves a
remainder chunk of, tuple outputs, seq2seq and encoder heads, PEFT, `model_init` with a
hyperparameter search, a callback that freezes a layer mid-run, early stopping and best-checkpoint
selection. The trained weights are compared with references written here in plain torch."""

import copy

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EarlyStoppingCallback, TrainerCallback

from hf_flat import FlatTrainer
from helpers import RecordingCollator, TinyData, TinyNet, random_directions, sgd_args


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


# ---- the hand reference ------------------------------------------------------------------------
def rows(batch: dict) -> int:
    return len(next(iter(batch.values())))


def cut(batch: dict, m: int | None) -> list[dict]:
    """`batch` in chunks of `m` samples along the first dimension (the last one may be shorter)."""
    size = rows(batch)
    m = size if m is None else m
    return [{k: v[i : i + m] for k, v in batch.items()} for i in range(0, size, m)]


def windows_of(batches, per_epoch: int, grad_accum: int) -> list[list[dict]]:
    """The recorded micro-batches grouped by optimizer step: `grad_accum` at a time within each epoch
    (an epoch's last window may be shorter)."""
    epochs = [batches[i : i + per_epoch] for i in range(0, len(batches), per_epoch)]
    return [epoch[i : i + grad_accum] for epoch in epochs for i in range(0, len(epoch), grad_accum)]


def hand_train(initial, windows, chunk_loss, method, rho, scope="micro", m=None, perturbed_steps=None, seed=0,
               lr=0.1, after_step=None, perturbed_losses=None):
    """Train a copy of `initial` by hand with plain SGD (constant `lr`) on `windows` (one list of
    micro-batches per optimizer step).

    `chunk_loss(model, chunk, micro_batch, window)` is a group of samples' loss as the Trainer scales
    it. Only parameters with `requires_grad` (read anew each step) are perturbed and trained.
    - not a perturbed step: gradient = sum over micro-batches b of grad loss(b).
    - "micro": per micro-batch, per chunk c of `m` samples: e from grad loss(c) (SAM: rho g / ||g||;
      "avg_sam": rho z / ||z||, z drawn for stream "0", counted over the run); gradient += grad loss(c)(w + e).
    - "step": one e from sum_b grad loss(b) (avg_sam: stream "all"); gradient = sum_b grad loss(b)(w + e).
    `after_step(t, model)` runs after step t; `perturbed_losses` receives each step's sum of the
    perturbed losses (None on plain steps).
    """
    model = copy.deepcopy(initial).train()
    draws = {}
    for t, window in enumerate(windows, start=1):
        params = [p for _, p in model.named_parameters() if p.requires_grad]

        def grad(batch, micro):
            loss = chunk_loss(model, batch, micro, window)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)], loss.item()

        def direction(g, stream):
            if method == "avg_sam":
                k = draws.get(stream, 0)
                draws[stream] = k + 1
                g = random_directions(params, seed, stream, k)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            return [rho * gi / (norm + 1e-12) for gi in g]

        def at(e, batch, micro):
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            result = grad(batch, micro)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            return result

        total = [torch.zeros_like(p) for p in params]
        perturbed_sum = 0.0
        perturbed = perturbed_steps is None or t in perturbed_steps
        if not perturbed:
            contributions = [grad(b, b)[0] for b in window]
        elif scope == "step":
            g_step = None
            if method != "avg_sam":
                g_step = [sum(gs) for gs in zip(*(grad(b, b)[0] for b in window))]
            e = direction(g_step, "all")
            results = [at(e, b, b) for b in window]
            contributions = [g for g, _ in results]
            perturbed_sum = sum(v for _, v in results)
        else:
            contributions = []
            for b in window:
                for c in cut(b, m):
                    e = direction(None if method == "avg_sam" else grad(c, b)[0], "0")
                    g, value = at(e, c, b)
                    contributions.append(g)
                    perturbed_sum += value
        for g in contributions:
            for acc, gi in zip(total, g):
                acc.add_(gi)
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(lr * g)
        if perturbed_losses is not None:
            perturbed_losses.append(perturbed_sum if perturbed else None)
        if after_step is not None:
            after_step(t, model)
    return model


def mean_loss(model, chunk, micro, window):
    """A mean loss: the chunk's mean cross-entropy, weighted len(chunk) / len(micro-batch), over the
    window's micro-batches (the Trainer's division by the accumulation steps)."""
    out = model(chunk["x"])
    logits = out["logits"] if isinstance(out, dict) else out[0]
    return F.cross_entropy(logits, chunk["labels"]) * rows(chunk) / rows(micro) / len(window)


def assert_close_weights(a: nn.Module, b: nn.Module, atol=1e-6):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].detach(), sb[k].detach(), atol=atol, rtol=0, msg=lambda s, k=k: f"{k}: {s}")


def differ(a: nn.Module, b: nn.Module, atol=1e-5) -> bool:
    return any(not torch.allclose(p, q, atol=atol) for p, q in zip(a.parameters(), b.parameters()))


def train(tmp_path, model, data, callbacks=(), eval_dataset=None, **overrides):
    collator = RecordingCollator()
    trainer = FlatTrainer(model=model, args=sgd_args(tmp_path, **overrides), train_dataset=data,
                          eval_dataset=eval_dataset, data_collator=collator, callbacks=list(callbacks))
    trainer.train()
    return trainer, collator.batches


# ---- 1. sam_m with a loss normalised by num_items_in_batch (a decoder) -----------------------------
VOCAB, SEQ = 20, 6


class PromptAndAnswer(torch.utils.data.Dataset):
    """Token sequences whose first 1 to 4 tokens (a prompt; position 0 always) are labelled -100, so
    that samples, chunks and micro-batches hold unequal numbers of target tokens."""

    def __init__(self, n=11, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids.clone()
        for i, masked in enumerate(torch.randint(1, SEQ - 1, (n,), generator=g).tolist()):
            self.labels[i, :masked] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def target_tokens(batch) -> int:
    """Tokens a causal LM predicts: labels[:, 1:] that are not -100 (labels[:, 0] is always -100
    here, so the count is the same whether or not the Trainer shifts the labels to count)."""
    return int(batch["labels"][:, 1:].ne(-100).sum())


def token_sum(model, chunk):
    logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def over_window(model, chunk, micro, window):
    """The chunk's summed token losses over N = the target tokens of the whole accumulation window."""
    return token_sum(model, chunk) / sum(target_tokens(b) for b in window)


def over_micro_batch(model, chunk, micro, window):  # wrong: N of the micro-batch only
    return token_sum(model, chunk) / target_tokens(micro)


def over_chunk(model, chunk, micro, window):  # wrong: each chunk normalised by its own tokens
    return token_sum(model, chunk) / target_tokens(chunk) / len(window)


@pytest.mark.parametrize("settings", [dict(flat_method="sam", sam_m=2), dict(flat_method="avg_sam", sam_m=2),
                                      dict(flat_method="sam", sam_scope="step")])
def test_a_loss_normalised_by_num_items_in_batch_counts_every_chunk_over_the_whole_window(tmp_path, settings):
    """Tiny GPT-2, 11 samples in micro-batches of 4, 4, 3 (a final chunk of 1), two micro-batches per
    step: each chunk's loss is its summed token losses over the window's N target tokens, as the
    Trainer passes `num_items_in_batch`."""
    initial = tiny_gpt2()
    model = copy.deepcopy(initial)
    passed = []
    model.register_forward_pre_hook(lambda mod, a, kw: passed.append(kw.get("num_items_in_batch")), with_kwargs=True)
    data = PromptAndAnswer()
    trainer, batches = train(tmp_path, model, data, num_train_epochs=2, gradient_accumulation_steps=2, sam_rho=0.5,
                             **settings)
    windows = windows_of(batches, per_epoch=3, grad_accum=2)
    assert trainer.state.global_step == len(windows) == 4 and [len(w) for w in windows] == [2, 1, 2, 1]
    assert len({target_tokens(c) for b in batches for c in cut(b, 2)}) > 1  # chunks of unequal token counts
    reference = dict(method=settings["flat_method"], rho=0.5, scope=settings.get("sam_scope", "micro"),
                     m=settings.get("sam_m"))
    expected = hand_train(initial, windows, over_window, **reference)
    assert_close_weights(trainer.model, expected, atol=2e-6)
    # every pass got num_items_in_batch: the count N of its whole window, times the chunk's share of its
    # micro-batch (FlatTrainer.compute_loss multiplies the loss by that share again)
    m = settings.get("sam_m") or 10**9
    shares = lambda micro: [len(c["labels"]) / len(micro["labels"]) for c in cut(micro, m)]  # noqa: E731
    expected_items = {round(sum(target_tokens(b) for b in w) * s, 4) for w in windows for micro in w for s in shares(micro)}
    assert None not in passed and {round(float(n), 4) for n in passed} == expected_items
    for wrong in (over_micro_batch, over_chunk):  # the test tells these normalisations apart
        assert differ(hand_train(initial, windows, wrong, **reference), expected)


# ---- 1b. sam_m with a mean loss and a final micro-batch that m does not fill ---------------------
@pytest.mark.parametrize("method", ["sam", "avg_sam"])
def test_a_mean_loss_weights_each_chunk_by_its_share_of_a_short_final_batch(tmp_path, method):
    """16 samples in micro-batches of 6, 6, 4, sam_m=3: the final micro-batch has chunks of 3 and 1,
    weighted 3/4 and 1/4; its window has one micro-batch."""
    initial = TinyNet()
    trainer, batches = train(tmp_path, copy.deepcopy(initial), TinyData(), flat_method=method, sam_rho=0.5, sam_m=3,
                             per_device_train_batch_size=6, gradient_accumulation_steps=2, num_train_epochs=2)
    windows = windows_of(batches, per_epoch=3, grad_accum=2)
    assert [[rows(b) for b in w] for w in windows] == [[6, 6], [4]] * 2 and trainer.state.global_step == 4
    expected = hand_train(initial, windows, mean_loss, method, rho=0.5, m=3)
    assert_close_weights(trainer.model, expected)

    def equal_shares(model, chunk, micro, window):  # wrong: every chunk counts alike
        return F.cross_entropy(model(chunk["x"])["logits"], chunk["labels"]) / len(cut(micro, 3)) / len(window)

    assert differ(hand_train(initial, windows, equal_shares, method, rho=0.5, m=3), expected)


class KwargsNet(TinyNet):
    """A mean loss from a forward that accepts `**kwargs`, as every Hugging Face head's does
    (RobertaForSequenceClassification, ViTForImageClassification, T5ForConditionalGeneration ...):
    the Trainer then passes `num_items_in_batch`, which the loss does not use."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


def test_sam_m_with_a_mean_loss_from_a_kwargs_forward_averages_the_chunks(tmp_path):
    initial = KwargsNet()
    trainer, batches = train(tmp_path, copy.deepcopy(initial), TinyData(), flat_method="sam", sam_rho=0.05, sam_m=2)
    windows = windows_of(batches, per_epoch=4, grad_accum=1)
    assert_close_weights(trainer.model, hand_train(initial, windows, mean_loss, "sam", rho=0.05, m=2))


def test_sam_m_refuses_a_compute_loss_override_that_skips_flat_trainers(tmp_path):
    class OwnLoss(FlatTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    trainer = OwnLoss(model=TinyNet(), args=sgd_args(tmp_path, flat_method="sam", sam_m=2), train_dataset=TinyData())
    with pytest.raises(RuntimeError, match=r"call super\(\).compute_loss\(...\) from it, or set sam_m=None"):
        trainer.train()


# ---- 2. tuple outputs ----------------------------------------------------------------------------
class TupleNet(TinyNet):
    """`return_dict=False` style: `(loss, logits)` with labels, `(logits,)` without."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)


@pytest.mark.parametrize("settings", [
    dict(flat_method="sam", sam_m=2), dict(flat_method="sam", sam_scope="step"), dict(flat_method="avg_sam"),
    dict(flat_method="avg_sam", sam_scope="step", sam_interval=2),
])
def test_a_tuple_output_model_matches_the_reference(tmp_path, settings):
    initial = TupleNet()
    trainer, batches = train(tmp_path, copy.deepcopy(initial), TinyData(), sam_rho=0.5, gradient_accumulation_steps=2,
                             num_train_epochs=2, **settings)
    windows = windows_of(batches, per_epoch=4, grad_accum=2)
    perturbed = set(range(1, len(windows) + 1, settings.get("sam_interval", 1)))
    losses = []
    expected = hand_train(initial, windows, mean_loss, settings["flat_method"], rho=0.5,
                          scope=settings.get("sam_scope", "micro"), m=settings.get("sam_m"), perturbed_steps=perturbed,
                          perturbed_losses=losses)
    assert_close_weights(trainer.model, expected)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if settings["flat_method"] == "sam":
        assert [h["perturbed_loss"] for h in logs] == pytest.approx(losses, abs=1e-5)
    else:  # average SAM's loss is L(w + e) on perturbed steps
        for h, value in zip(logs, losses):
            assert "perturbed_loss" not in h
            if value is not None:
                assert h["loss"] == pytest.approx(value, abs=1e-5)


# ---- 3. seq2seq and encoder heads ---------------------------------------------------------------
class Seq2SeqData(torch.utils.data.Dataset):
    def __init__(self, n=8, vocab=18):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab, (n, 6), generator=g)
        self.labels = torch.randint(2, vocab, (n, 4), generator=g)
        self.labels[::3, -1] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


@pytest.mark.parametrize("settings", [dict(sam_scope="step", gradient_accumulation_steps=2), dict(sam_m=2),
                                      dict(flat_method="avg_sam", sam_m=2, gradient_accumulation_steps=2)])
def test_a_seq2seq_head_trains_with_each_scope(tmp_path, settings):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=18, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    model.register_forward_pre_hook(lambda mod, a: calls.append(1) if mod.training else None)
    values = dict(flat_method="sam", sam_rho=0.05, learning_rate=0.05, num_train_epochs=2)
    trainer, _ = train(tmp_path, model, Seq2SeqData(), **{**values, **settings})
    steps = trainer.state.global_step
    per_pass = 8 // 4 * 2 if "sam_m" in settings else 8 // 4  # forward passes over one epoch's samples, once
    assert len(calls) == 2 * per_pass * (1 if settings.get("flat_method") == "avg_sam" else 2)
    assert steps == 4 // settings.get("gradient_accumulation_steps", 1)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    if settings.get("flat_method") != "avg_sam":
        assert all(torch.isfinite(torch.tensor(h["perturbed_loss"])) for h in logs)


class Sentences(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 30, (n, 6), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def test_an_encoder_classifier_with_average_sam_and_swa_evaluates_the_average(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=20, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = FlatTrainer(
        model=model,
        args=sgd_args(tmp_path, flat_method="avg_sam+swa", sam_rho=0.5, sam_interval=2, num_train_epochs=2,
                      average_start=0.5, average_freq=1, eval_strategy="steps", eval_steps=2),
        train_dataset=Sentences(), eval_dataset=Sentences(n=8, seed=1),
    )
    trainer.train()
    assert trainer.perturbation.draws == 4  # steps 1, 3, 5, 7 of 8: one direction each
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8]
    assert all("eval_avg_loss" in h and torch.isfinite(torch.tensor(h["eval_avg_loss"])) for h in evals)
    assert evals[-1]["eval_avg_loss"] != evals[-1]["eval_loss"]  # snapshots from step 4 on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- 4. PEFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(), dict(sam_m=2), dict(sam_scope="step")])
def test_lora_with_average_sam_draws_over_the_adapters_only(tmp_path, settings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0, init_lora_weights=False)
    initial = get_peft_model(TinyNet(), config)
    model = copy.deepcopy(initial)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen = []

    def frozen_check(module, args):  # at every forward, the perturbed one included
        seen.append(all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen))

    model.register_forward_pre_hook(frozen_check)
    trainer, batches = train(tmp_path, model, TinyData(), flat_method="avg_sam", sam_rho=0.5,
                             gradient_accumulation_steps=2, **settings)
    assert seen and all(seen)
    windows = windows_of(batches, per_epoch=4, grad_accum=2)
    expected = hand_train(initial, windows, mean_loss, "avg_sam", rho=0.5, scope=settings.get("sam_scope", "micro"),
                          m=settings.get("sam_m"))
    assert_close_weights(trainer.model, expected)
    trained = dict(trainer.model.named_parameters())
    for name, p in initial.named_parameters():
        if p.requires_grad:
            assert "lora_" in name and not torch.equal(trained[name], p), name
        else:
            assert torch.equal(trained[name], p), name


# ---- 5. model_init and hyperparameter search ----------------------------------------------------
class TrialRecorder(TrainerCallback):
    """Per training run: its where-and-when arguments, its first recorded batch, its forward passes,
    which steps logged perturbed_loss, and its final weights."""

    def __init__(self, collator, forwards):
        self.collator, self.forwards, self.runs = collator, forwards, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.forwards.clear()
        self.runs.append(dict(flat_method=args.flat_method, sam_interval=args.sam_interval, sam_m=args.sam_m,
                              first=len(self.collator.batches), perturbed_logs=[]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.runs[-1]["perturbed_logs"].append("perturbed_loss" in logs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runs[-1].update(weights=copy.deepcopy(model), steps=state.global_step, forwards=len(self.forwards))


def test_hyperparameter_trials_each_perturb_where_and_when_they_say(tmp_path):
    initial, collator, forwards = TinyNet(), RecordingCollator(), []

    def model_init():
        model = copy.deepcopy(initial)
        model.register_forward_pre_hook(lambda mod, a: forwards.append(1) if mod.training else None)
        return model

    recorder = TrialRecorder(collator, forwards)
    trainer = FlatTrainer(
        model_init=model_init, args=sgd_args(tmp_path, flat_method="sam", sam_rho=0.5),
        train_dataset=TinyData(), eval_dataset=TinyData(n=8, seed=5), data_collator=collator, callbacks=[recorder],
    )
    # (sam_m=4, the whole micro-batch, stands for None: the Trainer casts a trial's value to the type of
    # the previous trial's, so a search cannot set sam_m back to None once a trial has set an int)
    grid = {"flat_method": ["sam", "avg_sam"], "sam_interval": [1, 2], "sam_m": [4, 2]}
    trainer.hyperparameter_search(
        hp_space=lambda trial: {name: trial.suggest_categorical(name, values) for name, values in grid.items()},
        backend="optuna", n_trials=8, direction="minimize", sampler=optuna.samplers.GridSampler(grid),
    )
    tried = sorted((r["flat_method"], r["sam_interval"], r["sam_m"]) for r in recorder.runs)
    assert tried == sorted((f, i, m) for f in grid["flat_method"] for i in grid["sam_interval"] for m in grid["sam_m"])
    for run in recorder.runs:
        assert run["steps"] == 4
        perturbed = set(range(1, 5, run["sam_interval"]))
        chunks = 4 // run["sam_m"]
        per_perturbed_step = chunks * (2 if run["flat_method"] == "sam" else 1)
        assert run["forwards"] == len(perturbed) * per_perturbed_step + (4 - len(perturbed)), run
        logged = [t in perturbed and run["flat_method"] == "sam" for t in range(1, 5)]
        assert run["perturbed_logs"] == logged, run
        windows = windows_of(collator.batches[run["first"] : run["first"] + 4], per_epoch=4, grad_accum=1)
        expected = hand_train(initial, windows, mean_loss, run["flat_method"], rho=0.5, m=run["sam_m"],
                              perturbed_steps=perturbed)
        assert_close_weights(run["weights"], expected)


# ---- 6. a callback that freezes a layer mid-run -------------------------------------------------
class FreezeAfter(TrainerCallback):
    """Freezes fc1 at the end of optimizer step `step`; keeps a copy of fc1 after every step."""

    def __init__(self, step):
        self.step, self.fc1_after = step, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.fc1.requires_grad_(False)
        self.fc1_after[state.global_step] = [p.detach().clone() for p in model.fc1.parameters()]


@pytest.mark.parametrize("settings", [dict(flat_method="sam", sam_scope="step"), dict(flat_method="avg_sam"),
                                      dict(flat_method="avg_sam", sam_scope="step"), dict(flat_method="sam", sam_m=2)])
def test_a_layer_frozen_mid_run_stays_put_and_the_rest_matches(tmp_path, settings):
    initial = TinyNet()
    freezer = FreezeAfter(step=2)
    trainer, batches = train(tmp_path, copy.deepcopy(initial), TinyData(), callbacks=[freezer], sam_rho=0.5,
                             gradient_accumulation_steps=2, num_train_epochs=3, **settings)
    assert trainer.state.global_step == 6
    for t in range(3, 7):  # fc1 exactly as it was after step 2
        assert all(torch.equal(a, b) for a, b in zip(freezer.fc1_after[t], freezer.fc1_after[2]))
    assert not all(torch.equal(a, b) for a, b in zip(freezer.fc1_after[2], initial.fc1.parameters()))

    def freeze(t, model):
        if t == 2:
            model.fc1.requires_grad_(False)

    windows = windows_of(batches, per_epoch=4, grad_accum=2)
    expected = hand_train(initial, windows, mean_loss, settings["flat_method"], rho=0.5,
                          scope=settings.get("sam_scope", "micro"), m=settings.get("sam_m"), after_step=freeze)
    assert_close_weights(trainer.model, expected)
    if settings["flat_method"] == "avg_sam":  # the directions after the freeze are drawn over fc2 only
        unfrozen = hand_train(initial, windows, mean_loss, "avg_sam", rho=0.5, scope=settings.get("sam_scope", "micro"))
        assert differ(unfrozen, expected)


# ---- 7. early stopping and best-checkpoint selection on a schedule ------------------------------
def test_early_stopping_and_the_best_checkpoint_with_sam_on_every_other_step(tmp_path):
    initial = TinyNet()
    stopper = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9)
    trainer, batches = train(
        tmp_path, copy.deepcopy(initial), TinyData(), callbacks=[stopper], eval_dataset=TinyData(n=8, seed=5),
        flat_method="sam", sam_rho=0.5,
        sam_interval=2, num_train_epochs=3, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss",
    )
    steps = trainer.state.global_step
    assert steps == 6  # evaluations at 2, 4, 6: the first sets the bar no later one clears by 1e9
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logs) == list(range(1, 7))
    assert [t for t in logs if "perturbed_loss" in logs[t]] == [1, 3, 5]
    assert all(("sharpness" in logs[t]) == (t % 2 == 1) for t in logs)
    batches = [b for b in batches if rows(b) == 4]  # the evaluation batches (of 8) went through the collator too
    windows = windows_of(batches, per_epoch=4, grad_accum=1)[:steps]
    perturbed_losses = []
    hand_train(initial, windows, mean_loss, "sam", rho=0.5, perturbed_steps={1, 3, 5}, perturbed_losses=perturbed_losses)
    for t in (1, 3, 5):
        assert logs[t]["perturbed_loss"] == pytest.approx(perturbed_losses[t - 1], abs=1e-6)
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best == min(evals, key=evals.get)
    # the model at the end holds the best checkpoint's weights: the reference after `best` steps
    expected = hand_train(initial, windows[:best], mean_loss, "sam", rho=0.5, perturbed_steps={1, 3, 5})
    assert_close_weights(trainer.model, expected)
    if best != steps:
        assert differ(hand_train(initial, windows, mean_loss, "sam", rho=0.5, perturbed_steps={1, 3, 5}), expected)
