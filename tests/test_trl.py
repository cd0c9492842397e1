"""hf-flat on top of TRL's trainers: `flat_trainer_class(SFTTrainer)` and `(DPOTrainer)`.

Each method is checked against a step computed by hand with the plain TRL trainer's own
`compute_loss` (completion-only masks, packing, DPO's loss with its reference model), and the
trainer's own metrics against the plain trainer's. Tiny Llama models built from a config, a
WordLevel tokenizer, no download. Runs at both ends of the tested TRL range (CI's two virtual
environments): TRL < 1.15 returns logits, later versions a fused LM head's log-probabilities.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback

import hf_flat
from hf_flat import flat_arguments_class, flat_trainer_class
from helpers import LM_TEXTS, tiny_llama, tiny_lm_tokenizer

trl = pytest.importorskip("trl")
SFTConfig, SFTTrainer, DPOConfig, DPOTrainer = trl.SFTConfig, trl.SFTTrainer, trl.DPOConfig, trl.DPOTrainer
FlatSFT, FlatSFTConfig = flat_trainer_class(SFTTrainer), flat_arguments_class(SFTConfig)
FlatDPO, FlatDPOConfig = flat_trainer_class(DPOTrainer), flat_arguments_class(DPOConfig)

TOKENIZER = tiny_lm_tokenizer()
RHO, LR = 0.1, 0.1


def sgd(output_dir, config=FlatSFTConfig, **overrides):
    """Arguments under which one optimizer step is a plain SGD step on one micro-batch of 4."""
    values = dict(output_dir=str(output_dir), optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    values.update(overrides)
    return config(**values)


def text_data():
    return Dataset.from_dict({"text": LM_TEXTS})


def prompt_completion_data():
    return Dataset.from_dict({"prompt": [t.split(" ", 2)[0] + " " + t.split(" ", 2)[1] for t in LM_TEXTS],
                              "completion": [" " + t.split(" ", 2)[2] for t in LM_TEXTS]})


def preference_data():
    return Dataset.from_dict({"prompt": ["the cat", "a dog", "the big", "a small"] * 2,
                              "chosen": [" sat on the mat", " ran on a log", " red dog sat", " blue cat ran"] * 2,
                              "rejected": [" mat the on", " log a dog", " sat sat", " ran ran"] * 2})


def spy_on_losses(trainer):
    """Record (inputs, num_items_in_batch) of each training compute_loss call of `trainer`."""
    calls, original = [], trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, num_items_in_batch))
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    return calls


def hand_sam_step(helper, model, batch, items, rho=RHO, lr=LR):
    """SAM by hand with `helper`'s (a plain TRL trainer's) own compute_loss on `model`, then SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(helper.compute_loss(model, dict(batch), num_items_in_batch=items), params)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).float()
    e = [rho * x / (norm + 1e-12) for x in g]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    g2 = torch.autograd.grad(helper.compute_loss(model, dict(batch), num_items_in_batch=items), params)
    with torch.no_grad():
        for p, d, x in zip(params, e, g2):
            p.sub_(d).sub_(lr * x)


def assert_same(a, b, atol=1e-6):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(x, y, atol=atol), (name, (x - y).abs().max().item())


# ---- construction ---------------------------------------------------------------------------------------
def test_flat_trainer_classes_are_cached_and_named():
    assert flat_trainer_class(SFTTrainer) is FlatSFT and FlatSFT.__name__ == "FlatSFTTrainer"
    assert flat_trainer_class(FlatSFT) is FlatSFT
    assert hf_flat.FlatSFTTrainer is FlatSFT and hf_flat.FlatDPOConfig is FlatDPOConfig
    assert flat_trainer_class(__import__("transformers").Seq2SeqTrainer) is hf_flat.FlatSeq2SeqTrainer
    with pytest.raises(TypeError, match="Trainer subclass"):
        flat_trainer_class(dict)


def test_on_policy_trainers_are_refused_by_name():
    with pytest.raises(TypeError, match="GRPOTrainer generates completions inside its training step.*WeightAveraging"):
        flat_trainer_class(trl.GRPOTrainer)
    with pytest.raises(TypeError, match="RLOOTrainer"):
        class Mine(hf_flat.FlatTrainer, trl.RLOOTrainer):
            pass


