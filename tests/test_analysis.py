"""Loss-surface tools on models whose answers are known in closed form."""

import copy

import pytest
import torch
from torch import nn

from hf_flat.analysis import (
    asymmetry_factor, evaluate, interpolate, plane, plane_directions, sharpness, top_hessian_eigenvalue,
)
from hf_flat.analysis.directions import dot
from helpers import TinyData, TinyNet


class Quadratic(nn.Module):
    """L(w) = 1/2 sum_i a_i (w_i - c_i)^2, for w_i > c_i; b_i instead of a_i below (asymmetric if a != b)."""

    def __init__(self, a, b=None, c=None, w=None):
        super().__init__()
        self.register_buffer("a", torch.tensor(a))
        self.register_buffer("b", torch.tensor(b if b is not None else a))
        self.register_buffer("c", torch.tensor(c if c is not None else [0.0] * len(a)))
        self.w = nn.Parameter(torch.tensor(w if w is not None else [0.0] * len(a)))

    def forward(self, x, labels=None):
        d = self.w - self.c
        curvature = torch.where(d > 0, self.a, self.b)
        return {"loss": 0.5 * (curvature * d * d).sum() + 0 * x.sum(), "logits": x}


def dummy_batches(n=1, m=4):
    return [{"x": torch.zeros(m, 1)} for _ in range(n)]


def test_top_hessian_eigenvalue_is_the_largest_curvature():
    model = Quadratic([1.0, 7.0, 3.0, 0.5], w=[0.3, -0.2, 0.1, 1.0])
    result = top_hessian_eigenvalue(model, lambda: dummy_batches(), iterations=200, tol=1e-10)
    assert result["eigenvalue"] == pytest.approx(7.0, rel=1e-5)


