"""Mode connectivity (`hf_flat.analysis.connect`, `hf-flat connect`), the 3-D plane plots and the
comparison report (`hf-flat report`): curve formulas and ends, a curve that goes around a barrier,
no barrier in one quadratic basin, and the report's numbers against the individual commands'."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainingArguments

from hf_flat.analysis import evaluate
from hf_flat.analysis.connect import CurveModel, barrier, curve_coefficients, curve_point, evaluate_curve, fit_curve
from hf_flat.cli import run
from hf_flat.data import batches, load_splits
from test_cli import tiny_vit


class Surface(nn.Module):
    """A two-weight model whose loss is a function of its weights alone (the inputs are ignored)."""

    def __init__(self, w, loss):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32))
        self.loss = loss

    def forward(self, x=None, labels=None):
        return {"loss": self.loss(self.w) + 0.0 * x.sum()}


def ring(w):  # minima on the unit circle; the origin is a hill of height 1
    return ((w * w).sum() - 1.0) ** 2


def bowl(w):  # one quadratic basin around (0.3, -0.2)
    return 2.0 * (w[0] - 0.3) ** 2 + 0.5 * (w[1] + 0.2) ** 2


DATA = [{"x": torch.zeros(1), "labels": torch.tensor(0)} for _ in range(64)]


def fit(tmp_path, loss, a, b, kind, epochs=30, lr=0.05):
    model_a, model_b = Surface(a, loss), Surface(b, loss)
    args = TrainingArguments(str(tmp_path / "curve"), num_train_epochs=epochs, learning_rate=lr, weight_decay=0.0,
                             per_device_train_batch_size=8, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    curve, _ = fit_curve(model_a, model_b, DATA, args, kind)
    return model_a, model_b, curve


def along(loss, points):
    return [loss(torch.stack(p) if isinstance(p, list) else p).item() for p in points]


def rows_of(values, ts):
    return [{"t": t, "train": {"loss": v}} for t, v in zip(ts, values)]


def test_curve_formulas_by_hand():
    assert curve_coefficients(0.25, "polychain") == (0.5, 0.5, 0.0)
    assert curve_coefficients(0.75, "polychain") == (0.0, 0.5, 0.5)
    assert curve_coefficients(0.5, "polychain") == (0.0, 1.0, 0.0)  # the bend itself
    assert curve_coefficients(0.25, "bezier") == (0.5625, 0.375, 0.0625)
    a, m, b = [torch.tensor([1.0, 2.0])], [torch.tensor([5.0, -1.0])], [torch.tensor([-3.0, 0.0])]
    assert torch.allclose(curve_point(a, m, b, 0.25)[0], 0.5 * a[0] + 0.5 * m[0])
    assert torch.allclose(curve_point(a, m, b, 0.8, "bezier")[0], 0.04 * a[0] + 0.32 * m[0] + 0.64 * b[0])
    for bad in ((0.5, "spline"), (1.5, "bezier")):
        with pytest.raises(ValueError):
            curve_coefficients(*bad)
    # the barrier: the largest rise above the ends' interpolation; 0 below it; accuracy: the largest drop
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier(rows_of([1.0, 2.0, 4.0, 2.5, 3.0], ts), "train") == {"height": 2.0, "at": 0.5}
    assert barrier(rows_of([1.0, 1.0, 1.5, 2.0, 3.0], ts), "train") == {"height": 0.0, "at": None}
    accuracy = [{"t": t, "test": {"metric": v}} for t, v in zip(ts, [0.9, 0.8, 0.5, 0.85, 0.9])]
    assert barrier(accuracy, "test", "metric")["height"] == pytest.approx(0.4)


@pytest.mark.parametrize("kind", ["polychain", "bezier"])
def test_the_bend_goes_around_a_barrier(tmp_path, kind):
    a, b = [1.0, 0.0], [-0.8, 0.6]  # two minima on the ring; the straight line cuts through the hill
    model_a, model_b, curve = fit(tmp_path, ring, a, b, kind)
    ts = [i / 40 for i in range(41)]
    line = [ring((1 - t) * model_a.w.detach() + t * model_b.w.detach()).item() for t in ts]
    on_curve = [ring(curve.point(t)[0]).item() for t in ts]
    assert max(line) > 0.5  # a barrier on the straight line
    middle = (torch.tensor(a) + torch.tensor(b)) / 2
    assert (curve.bend[0].detach() - middle).norm() > 0.2  # the bend moved from the line's midpoint
    assert sum(on_curve) / len(ts) < 0.3 * sum(line) / len(ts)  # and the loss along the curve fell
    assert barrier(rows_of(on_curve, ts), "train")["height"] < 0.5 * barrier(rows_of(line, ts), "train")["height"]
    # the ends are the two models exactly, and the models are unchanged
    assert torch.equal(curve.point(0.0)[0], model_a.w.detach()) and torch.equal(curve.point(1.0)[0], model_b.w.detach())
    assert model_a.w.tolist() == a and model_a.w.requires_grad
    # evaluate_curve runs the model at phi(t) and gives it back as it was
    rows = evaluate_curve(curve, {"train": lambda: [{"x": torch.zeros(4, 1), "labels": torch.zeros(4)}]}, [0.0, 0.5, 1.0])
    assert rows[0]["train"]["loss"] == pytest.approx(ring(model_a.w).item(), abs=1e-12)
    assert rows[1]["train"]["loss"] == pytest.approx(ring(curve.bend[0]).item() if kind == "polychain"
                                                     else ring(curve.point(0.5)[0]).item(), rel=1e-6)
    assert model_a.w.tolist() == a


def test_one_quadratic_basin_has_no_barrier(tmp_path):
    a, b = [1.0, 1.0], [-0.4, 1.2]  # the line passes far above the bottom (0.3, -0.2)
    model_a, model_b, curve = fit(tmp_path, bowl, a, b, "polychain", epochs=10)
    ts = [i / 40 for i in range(41)]
    line = [bowl((1 - t) * model_a.w.detach() + t * model_b.w.detach()).item() for t in ts]
    on_curve = [bowl(curve.point(t)[0]).item() for t in ts]
    assert barrier(rows_of(line, ts), "train")["height"] == 0.0
    assert barrier(rows_of(on_curve, ts), "train")["height"] == 0.0
    assert sum(on_curve) < sum(line)  # the bend moved towards the basin's bottom


def test_curve_model_draws_t_in_training_only():
    model = Surface([1.0, 0.0], ring)
    curve = CurveModel(model, [model.w.detach()], [torch.tensor([0.0, 1.0])], "bezier", seed=3)
    batch = {"x": torch.zeros(2, 1), "labels": torch.zeros(2)}
    curve.train()
    curve(**batch)
    first = curve.last_t
    curve(**batch)
    assert 0 < first < 1 and curve.last_t != first
    again = CurveModel(model, [model.w.detach()], [torch.tensor([0.0, 1.0])], "bezier", seed=3).train()
    again(**batch)
    assert again.last_t == first  # the seed fixes the draws
    curve.eval()
    curve.t = 0.25
    out = curve(**batch)
    assert curve.last_t == 0.25 and out["loss"].item() == pytest.approx(ring(curve.point(0.25)[0]).item())
    assert not model.w.requires_grad and [n for n, p in curve.named_parameters() if p.requires_grad] == ["bend.0"]


COMMON = ["--data", "digits", "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "32"]
SHARP = ["--m", "16", "--n", "2", "--n_average", "2", "--directions", "3", "--hessian_iterations", "3"]


def test_connect_and_report_commands_on_digits(tmp_path):
    model_a, model_b = tiny_vit(tmp_path / "a", 0), tiny_vit(tmp_path / "b", 1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run(["connect", a, b, "--curve", "bezier", "--epochs", "2", "--points", "5", "--train_batch_size", "16",
               "--output_dir", str(tmp_path / "c"), *COMMON])
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert saved["kind"] == "bezier" and [r["t"] for r in saved["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (tmp_path / "c" / "connect.png").stat().st_size > 1000
    test = load_splits("digits")["eval"]
    for model, row in ((model_a, saved["curve"][0]), (model_b, saved["curve"][-1])):  # the ends: the models
        assert row["test"]["loss"] == pytest.approx(evaluate(model.eval(), batches(test, 32, limit=64))["loss"], rel=1e-6)
    assert saved["curve"][0]["test"] == saved["line"][0]["test"] and saved["curve"][-1]["test"] == saved["line"][-1]["test"]
    bend = load_file(str(tmp_path / "c" / "bend.safetensors"))
    middle = {n: (p.detach() + dict(model_b.named_parameters())[n].detach()) / 2 for n, p in model_a.named_parameters()}
    assert set(bend) == set(middle) and any(not torch.allclose(bend[n], middle[n]) for n in bend)  # it trained
    assert {"curve/train/loss", "line/train/loss", "curve/test/metric", "line/test/metric"} <= set(out["barriers"])
    assert len([h for h in saved["history"] if "loss" in h]) == 2  # one logged loss per epoch

    # the report: every number equals the individual commands' (nothing computed differently)
    report = run(["report", a, b, "--curves", str(tmp_path / "c"), "--points", "5", "--output_dir",
                  str(tmp_path / "r"), *SHARP, *COMMON])
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| a | b |" in text and "top Hessian eigenvalue" in text
    for path, row in zip((a, b), report["models"]):
        alone = run(["sharpness", path, "--output_dir", str(tmp_path / ("s" + path[-1])), *SHARP, *COMMON])
        for key, field in (("adversarial", "sharpness"), ("average", "sharpness"), ("asymmetry", "omega"),
                           ("hessian", "eigenvalue")):
            assert row[key][field] == alone[key][field], (path, key)
    assert report["models"][0]["evaluation"]["test"] == saved["line"][0]["test"]
    line = run(["interpolate", a, b, "--points", "5", "--alpha_min", "0", "--alpha_max", "1",
                "--output_dir", str(tmp_path / "i"), *COMMON])["interpolation"]
    line = [{"t": r["alpha"], **{k: v for k, v in r.items() if k != "alpha"}} for r in line]
    (pair,) = report["pairs"]
    for key in ("train/loss", "test/loss", "test/metric"):
        name, quantity = key.split("/")
        assert pair["barriers"][f"line/{key}"]["height"] == pytest.approx(
            barrier(line, name, quantity)["height"], rel=1e-6, abs=1e-9)
        assert pair["barriers"][f"curve/{key}"] == saved["barriers"][f"curve/{key}"]
    assert pair["curve_from"] == str(tmp_path / "c")


def test_plane_plot3d_and_bad_input(tmp_path, capsys):
    tiny_vit(tmp_path / "a", 0)
    run(["plane", str(tmp_path / "a"), "--steps", "3", "--plot3d", "--output_dir", str(tmp_path / "p"), *COMMON])
    for name in ("plane_test_loss", "plane_test_metric", "plane_train_loss"):
        assert (tmp_path / "p" / f"{name}.png").exists() and (tmp_path / "p" / f"{name}_3d.png").stat().st_size > 1000
    from hf_flat.cli import main

    a = str(tmp_path / "a")
    assert main(["connect", a, a, "--points", "1", "--output_dir", str(tmp_path / "x"), *COMMON]) == 2
    assert "--points 1" in capsys.readouterr().err
    assert main(["report", a, "--curves", str(tmp_path / "p"), "--output_dir", str(tmp_path / "x"), *COMMON]) == 2
    assert "not written by `hf-flat connect`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, with the choices
        main(["connect", a, a, "--curve", "spline", "--output_dir", str(tmp_path / "x"), *COMMON])
    assert stop.value.code == 2 and "choose from 'polychain', 'bezier'" in capsys.readouterr().err
