"""Model soups (Wortsman et al., "Model soups", ICML 2022, arXiv 2203.05482): the uniform soup
against a mean by hand, the greedy recipe on models whose scores the test designs, BatchNorm
statistics against a pass by hand, refusals, and `hf-flat soup` end to end on tiny saved models."""

import copy
import csv
import json

import pytest
import torch
from torch import nn
from transformers import (AutoModelForSequenceClassification, ResNetConfig, ResNetForImageClassification,
                          ViTConfig, ViTForImageClassification)

from hf_flat.analysis import SoupMismatchError, evaluate, greedy_soup, load_soup, uniform_soup
from hf_flat.averaging import recompute_batchnorm
from hf_flat.cli import main, run
from hf_flat.data import UsageError, batches, load_splits
from helpers import TinyData, TinyNet, save_tiny_roberta


class WithBuffers(nn.Module):
    """A linear layer with a float32 and a float16 buffer (averaged) and an integer buffer (copied)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, 2)
        self.register_buffer("scale", torch.randn(2))
        self.register_buffer("low", torch.randn(4).half())
        self.register_buffer("steps", torch.tensor([seed + 10, 7 * seed]))

    def forward(self, x, labels=None):
        return {"loss": self.fc(x).sum(), "logits": self.fc(x) * self.scale}


def test_uniform_soup_is_the_mean_by_hand():
    models = [WithBuffers(seed) for seed in (0, 1, 2)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    soup = uniform_soup(models)
    for key in ("fc.weight", "fc.bias", "scale"):
        by_hand = (models[0].state_dict()[key] + models[1].state_dict()[key] + models[2].state_dict()[key]) / 3
        torch.testing.assert_close(soup[key], by_hand, rtol=0, atol=1e-7)
    halves = torch.stack([m.low.float() for m in models]).mean(0)
    assert soup["low"].dtype == torch.float16 and torch.equal(soup["low"], halves.half())
    assert torch.equal(soup["steps"], torch.tensor([10, 0]))  # integers: the first model's
    for model, state in zip(models, before):  # the models are left as they were
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value)
    # state dicts with a module to load the soup into give the same soup, which the module then holds
    target = WithBuffers(5)
    from_states = uniform_soup([m.state_dict() for m in models], model=target)
    for key in soup:
        assert torch.equal(from_states[key], soup[key]) and torch.equal(target.state_dict()[key], soup[key])


class OneHot(nn.Module):
    """Candidate i of n holds w = n * e_i, so the mean of a set S of candidates is n / |S| on S and 0
    elsewhere: the weights say which candidates are in a soup."""

    names = "abcde"

    def __init__(self, i=None, n=5):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        if i is not None:
            with torch.no_grad():
                self.w[i] = n

    def members(self):
        return frozenset(self.names[i] for i in torch.nonzero(self.w.detach() > 0).flatten().tolist())


def designed(scores, calls):
    """An evaluate function returning `scores[set of candidates in the soup]`, recording each set."""

    def evaluate_fn(model):
        calls.append(model.members())
        return scores[model.members()]

    return evaluate_fn


def test_greedy_soup_order_and_choices():
    """Scores a .5, b .9, c .7, d .8, e .6: order b, d, c, e, a. {b,d} .92 kept (better); {b,d,c} .91
    dropped (worse); {b,d,e} .92 kept (a tie); {b,d,e,a} .95 kept."""
    scores = {frozenset(k): v for k, v in {"a": .5, "b": .9, "c": .7, "d": .8, "e": .6, "bd": .92, "bdc": .91,
                                           "bde": .92, "bdea": .95}.items()}
    calls = []
    models = [OneHot(i) for i in range(5)]
    soup, record = greedy_soup(models, designed(scores, calls), names=list("abcde"))
    assert record["order"] == list("bdcea")
    assert [c["score"] for c in record["candidates"]] == [.5, .9, .7, .8, .6]
    steps = record["steps"]
    assert [s["candidate"] for s in steps] == list("bdcea")
    assert [s["kept"] for s in steps] == [True, True, False, True, True]
    assert [s["soup_score"] for s in steps] == [.9, .92, .91, .92, .95]
    assert [s["score_before"] for s in steps] == [None, .9, .92, .92, .92]
    assert steps[2]["decision"].startswith("dropped") and "tie" in steps[3]["decision"]
    assert [s["ingredients"] for s in steps][-1] == list("bdea") and record["ingredients"] == list("bdea")
    assert record["score"] == .95 and record["higher_is_better"] is True
    # each candidate alone, then each trial: the kept ones plus the candidate (never a dropped one)
    assert calls == [frozenset(x) for x in ["a", "b", "c", "d", "e", "bd", "bdc", "bde", "bdea"]]
    torch.testing.assert_close(soup["w"], torch.tensor([1.25, 1.25, 0.0, 1.25, 1.25]), rtol=0, atol=0)
    assert models[1].w[1] == 5 and models[1].w.sum() == 5  # the candidates are untouched


def test_greedy_soup_with_a_loss_lower_is_better():
    """Losses a .5, b .1, c .3 (as mappings, compared by key): order b, c, a; {b,c} .12 is worse than
    .1, dropped; {b,a} .1 ties, kept."""
    losses = {frozenset(k): v for k, v in {"a": .5, "b": .1, "c": .3, "bc": .12, "ba": .1}.items()}
    calls = []

    def evaluate_fn(model):
        return {"loss": designed(losses, calls)(model), "accuracy": 0.0}

    soup, record = greedy_soup([OneHot(i, 3) for i in range(3)], evaluate_fn, higher_is_better=False, key="loss",
                               names=list("abc"))
    assert record["order"] == list("bca") and record["higher_is_better"] is False
    assert [s["kept"] for s in record["steps"]] == [True, False, True]
    assert record["ingredients"] == ["b", "a"] and record["score"] == .1
    assert record["steps"][1]["soup_result"] == {"loss": .12, "accuracy": 0.0}
    torch.testing.assert_close(soup["w"], torch.tensor([1.5, 1.5, 0.0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="key="):
        greedy_soup([OneHot(i, 3) for i in range(3)], evaluate_fn)
    models = [OneHot(i, 3) for i in range(3)]
    with pytest.raises(ValueError, match="`model` is one of `models`"):
        greedy_soup(models, evaluate_fn, key="loss", model=models[1])


def batchnorm_models():
    """Three TinyNets with BatchNorm whose running statistics were moved by different data."""
    models = []
    for seed in (0, 1, 2):
        model = TinyNet(batchnorm=True, seed=seed).train()
        with torch.no_grad():
            model(TinyData(16, seed=10 + seed).x * (seed + 1))
        models.append(model.eval())
    return models


def statistics_by_hand(weight, bias, data):
    """BatchNorm's running mean and (unbiased) variance after a pass with momentum None over two
    batches of 8: the mean over batches of each batch's statistics of fc1's outputs."""
    outputs = [data.x[i:i + 8] @ weight.T + bias for i in (0, 8)]
    return sum(h.mean(0) for h in outputs) / 2, sum(h.var(0, unbiased=True) for h in outputs) / 2


def test_batchnorm_statistics_are_recomputed():
    models, data = batchnorm_models(), TinyData(16, seed=3)

    def loader():
        return [{"x": data.x[i:i + 8], "labels": data.y[i:i + 8]} for i in (0, 8)]

    soup = uniform_soup(models, batchnorm_batches=loader)
    weight = sum(m.fc1.weight.detach() for m in models) / 3
    bias = sum(m.fc1.bias.detach() for m in models) / 3
    torch.testing.assert_close(soup["fc1.weight"], weight, rtol=0, atol=1e-7)
    mean, var = statistics_by_hand(weight, bias, data)
    torch.testing.assert_close(soup["bn.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soup["bn.running_var"], var, rtol=1e-5, atol=1e-6)
    assert soup["bn.num_batches_tracked"] == 2
    averaged = sum(m.bn.running_mean for m in models) / 3
    assert not torch.allclose(soup["bn.running_mean"], averaged, atol=1e-3)  # not the models' mean
    with pytest.raises(ValueError, match=r"BatchNorm layers \(e.g. bn\).*batchnorm_batches"):
        uniform_soup(models)
    with pytest.raises(ValueError, match=r"BatchNorm layers \(e.g. bn\).*batchnorm_batches"):
        load_soup(copy.deepcopy(models[0]), soup)
    target = load_soup(TinyNet(batchnorm=True, seed=7), soup, loader)
    torch.testing.assert_close(target.bn.running_var, var, rtol=1e-5, atol=1e-6)

    # greedy: each candidate keeps its own statistics; every soup, a trial or not, gets its own pass
    seen = []

    def evaluate_fn(model):
        seen.append((model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone(),
                     model.bn.running_mean.clone(), model.bn.running_var.clone()))
        return evaluate(model, loader)["loss"]

    soup, record = greedy_soup(models, evaluate_fn, higher_is_better=False, batchnorm_batches=loader)
    assert len(seen) == 3 + 1 + 2  # candidates, the soup of the best one, two trials
    for model, (_, _, mean, var) in zip(models, seen[:3]):
        assert torch.equal(mean, model.bn.running_mean) and torch.equal(var, model.bn.running_var)
    for weight, bias, mean, var in seen[3:]:
        by_hand = statistics_by_hand(weight, bias, data)
        torch.testing.assert_close(mean, by_hand[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, by_hand[1], rtol=1e-5, atol=1e-6)
    best = models[[c["name"] for c in record["candidates"]].index(record["order"][0])]  # the soup of one
    assert torch.equal(seen[3][0], best.fc1.weight) and "BatchNorm" in record["steps"][0]["note"]
    final = statistics_by_hand(soup["fc1.weight"], soup["fc1.bias"], data)
    torch.testing.assert_close(soup["bn.running_mean"], final[0], rtol=1e-5, atol=1e-6)


def test_mismatched_models_are_refused_by_name():
    small, wide = TinyNet(seed=0), TinyNet(seed=1)
    wide.fc2 = nn.Linear(6, 5)
    with pytest.raises(SoupMismatchError, match=r"entry 'fc2.weight' has shape \(3, 6\) in small and \(5, 6\) in wide"):
        uniform_soup([small, TinyNet(seed=2), wide], names=["small", "other", "wide"])
    with pytest.raises(SoupMismatchError, match=r"plain has no entry 'bn.weight', which batchnorm has"):
        greedy_soup([TinyNet(batchnorm=True), TinyNet()], lambda m: 0.0, names=["batchnorm", "plain"])
    with pytest.raises(SoupMismatchError, match=r"with_bn has an entry 'bn.weight' that plain lacks"):
        uniform_soup([TinyNet(), TinyNet(batchnorm=True)], names=["plain", "with_bn"])


# ---- `hf-flat soup` end to end -----------------------------------------------------------------

def tiny_vit(path, seed, num_labels=10, scale=1.0):
    """A 1-layer ViT for digits (8x8, one channel), saved in `path`; `scale` multiplies the classifier."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                                num_labels=num_labels))
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    model.save_pretrained(path)
    return str(path)