def test_adversarial_sharpness_matches_the_formula():
    a, w, rho = torch.tensor([1.0, 4.0, 2.0]), torch.tensor([0.5, -0.25, 1.0]), 0.1
    model = Quadratic(a.tolist(), w=w.tolist())
    g = a * w
    expected = rho * g.norm() + 0.5 * rho**2 * (g * a * g).sum() / g.norm() ** 2  # g.e + e'Ae/2
    result = sharpness(model, dummy_batches(n=4), rho, "adversarial")
    assert result["sharpness"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["perturbed_loss"] == pytest.approx((0.5 * (a * w * w).sum() + expected).item(), rel=1e-5)
    assert torch.equal(model.w.detach(), w)  # weights untouched


def test_average_sharpness_at_an_isotropic_minimum():
    """At the minimum of a * |w|^2 / 2, any e of norm rho raises the loss by a rho^2 / 2."""
    model = Quadratic([3.0] * 5)
    result = sharpness(model, dummy_batches(n=15), 0.5, "average")
    assert result["sharpness"] == pytest.approx(0.5 * 3.0 * 0.25, rel=1e-5)


@pytest.mark.parametrize("a, b, omega", [(2.0, 2.0, 1.0), (1.0, 4.0, 0.25), (9.0, 3.0, 1 / 3)])
def test_asymmetry_factor_matches_the_formula(a, b, omega):
    """Directions with U(0, 1) elements point into the positive orthant: l+ = a mu^2/2, l- = b mu^2/2."""
    model = Quadratic([a] * 6, b=[b] * 6)
    result = asymmetry_factor(model, lambda: dummy_batches(), mu=0.5, num_directions=10)
    assert result["omega"] == pytest.approx(omega, rel=1e-5)
    up, down = result["rises"][0]
    assert up == pytest.approx(a * 0.125, rel=1e-5) and down == pytest.approx(b * 0.125, rel=1e-5)


def batches_of(data, size=4):
    return lambda: [
        {"x": data.x[i : i + size], "labels": data.y[i : i + size]} for i in range(0, len(data), size)
    ]


def test_interpolation_ends_reproduce_each_models_loss():
    data = TinyData()
    a, b = TinyNet(seed=0), TinyNet(seed=1)
    rows = interpolate(copy.deepcopy(a), b, {"train": batches_of(data)}, [-1.0, 0.0, 0.5, 1.0, 1.5])
    assert [r["alpha"] for r in rows] == [-1.0, 0.0, 0.5, 1.0, 1.5]
    assert rows[1]["train"]["loss"] == pytest.approx(evaluate(a, batches_of(data))["loss"], rel=1e-6)
    assert rows[3]["train"]["loss"] == pytest.approx(evaluate(b, batches_of(data))["loss"], rel=1e-6)
    assert rows[3]["train"]["metric"] == pytest.approx(evaluate(b, batches_of(data))["metric"])
    middle = TinyNet()
    middle.load_state_dict({k: 0.5 * (a.state_dict()[k] + b.state_dict()[k]) for k in a.state_dict()})
    assert rows[2]["train"]["loss"] == pytest.approx(evaluate(middle, batches_of(data))["loss"], rel=1e-6)


def test_plane_directions_are_orthogonal_and_filter_normalised():
    model = TinyNet()
    params = [p.detach() for p in model.parameters()]
    delta, eta = plane_directions(params, torch.Generator().manual_seed(0))
    assert abs(dot(delta, eta)) < 1e-6 * (dot(delta, delta) * dot(eta, eta)) ** 0.5
    for d, e, w in zip(delta, eta, params):
        if w.dim() == 1:
            assert not d.any() and not e.any()  # biases are not moved
            continue
        for direction in (d, e):
            torch.testing.assert_close(direction.norm(dim=1), w.norm(dim=1))  # filter by filter


def test_plane_grid_center_is_the_model_and_batchnorm_is_recomputed():
    data = TinyData()
    model = TinyNet(batchnorm=True)
    before = copy.deepcopy(model.state_dict())
    result, _ = plane(model, {"train": batches_of(data)}, steps=3, span=(-1, 1), train_batches=batches_of(data))
    center = [g for g in result["grid"] if g["alpha"] == 0 and g["beta"] == 0][0]
    recomputed = copy.deepcopy(model)
    from hf_flat.averaging import recompute_batchnorm

    recompute_batchnorm(recomputed, batches_of(data))
    assert center["train"]["loss"] == pytest.approx(evaluate(recomputed, batches_of(data))["loss"], rel=1e-6)
    assert len(result["grid"]) == 9
    for k, v in model.state_dict().items():  # the model is left as it was
        assert torch.equal(v, before[k]), k


def test_asymmetry_recomputes_batchnorm_at_every_point():
    from hf_flat.analysis.directions import trainable
    from hf_flat.averaging import recompute_batchnorm

    data = TinyData()
    model = TinyNet(batchnorm=True)
    result = asymmetry_factor(model, batches_of(data), mu=0.3, num_directions=1, train_batches=batches_of(data))
    by_hand = copy.deepcopy(model)
    recompute_batchnorm(by_hand, batches_of(data))
    centre = evaluate(by_hand, batches_of(data))["loss"]
    u = torch.Generator().manual_seed(0)
    direction = [torch.rand(p.shape, generator=u) for _, p in trainable(model)]
    norm = sum((d * d).sum() for d in direction).sqrt()
    with torch.no_grad():
        for p, d in zip(by_hand.parameters(), direction):
            p.add_(0.3 * d / norm)
    recompute_batchnorm(by_hand, batches_of(data))
    assert result["rises"][0][0] == pytest.approx(evaluate(by_hand, batches_of(data))["loss"] - centre, rel=1e-5)


class TupleTinyNet(TinyNet):
    """TinyNet answering as `return_dict=False` models do: (loss, logits)."""

    def forward(self, x, labels=None):
        outputs = super().forward(x, labels)
        return (outputs["loss"], outputs["logits"]) if labels is not None else (outputs["logits"],)


def test_models_returning_tuples_give_the_same_answers():
    data = TinyData()
    batches = lambda: [{"x": data.x[i:i + 4], "labels": data.y[i:i + 4]} for i in range(0, 16, 4)]  # noqa: E731
    as_dict, as_tuple = TinyNet(), TupleTinyNet()
    assert evaluate(as_tuple, batches) == evaluate(as_dict, batches)
    assert sharpness(as_tuple, batches(), 0.1) == sharpness(as_dict, batches(), 0.1)
    rows = interpolate(as_tuple, TupleTinyNet(seed=3), {"train": batches}, [0.0, 1.0])
    assert rows[0]["train"] == evaluate(as_dict, batches)


def test_interpolation_refuses_models_whose_parameters_differ():
    a, b = TinyNet(), TinyNet()
    b.fc1.requires_grad_(False)
    with pytest.raises(ValueError, match="only in the first: \\['fc1.bias', 'fc1.weight'\\]"):
        interpolate(a, b, {}, [0.5])
