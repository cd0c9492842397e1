"""Loss and metric of a model at points of weight space: interpolations and 2-D planes
(Kaddour, Liu, Silva, Kusner, "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv 2202.00661,
Figure 2 and appendix A). BatchNorm statistics are recomputed at every point when the
model has BatchNorm (appendix A)."""

import contextlib
from collections.abc import Mapping

import torch

from ..averaging import recompute_batchnorm
from .directions import plane_directions, trainable


def loss_and_logits(outputs):
    """The loss and the logits of a model's outputs on a batch with labels: a dict's (a
    `ModelOutput`'s) ``loss`` and ``logits``, or a tuple's first two entries (``return_dict=False``
    puts the loss first when the model gets its labels). Logits are None when there are none."""
    if isinstance(outputs, Mapping):
        return outputs["loss"], outputs.get("logits")
    return outputs[0], (outputs[1] if len(outputs) > 1 else None)


def accuracy(logits, labels) -> float:
    return (logits.argmax(-1) == labels).float().sum().item()


@torch.no_grad()
def evaluate(model, batches, metric=accuracy) -> dict:
    """Mean loss over `batches` (a function returning an iterable of dict batches on the model's
    device), weighted by batch size, and, when the outputs have per-sample logits and the batches
    labels, `metric` (a sum over the batch, default: the number correct) divided by the sample count."""
    model.eval()
    total_loss = total_metric = count = 0.0
    has_metric = False
    for batch in batches():
        loss, logits = loss_and_logits(model(**batch))
        n = next(iter(batch.values())).shape[0]
        total_loss += loss.float().item() * n
        labels = batch.get("labels")
        # (a single output is a regression head: argmax-style metrics mean nothing there)
        if metric is not None and labels is not None and logits is not None and logits.dim() == 2 and logits.shape[-1] > 1:
            total_metric += metric(logits, labels)
            has_metric = True
        count += n
    result = {"loss": total_loss / count}
    if has_metric:
        result["metric"] = total_metric / count
    return result


@contextlib.contextmanager
def weights_at(model, point, train_batches=None):
    """Set the trainable weights to `point` (a list of tensors) inside the block, with BatchNorm
    statistics recomputed on `train_batches`; restore everything afterwards."""
    params = [p for _, p in trainable(model)]
    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.clone()) for b in model.buffers()]
    with torch.no_grad():
        for p, w in zip(params, point):
            p.copy_(w)
    if train_batches is not None:
        recompute_batchnorm(model, train_batches)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
            for b, value in buffers:
                b.copy_(value)


def grid_points(low: float, high: float, count: int) -> list[float]:
    """`count` evenly spaced points from `low` to `high`, rounded so that 0 and the ends are exact."""
    if count == 1:
        return [float(low)]
    return [round(low + i * (high - low) / (count - 1), 10) for i in range(count)]


def interpolate(model_a, model_b, eval_sets: dict, alphas, train_batches=None, metric=accuracy, progress=None):
    """theta(alpha) = (1 - alpha) theta_a + alpha theta_b for each alpha; returns, per alpha, the loss
    and metric on every data set of `eval_sets` (name -> batches function)."""
    named_a, named_b = dict(trainable(model_a)), dict(trainable(model_b))
    if named_a.keys() != named_b.keys():
        raise ValueError(
            "The two models' trainable parameters differ, so their weights cannot be paired name by name: "
            f"only in the first: {sorted(named_a.keys() - named_b.keys())[:3]}, only in the second: "
            f"{sorted(named_b.keys() - named_a.keys())[:3]}."
        )
    for name, p in named_a.items():
        if p.shape != named_b[name].shape:
            raise ValueError(
                f"Parameter {name} has shape {tuple(p.shape)} in the first model and {tuple(named_b[name].shape)} "
                "in the second: interpolate two models of the same architecture and size (e.g. the same num_labels)."
            )
    a = [p.detach().float().clone() for p in named_a.values()]
    b = [named_b[name].detach().float() for name in named_a]  # paired by name
    rows = []
    for alpha in alphas:
        point = [(1 - alpha) * x + alpha * y for x, y in zip(a, b)]
        with weights_at(model_a, point, train_batches):
            rows.append({"alpha": float(alpha), **{name: evaluate(model_a, batches, metric) for name, batches in eval_sets.items()}})
        if progress:
            progress(len(rows), len(alphas))
    return rows


def plane(model, eval_sets: dict, steps=21, span=(-1.0, 1.0), seed=0, train_batches=None, metric=accuracy, progress=None):
    """Loss and metric on a `steps` x `steps` grid theta + alpha delta + beta eta over `span`^2, with
    `plane_directions` drawn from `seed`. Returns the grid and the directions. An odd `steps` on a
    symmetric span puts the model itself, (0, 0), on the grid."""
    generator = torch.Generator().manual_seed(seed)
    center = [p.detach().float().clone() for _, p in trainable(model)]
    delta, eta = plane_directions(center, generator)
    coords = grid_points(span[0], span[1], steps)
    grid = []
    for alpha in coords:
        for beta in coords:
            point = [c + alpha * d + beta * e for c, d, e in zip(center, delta, eta)]
            with weights_at(model, point, train_batches):
                grid.append({"alpha": alpha, "beta": beta, **{n: evaluate(model, b, metric) for n, b in eval_sets.items()}})
            if progress:
                progress(len(grid), steps * steps)
    return {"coords": coords, "grid": grid}, (delta, eta)