def hand_mean(paths, cls=ViTForImageClassification):
    states = [cls.from_pretrained(p).state_dict() for p in paths]
    return {k: (sum(s[k] for s in states) / len(states)) if v.is_floating_point() else v for k, v in states[0].items()}


DIGITS = ["--data", "digits", "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "32"]


def digits_score(model):
    test = load_splits("digits")["eval"]
    result = evaluate(model.eval(), batches(test, 32, limit=64))
    return {"loss": result["loss"], "accuracy": result["metric"]}


def test_cli_uniform_soup_without_and_with_data(tmp_path):
    from transformers import ViTImageProcessor

    paths = [tiny_vit(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))]
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(paths[0])
    out = run(["soup", *paths, "--output_dir", str(tmp_path / "soup")])
    assert out["saved_processors"] == ["preprocessor_config.json"]
    assert ViTImageProcessor.from_pretrained(tmp_path / "soup").size == {"height": 8, "width": 8}
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "soup")
    for key, value in hand_mean(paths).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-6)
    saved = json.loads((tmp_path / "soup" / "results.json").read_text())
    assert saved["recipe"] == "uniform" and saved["ingredients"] == paths and "soup" not in saved
    assert out["ingredients"] == paths

    run(["soup", *paths, "--output_dir", str(tmp_path / "scored"), *DIGITS])
    saved = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert [c["model"] for c in saved["candidates"]] == paths
    for candidate, path in zip(saved["candidates"], paths):
        by_hand = digits_score(ViTForImageClassification.from_pretrained(path))
        assert candidate["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)
        assert candidate["accuracy"] == pytest.approx(by_hand["accuracy"])
    soup_model = ViTForImageClassification.from_pretrained(tmp_path / "scored")
    assert saved["soup"]["loss"] == pytest.approx(digits_score(soup_model)["loss"], rel=1e-5)
    assert saved["ingredients"] == paths and saved["soup"]["accuracy"] == pytest.approx(digits_score(soup_model)["accuracy"])


def test_cli_soup_of_averaged_weights(tmp_path):
    """--weights live averaged: the second model enters the soup with the average its checkpoint keeps."""
    from hf_flat.state_file import save_flat_state
    from hf_flat.trainer import FLAT_STATE_NAME

    a, b = tiny_vit(tmp_path / "a", 0), tiny_vit(tmp_path / "checkpoint-4", 1)
    model_b = ViTForImageClassification.from_pretrained(b)
    average = {f"averaging.{n}": p.detach() + 1.0 for n, p in model_b.named_parameters()}
    save_flat_state(str(tmp_path / "checkpoint-4" / FLAT_STATE_NAME),
                    [(average, {"averaging": "swa", "averaging_count": "3"})], "swa")
    out = run(["soup", a, b, "--weights", "live", "averaged", "--output_dir", str(tmp_path / "soup")])
    assert out["weights"][b].startswith("averaged (swa, 3")
    live_a = ViTForImageClassification.from_pretrained(a).state_dict()
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "soup").state_dict()
    for name, p in model_b.named_parameters():
        torch.testing.assert_close(loaded[name], (live_a[name] + p.detach() + 1.0) / 2, rtol=0, atol=1e-6)


