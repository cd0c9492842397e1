"""Mode connectivity: a curve of low loss between two solutions.

Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs", NeurIPS 2018, arXiv 1802.10026, section 3; used by Kaddour, Liu, Silva,
Kusner, "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv 2202.00661, section 4.2 and
Figure 2, to ask whether two minima share a basin.

The curve phi(t), t in [0, 1], runs from the trainable weights w_a of model A (t = 0) to those of
model B, w_b (t = 1), through the bend theta:

- polygonal chain with one bend:
  ``phi(t) = 2 (t theta + (1/2 - t) w_a)`` for t <= 1/2, ``2 ((t - 1/2) w_b + (1 - t) theta)`` after;
- quadratic Bezier curve: ``phi(t) = (1 - t)^2 w_a + 2 t (1 - t) theta + t^2 w_b``.

Only theta is trained, to minimise the loss averaged along the curve, ``E_{t ~ U(0,1)} L(phi(t))``:
each training forward draws one t (as the authors' code does, one per mini-batch) and runs the
model at phi(t). theta starts at the midpoint (w_a + w_b) / 2, where the curve is the straight line.
The curve is then evaluated at fixed t, with BatchNorm statistics recomputed at every point
(section 3, "Batch normalization"), beside the straight line ``(1 - t) w_a + t w_b``.

The barrier of a path is how far its loss rises above the straight interpolation of the ends'
losses: ``max_t [L(phi(t)) - ((1 - t) L(0) + t L(1))]`` (0 when the path never rises above it;
for a metric such as accuracy, the largest drop below the ends' interpolation).
"""

import torch
from torch import nn
from torch.func import functional_call

from .directions import trainable
from .surface import accuracy, evaluate, interpolate, weights_at

CURVES = ("polychain", "bezier")


def curve_coefficients(t: float, kind: str = "polychain") -> tuple[float, float, float]:
    """(c_a, c_bend, c_b) with phi(t) = c_a w_a + c_bend theta + c_b w_b."""
    if kind not in CURVES:
        raise ValueError(f"curve={kind!r} is not supported: use one of {', '.join(CURVES)}.")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t={t}: the curve is defined for t in [0, 1].")
    t = float(t)
    if kind == "bezier":
        return (1 - t) ** 2, 2 * t * (1 - t), t**2
    if t <= 0.5:
        return 1 - 2 * t, 2 * t, 0.0
    return 0.0, 2 - 2 * t, 2 * t - 1


def curve_point(a, bend, b, t, kind="polychain", exact_ends=True):
    """phi(t) as a list of tensors; at t = 0 and t = 1 exactly w_a and w_b (copies, with
    `exact_ends`; else the formula, which keeps the bend in the autograd graph)."""
    ca, cm, cb = curve_coefficients(t, kind)
    if cm == 0.0 and exact_ends:  # the ends themselves, bit for bit
        return [x.clone() if ca == 1.0 else y.clone() for x, y in zip(a, b)]
    return [ca * x + cm * m + cb * y for x, m, y in zip(a, bend, b)]


class CurveModel(nn.Module):
    """`model` at phi(t) of the curve from `a` to `b` (lists of tensors shaped like the model's
    trainable parameters) through the trainable bend. In training mode each forward draws
    t ~ U(0, 1) from its own generator (seeded with `seed`); with `t` set, it runs at that t.
    The wrapped model's own weights are not changed; they are frozen (requires_grad False) so that
    an optimizer over this module trains the bend alone (`fit_curve` unfreezes them afterwards)."""

    accepts_loss_kwargs = False  # the Trainer then passes only the batch to forward

    def __init__(self, model, a, b, kind="polychain", bend=None, seed=0):
        super().__init__()
        curve_coefficients(0.0, kind)  # the kind is checked here
        self.model, self.kind, self.t = model, kind, None
        self.names = [name for name, _ in trainable(model)]
        for p in model.parameters():
            p.requires_grad_(False)
        self.a = [x.detach().float().clone() for x in a]
        self.b = [y.detach().float().clone() for y in b]
        start = bend if bend is not None else [(x + y) / 2 for x, y in zip(self.a, self.b)]
        self.bend = nn.ParameterList([nn.Parameter(m.detach().float().clone()) for m in start])
        self.generator = torch.Generator().manual_seed(seed)
        self.last_t = None

    def point(self, t, exact_ends=True):
        return curve_point(self.a, list(self.bend), self.b, t, self.kind, exact_ends)

    def forward(self, **batch):
        batch.pop("num_items_in_batch", None)
        t = self.t if self.t is not None or not self.training else torch.rand((), generator=self.generator).item()
        self.last_t = t
        device = self.bend[0].device
        if self.a[0].device != device:
            self.a = [x.to(device) for x in self.a]
            self.b = [y.to(device) for y in self.b]
        params = dict(zip(self.names, self.point(t, exact_ends=False)))
        return functional_call(self.model, params, args=(), kwargs=batch)