@pytest.mark.parametrize("order", ["flat first", "dpo first", "made"])
def test_dpo_constructs_with_ref_model_positional_whichever_way_the_bases_go(tmp_path, order):
    if order == "flat first":
        class Trainer(hf_flat.FlatTrainer, DPOTrainer):
            pass
    elif order == "dpo first":
        class Trainer(DPOTrainer, hf_flat.FlatTrainer):
            pass
    else:
        Trainer = FlatDPO
    model = tiny_llama()
    # DPOTrainer(model, ref_model, args, ...): the flat class passes its arguments through in that order
    trainer = Trainer(model, copy.deepcopy(model), sgd(tmp_path, FlatDPOConfig, flat_method="sam", sam_rho=RHO),
                      train_dataset=preference_data(), processing_class=TOKENIZER)
    mro = [c.__name__ for c in type(trainer).__mro__]
    assert mro.index("FlatTrainerMixin") < mro.index("DPOTrainer")  # the flat methods wrap DPO's
    assert trainer.ref_model is not None and trainer.args.flat_method == "sam"


def test_a_config_without_flat_fields_is_converted_loudly(tmp_path, caplog):
    args = SFTConfig(str(tmp_path), report_to="none", use_cpu=True, max_steps=1, bf16=False)
    with caplog.at_level(logging.WARNING):
        trainer = FlatSFT(model=tiny_llama(), args=args, train_dataset=text_data(), processing_class=TOKENIZER)
    assert type(trainer.args) is FlatSFTConfig and trainer.args.flat_method == "none"
    assert trainer.args.max_steps == 1
    assert any("SFTConfig, which has no hf-flat fields" in r.getMessage() and "flat_arguments_class(SFTConfig)"
               in r.getMessage() for r in caplog.records)


# ---- two-pass methods on the base trainer's own loss -------------------------------------------------------
@pytest.mark.parametrize("data", ["text", "prompt-completion", "packing"])
def test_sft_sam_step_equals_a_hand_sam_step_on_sfts_own_loss(tmp_path, data):
    dataset = prompt_completion_data() if data == "prompt-completion" else text_data()
    extra = dict(packing=True, max_length=16) if data == "packing" else {}
    model0 = tiny_llama()
    trainer = FlatSFT(model=copy.deepcopy(model0), args=sgd(tmp_path, flat_method="sam", sam_rho=RHO, **extra),
                      train_dataset=dataset, processing_class=TOKENIZER)
    calls = spy_on_losses(trainer)
    trainer.train()
    batch, items = calls[0]
    if data == "prompt-completion":  # completion-only loss: the prompt's labels are masked
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    if data == "packing":
        assert batch["input_ids"].shape[0] < 4  # several texts per packed row
    assert len(calls) == 2 and torch.equal(calls[1][0]["input_ids"], batch["input_ids"])  # both passes, same batch

    reference = copy.deepcopy(model0)
    helper = SFTTrainer(model=reference, args=sgd(tmp_path / "h", SFTConfig, **extra), train_dataset=dataset,
                        processing_class=TOKENIZER)
    reference.train()
    hand_sam_step(helper, reference, batch, items)
    assert_same(trainer.model, reference)
    # and it moved: SAM's step differs from the plain gradient step
    plain = SFTTrainer(model=copy.deepcopy(model0), args=sgd(tmp_path / "p", SFTConfig, **extra),
                       train_dataset=dataset, processing_class=TOKENIZER)
    plain.train()
    assert not torch.allclose(plain.model.lm_head.weight, trainer.model.lm_head.weight, atol=1e-6)


STEP1 = ("num_tokens", "mean_token_accuracy", "entropy")