def test_cli_greedy_soup(tmp_path):
    """a and its copy a2 tie (their soup is a itself: kept); `bad` has a classifier 200 times too
    large, which makes any soup with it far worse (dropped); b goes wherever the numbers say, which
    the test recomputes by hand."""
    a = tiny_vit(tmp_path / "a", 0)
    a2 = tiny_vit(tmp_path / "a2", 0)
    b = tiny_vit(tmp_path / "b", 1)
    bad = tiny_vit(tmp_path / "bad", 2, scale=200.0)
    paths = [bad, b, a, a2]
    code = main(["soup", *paths, "--greedy", "--metric", "loss", "--output_dir", str(tmp_path / "soup"), *DIGITS])
    assert code == 0
    saved = json.loads((tmp_path / "soup" / "results.json").read_text())
    alone = {p: digits_score(ViTForImageClassification.from_pretrained(p))["loss"] for p in paths}
    assert [c["loss"] for c in saved["candidates"]] == pytest.approx([alone[p] for p in paths], rel=1e-5)
    order = saved["greedy"]["order"]
    assert order == sorted(paths, key=lambda p: (alone[p], paths.index(p)))  # lowest loss first
    assert order[-1] == bad and order.index(a) + 1 == order.index(a2)  # the tie keeps the given order
    steps = {s["candidate"]: s for s in saved["greedy"]["steps"]}
    assert steps[a2]["kept"] and not steps[bad]["kept"]
    kept = [order[0]]
    for step in saved["greedy"]["steps"][1:]:  # every trial: the kept models plus the candidate, by hand
        model = ViTForImageClassification.from_pretrained(a)
        model.load_state_dict(hand_mean(kept + [step["candidate"]]))
        loss = digits_score(model)["loss"]
        assert step["soup_score"] == pytest.approx(loss, rel=1e-5)
        assert step["soup"]["loss"] == step["soup_score"]
        if loss <= step["score_before"]:
            kept.append(step["candidate"])
        assert step["kept"] == (step["candidate"] in kept)
    assert saved["ingredients"] == kept and bad not in kept
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "soup")
    for key, value in hand_mean(kept).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-6)
    assert saved["soup"]["loss"] == pytest.approx(digits_score(loaded)["loss"], rel=1e-5)
    assert saved["metric"] == "loss" and saved["higher_is_better"] is False
    assert "uniform_soup" in saved and any("optimistic" in note for note in saved["notes"])