def barrier(rows, eval_set, quantity="loss", key="t"):
    """The path's barrier on `eval_set`: ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` for the loss,
    the largest drop below the ends' interpolation for a metric; 0 when it never rises (drops).
    `rows` must hold t = 0 and t = 1. Returns {"height": ..., "at": t}."""
    ends = {r[key]: r[eval_set][quantity] for r in rows if r[key] in (0.0, 1.0)}
    if set(ends) != {0.0, 1.0}:
        raise ValueError("the path's rows must hold both ends (t = 0 and t = 1)")
    sign = 1.0 if quantity == "loss" else -1.0
    best = {"height": 0.0, "at": None}
    for r in rows:
        t = r[key]
        rise = sign * (r[eval_set][quantity] - ((1 - t) * ends[0.0] + t * ends[1.0]))
        if rise > best["height"]:
            best = {"height": rise, "at": t}
    return best


def fit_curve(model_a, model_b, train_dataset, training_args, kind="polychain", data_collator=None, seed=None):
    """Train the bend of the curve from model A to model B with the Hugging Face Trainer, on the
    loss averaged along the curve. `training_args` is a `transformers.TrainingArguments` (its
    seed also seeds the draws of t). Returns (the CurveModel on model A, the Trainer's log history).
    Model A's weights are left as they were."""
    from transformers import Trainer

    named_a, named_b = dict(trainable(model_a)), dict(trainable(model_b))
    if named_a.keys() != named_b.keys() or any(p.shape != named_b[n].shape for n, p in named_a.items()):
        raise ValueError("The two models' trainable parameters differ in names or shapes: connect two models of "
                         "the same architecture and size.")
    saved = {n: p.requires_grad for n, p in model_a.named_parameters()}
    buffers = [(b, b.clone()) for b in model_a.buffers()]  # BatchNorm statistics move while the curve trains
    curve = CurveModel(model_a, list(named_a.values()), [named_b[n] for n in named_a], kind,
                       seed=training_args.seed if seed is None else seed)
    training_args.remove_unused_columns = False  # CurveModel.forward takes **batch
    if not training_args.label_names:
        training_args.label_names = ["labels"]
    trainer = Trainer(model=curve, args=training_args, train_dataset=train_dataset, data_collator=data_collator)
    try:
        trainer.train()
    finally:
        for n, p in model_a.named_parameters():
            p.requires_grad_(saved[n])
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    curve.eval()
    return curve, trainer.state.log_history


def evaluate_curve(curve, eval_sets: dict, ts, train_batches=None, metric=accuracy, progress=None):
    """Loss and metric of every data set at phi(t) for each t (BatchNorm recomputed on
    `train_batches` when given), as `interpolate` returns them for the straight line."""
    model = curve.model
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():  # the curve's parameters are the ones `weights_at` sets
        p.requires_grad_(n in curve.names)
    if [name for name, _ in trainable(model)] != curve.names:
        raise ValueError("the model's parameters are no longer those the curve was built on")
    device = next(model.parameters()).device
    rows = []
    try:
        with torch.no_grad():
            for t in ts:
                point = [w.detach().to(device) for w in curve.point(float(t))]
                with weights_at(model, point, train_batches):
                    rows.append({"t": float(t), **{n: evaluate(model, b, metric) for n, b in eval_sets.items()}})
                if progress:
                    progress(len(rows), len(ts))
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    return rows


def connect(model_a, model_b, train_dataset, eval_sets: dict, training_args, kind="polychain", points=21,
            train_batches=None, data_collator=None, metric=accuracy, progress=None):
    """Fit the curve (`fit_curve`), then evaluate it and the straight line at `points` evenly
    spaced t in [0, 1]. Returns {"curve": rows, "line": rows, "barriers": ..., "history": ...} and
    the fitted CurveModel."""
    ts = [round(i / (points - 1), 10) for i in range(points)]
    curve, history = fit_curve(model_a, model_b, train_dataset, training_args, kind, data_collator)
    curve_rows = evaluate_curve(curve, eval_sets, ts, train_batches, metric, progress)
    line_rows = [{"t": r.pop("alpha"), **r} for r in interpolate(model_a, model_b, eval_sets, ts, train_batches, metric)]
    barriers = {}
    for path, rows in (("curve", curve_rows), ("line", line_rows)):
        for name in eval_sets:
            for quantity in ("loss", "metric"):
                if quantity in rows[0][name]:
                    barriers[f"{path}/{name}/{quantity}"] = barrier(rows, name, quantity)
    return {"kind": kind, "t": ts, "curve": curve_rows, "line": line_rows, "barriers": barriers,
            "history": history}, curve