@pytest.fixture(scope="module")
def plain_sft_step1(tmp_path_factory):
    trainer = SFTTrainer(model=tiny_llama(), args=sgd(tmp_path_factory.mktemp("plain"), SFTConfig),
                         train_dataset=text_data(), processing_class=TOKENIZER)
    trainer.train()
    return {**trainer.state.log_history[0], "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


@pytest.mark.parametrize("method", ["sam", "asam", "gsam", "looksam", "esam", "avg_sam", "wasam", "sam_m", "step"])
def test_step1_metrics_of_two_pass_methods_equal_the_plain_sft_trainers(tmp_path, plain_sft_step1, method):
    settings = {"sam_m": dict(flat_method="sam", sam_m=2), "step": dict(flat_method="sam", sam_scope="step")}
    trainer = FlatSFT(model=tiny_llama(), args=sgd(tmp_path, **settings.get(method, dict(flat_method=method))),
                      train_dataset=text_data(), processing_class=TOKENIZER)
    trainer.train()
    logged = trainer.state.log_history[0]
    # average SAM's one pass runs at w + e: its token count is the plain one, its accuracy its own; with
    # sam_m each chunk's pass 1 is recorded as TRL records a micro-batch (its means are the chunks' means)
    names = ("num_tokens",) if method in ("avg_sam", "sam_m") else STEP1
    for name in names:
        assert logged[name] == pytest.approx(plain_sft_step1[name], rel=1e-6), name
    if method != "avg_sam":
        assert logged["loss"] == pytest.approx(plain_sft_step1["loss"], rel=1e-6)
    # and the method acted: its step is not the plain SFT step
    moved = max((p.detach() - plain_sft_step1["weights"][n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved > 1e-6


@pytest.fixture(scope="module")
def plain_dpo_step1(tmp_path_factory):
    model = tiny_llama()
    plain = DPOTrainer(copy.deepcopy(model), copy.deepcopy(model), sgd(tmp_path_factory.mktemp("dpo"), DPOConfig),
                       train_dataset=preference_data(), processing_class=TOKENIZER)
    plain.train()
    return plain.state.log_history[0]


@pytest.mark.parametrize("method", ["sam", "asam", "gsam", "looksam", "wasam"])
def test_step1_metrics_of_dpo_with_two_pass_methods_equal_the_plain_dpo_trainers(tmp_path, plain_dpo_step1, method):
    model = tiny_llama()
    flat = FlatDPO(copy.deepcopy(model), copy.deepcopy(model), sgd(tmp_path / "f", FlatDPOConfig, flat_method=method),
                   train_dataset=preference_data(), processing_class=TOKENIZER)
    flat.train()
    expected, logged = plain_dpo_step1, flat.state.log_history[0]
    rewards = [k for k in expected if k.startswith(("rewards/", "logps/"))]
    assert "rewards/margins" in rewards
    for name in [*rewards, "num_tokens", "loss"]:
        assert logged[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("order", ["made", "dpo first"])
def test_dpo_sam_step_equals_a_hand_sam_step_on_dpos_loss(tmp_path, order):
    if order == "made":
        Trainer = FlatDPO
    else:
        class Trainer(DPOTrainer, hf_flat.FlatTrainer):
            pass
    model0 = tiny_llama()
    trainer = Trainer(copy.deepcopy(model0), copy.deepcopy(model0), sgd(tmp_path, FlatDPOConfig, flat_method="sam", sam_rho=RHO),
                      train_dataset=preference_data(), processing_class=TOKENIZER)
    calls = spy_on_losses(trainer)
    trainer.train()
    batch, items = calls[0]
    reference = copy.deepcopy(model0)
    helper = DPOTrainer(reference, copy.deepcopy(model0), sgd(tmp_path / "h", DPOConfig), train_dataset=preference_data(),
                        processing_class=TOKENIZER)
    reference.train()
    hand_sam_step(helper, reference, batch, items)
    assert_same(trainer.model, reference)


def test_dpo_with_swa_trains_and_holds_the_average(tmp_path):
    model0 = tiny_llama()
    snapshots = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    args = sgd(tmp_path, FlatDPOConfig, flat_method="swa", max_steps=4, average_start=0.5, average_freq=1)
    trainer = FlatDPO(copy.deepcopy(model0), copy.deepcopy(model0), args, train_dataset=preference_data(),
                      processing_class=TOKENIZER, callbacks=[Record()])
    trainer.train()
    for name, p in trainer.model.named_parameters():  # the mean of the snapshots after steps 2, 3, 4
        assert torch.allclose(p, torch.stack([s[name] for s in snapshots[1:]]).mean(0), atol=1e-6), name


@pytest.mark.parametrize("setting", [dict(flat_method="mesa"), dict(flat_method="esam"), dict(flat_method="sam", sam_m=2)])
def test_what_cannot_run_on_dpo_batches_is_refused(tmp_path, setting):
    model = tiny_llama()
    trainer = FlatDPO(model, copy.deepcopy(model), sgd(tmp_path, FlatDPOConfig, **setting),
                      train_dataset=preference_data(), processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="not supported with DPOTrainer"):
        trainer.train()


def test_saf_on_a_language_model_is_refused_for_mesa(tmp_path):
    trainer = FlatSFT(model=tiny_llama(), args=sgd(tmp_path, flat_method="saf"), train_dataset=text_data(),
                      processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="one distribution per token.*flat_method='mesa'"):
        trainer.train()


# ---- MESA under SFT, for real --------------------------------------------------------------------------------
LORA = dict(r=2, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
            init_lora_weights=False)  # a non-zero adapter from the start, so that it moves the logits


def fresh_copy(trainer_model, lora):
    """A model without TRL's patched forward, holding `trainer_model`'s weights (state dict names)."""
    model = tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    model.load_state_dict({k: v.detach().clone() for k, v in trainer_model.state_dict().items()})
    return model


def with_weights(model, weights):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    return model


def hand_mesa_term(student, teacher, batch, lam, tau):
    """lambda tau^2 * mean over the positions the labels count (next token) of KL(teacher || student)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    with torch.no_grad():
        s = student.train()(**kwargs).logits[:, :-1].float()
        t = teacher.eval()(**kwargs).logits[:, :-1].float()
    mask = batch["labels"][:, 1:] != -100
    log_t, log_s = F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (lam * tau**2 * kl[mask].sum() / mask.sum()).item()


class RecordWeights(TrainerCallback):
    """The trainable weights before training and after each optimizer step, by name."""

    def __init__(self):
        self.weights = []

    def record(self, model):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record(model)


def mesa_run(tmp_path, lora, lam=0.8, steps=3, **extra):
    recorder = RecordWeights()
    peft = {}
    if lora:
        from peft import LoraConfig

        peft = dict(peft_config=LoraConfig(**LORA))
    args = sgd(tmp_path, flat_method="mesa", mesa_start_epoch=0, mesa_decay=0.5, mesa_lambda=lam, mesa_tau=2.0,
               max_steps=steps, learning_rate=0.5, **extra)
    trainer = FlatSFT(model=tiny_llama(), args=args, train_dataset=prompt_completion_data(), processing_class=TOKENIZER,
                      callbacks=[recorder], **peft)
    calls = spy_on_losses(trainer)
    trainer.train()
    return trainer, recorder.weights, calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_mesa_term_teacher_and_mask_equal_a_hand_computation(tmp_path, lora):
    trainer, weights, calls = mesa_run(tmp_path, lora)
    decay, lam, tau = 0.5, 0.8, 2.0
    teacher = dict(weights[0])  # the hand EMA: v_0 = w_0, v_t = decay v_{t-1} + (1 - decay) w_t
    logged = [h["trajectory_loss"] for h in trainer.state.log_history if "trajectory_loss" in h]
    assert len(logged) == 3
    for step, batch in enumerate(b for b, _ in calls):
        assert (batch["labels"] == -100).any()  # completion-only: the prompt's positions do not count
        student = with_weights(fresh_copy(trainer.model, lora), weights[step])
        hand = hand_mesa_term(student, with_weights(fresh_copy(trainer.model, lora), teacher), batch, lam, tau)
        assert logged[step] == pytest.approx(hand, rel=1e-4, abs=1e-9), step
        teacher = {n: decay * v + (1 - decay) * weights[step + 1][n] for n, v in teacher.items()}
    assert logged[0] == pytest.approx(0.0, abs=1e-9) and logged[2] > 1e-6  # the teacher moved away: the term acts
    kept = trainer.trajectory.teacher
    if lora:  # an EMA of the adapter only, on top of the shared frozen base
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert set(kept.params) == trainable and all("lora_" in n for n in trainable)
        assert kept.nbytes < 0.2 * sum(p.nbytes for p in trainer.model.parameters())
        for name, value in teacher.items():
            assert torch.allclose(kept.params[name], value, atol=1e-6), name
    else:
        for name, p in kept.named_parameters():
            assert torch.allclose(p, teacher[name], atol=1e-6), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_mesa_gradient_reaches_the_weights(tmp_path, lora):
    with_term, _, _ = mesa_run(tmp_path / "a", lora, lam=5.0)
    without, _, _ = mesa_run(tmp_path / "b", lora, lam=0.0)
    moved = max((p - q).abs().max().item() for (n, p), (_, q) in
                zip(with_term.model.named_parameters(), without.model.named_parameters()) if p.requires_grad)
    assert moved > 1e-5


def test_a_compute_loss_override_that_bypasses_mesa_is_refused(tmp_path):
    class Mine(FlatSFT):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**{k: v for k, v in inputs.items() if k != "num_items_in_batch"}).loss

    trainer = Mine(model=tiny_llama(), args=sgd(tmp_path, flat_method="mesa", mesa_start_epoch=3, num_train_epochs=5),
                   train_dataset=text_data(), processing_class=TOKENIZER)
    with pytest.raises(RuntimeError, match=r"Mine.compute_loss .*without calling super\(\).compute_loss"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused at the first micro-batch, long before the term's first epoch


def test_a_compute_loss_override_that_calls_super_keeps_mesa(tmp_path):
    class Mine(FlatSFT):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Mine(model=tiny_llama(), args=sgd(tmp_path, flat_method="mesa", mesa_start_epoch=0, mesa_decay=0.5,
                                                max_steps=2, learning_rate=0.5),
                   train_dataset=text_data(), processing_class=TOKENIZER)
    trainer.train()
    assert trainer.state.log_history[1]["trajectory_loss"] > 0


# ---- two processes -------------------------------------------------------------------------------------------
def test_two_process_sft_wasam_equals_the_single_process_hand_reference(tmp_path):
    """2 CPU processes (gloo): each perturbs with its own micro-batch's SFT gradient, the pass-2
    gradients are averaged by DDP, and the SWA average of the SAM iterates is the final model."""
    import os
    import subprocess
    import sys

    import ddp_sft_train as run

    script = os.path.join(os.path.dirname(__file__), "ddp_sft_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["calls"][0][0]["input_ids"], ranks[1]["calls"][0][0]["input_ids"])
    scale = 2 if ranks[0]["average_tokens_across_devices"] else 1  # the Trainer's loss x processes, DDP's mean

    model = tiny_llama()
    model.load_state_dict(ranks[0]["initial"])
    helper = SFTTrainer(model=model, args=run.settings(str(tmp_path / "h"), SFTConfig), train_dataset=text_data(),
                        processing_class=TOKENIZER)
    model.train()
    params = list(model.parameters())
    iterates = []
    for step in range(run.STEPS):
        total = [torch.zeros_like(p) for p in params]
        for r in ranks:
            batch, items = r["calls"][2 * step]  # pass 1 of this step (pass 2 runs on the same batch)
            loss = lambda: scale * helper.compute_loss(model, dict(batch), num_items_in_batch=items)  # noqa: E731
            g = torch.autograd.grad(loss(), params)
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).float()
            e = [run.RHO * x / (norm + 1e-12) for x in g]
            with torch.no_grad():
                torch._foreach_add_(params, e)
            g2 = torch.autograd.grad(loss(), params)
            with torch.no_grad():
                torch._foreach_sub_(params, e)
            total = [t + x / 2 for t, x in zip(total, g2)]
        with torch.no_grad():
            torch._foreach_sub_(params, [run.LR * t for t in total])
        iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for r in ranks:
        for step, after in enumerate(r["after"]):
            for name, value in iterates[step].items():
                assert torch.allclose(after[name], value, atol=1e-6), (step, name)
    average = {n: (iterates[1][n] + iterates[2][n]) / 2 for n in iterates[0]}  # average_start 0.5 of 3 steps: 2, 3
    for r in ranks:
        for name, value in average.items():
            assert torch.allclose(r["final"][name], value, atol=1e-6), name


def test_mesa_teacher_memory_benchmark_runs_and_lora_keeps_the_adapter_only():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import mesa_teacher_memory

    full, lora = mesa_teacher_memory.main(["--tiny"])["rows"]
    assert full["teacher_kind"] != "SwapTeacher" and full["teacher_share_of_model"] == pytest.approx(1.0, rel=0.05)
    assert lora["teacher_kind"] == "SwapTeacher"
    assert lora["teacher_mb"] * 2**20 == pytest.approx(4 * lora["trainable_parameters"], rel=0.05)  # float32 adapter