def test_cli_soup_of_text_models_keeps_the_tokenizer(tmp_path):
    paths = []
    for i, name in enumerate("abc"):
        path = save_tiny_roberta(tmp_path / name)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(path)
        paths.append(path)
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for i in range(8):
            writer.writerow([["very good film", "not good", "bad plot", "a good film"][i % 4], [1, 0, 0, 1][i % 4]])
    out = run(["soup", *paths, "--greedy", "--data", str(data), "--output_dir", str(tmp_path / "soup"),
               "--batch_size", "4"])
    assert out["saved_processors"] == ["tokenizer"] and len(out["greedy"]["steps"]) == 3
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup")
    for key, value in hand_mean(out["ingredients"], AutoModelForSequenceClassification).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-6)
    # the soup folder is a model folder like the others: the other commands take it with its tokenizer
    again = run(["interpolate", paths[0], str(tmp_path / "soup"), "--points", "2", "--alpha_min", "0", "--alpha_max", "1",
                 "--data", str(data),
                 "--output_dir", str(tmp_path / "i"), "--batch_size", "4"])
    at_soup = next(row for row in again["interpolation"] if row["alpha"] == 1.0)
    assert at_soup["test"]["loss"] == pytest.approx(out["soup"]["loss"], rel=1e-5)


def tiny_resnet(path, seed):
    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4], depths=[1],
                                                      layer_type="basic", num_labels=10))
    model.train()
    with torch.no_grad():  # statistics of its own, unlike the soup's
        model(pixel_values=torch.randn(16, 1, 8, 8) * (seed + 2))
    model.save_pretrained(path)
    return str(path)


def test_cli_soup_recomputes_batchnorm(tmp_path):
    paths = [tiny_resnet(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 1))]
    with pytest.raises(UsageError, match=r"BatchNorm layers.*pass --data"):
        run(["soup", *paths, "--output_dir", str(tmp_path / "no_data")])
    out = run(["soup", *paths, "--output_dir", str(tmp_path / "soup"), *DIGITS])
    loaded = ResNetForImageClassification.from_pretrained(tmp_path / "soup")
    mean = hand_mean(paths, ResNetForImageClassification)
    reference = ResNetForImageClassification.from_pretrained(paths[0])
    reference.load_state_dict(mean)
    train = load_splits("digits")["train"]
    recompute_batchnorm(reference, batches(train, 32, limit=64))
    key = "resnet.embedder.embedder.normalization.running_mean"
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loaded.state_dict()[key], mean[key], atol=1e-3)  # not the models' mean
    assert out["soup"]["loss"] == pytest.approx(digits_score(loaded)["loss"], rel=1e-5)


def test_cli_refusals(tmp_path, capsys):
    a, b = tiny_vit(tmp_path / "a", 0), tiny_vit(tmp_path / "b", 1)
    wide = tiny_vit(tmp_path / "wide", 2, num_labels=5)
    with pytest.raises(UsageError, match=r"entry 'classifier.weight' has shape \(10, 16\) in .*a and \(5, 16\) in .*wide"):
        run(["soup", a, b, wide, "--output_dir", str(tmp_path / "o")])
    assert main(["soup", a, wide, "--output_dir", str(tmp_path / "o")]) == 2
    assert "classifier.weight" in capsys.readouterr().err
    for argv, message in (
        ([a, b, "--greedy"], "--greedy ranks the models"),
        ([a, b, "--metric", "loss", *DIGITS], "--metric loss ranks the models for --greedy"),
        ([a], "a soup averages two or more models"),
        ([a, b, "--weights", "live", "live", "live"], "give one value for all models, or one per model"),
    ):
        with pytest.raises(UsageError, match=message):
            run(["soup", *argv, "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="is one of the models"):
        run(["soup", a, b, "--output_dir", a])
    with pytest.raises(SystemExit):
        run(["soup", a, b, "--metric", "f1", "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert "invalid choice: 'f1'" in error and "accuracy" in error and "loss" in error
