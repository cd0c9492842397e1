"""Sharpness, asymmetry and curvature of a solution.

- Adversarial m-sharpness (Boca, Cross, Holm, Korkmaz, "Towards an Even Better Understanding of
  Sharpness-Aware Minimisation", University of Cambridge R252 report, 2023, section 4.3; after
  Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021, arXiv 2010.01412): over n batches U_i of size m,
  ``1/n sum_i [L_Ui(w + e_i) - L_Ui(w)]`` with ``e_i = rho * g_i / ||g_i||`` (SAM's perturbation).
- Average sharpness: the same with ``e_i = rho * z / ||z||``, ``z ~ N(0, I)``.
- Asymmetry factor (section 4.4): ``Omega = 1/k sum_i min(l+_i, l-_i) / max(l+_i, l-_i)`` with
  ``l+-_i = L(w +- mu u_i) - L(w)``, ``u_i`` of U(0, 1) elements scaled to unit length.
  0 is perfectly asymmetric, 1 perfectly symmetric; values below 0 mean the loss fell in some
  direction, i.e. the point is not a minimum at distance mu.
- The top Hessian eigenvalue by power iteration on Hessian-vector products.

All run the model in eval mode (no dropout; BatchNorm uses its running statistics) on the
trainable parameters, and leave the weights exactly as they were.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .directions import dot, trainable
from .surface import evaluate, loss_and_logits, weights_at


def _unit(vectors):
    norm = dot(vectors, vectors) ** 0.5
    return [v / max(norm, 1e-12) for v in vectors]


def _loss_and_grad(model, batch, params):
    model.eval()
    loss = loss_and_logits(model(**batch))[0].float()
    return loss.item(), torch.autograd.grad(loss, params, allow_unused=True)


def sharpness(model, batches: list, rho: float, kind: str = "adversarial", seed: int = 0) -> dict:
    """m-sharpness over `batches` (a list of n dict batches of size m): returns the sharpness and
    the perturbed loss ``1/n sum_i L_Ui(w + e_i)``."""
    if kind not in ("adversarial", "average"):
        raise ValueError(f"kind={kind!r} is not supported: use 'adversarial' or 'average'.")
    params = [p for _, p in trainable(model)]
    generator = torch.Generator().manual_seed(seed)
    base = [p.detach().clone() for p in params]
    diffs, perturbed = [], []
    for batch in batches:
        loss, grads = _loss_and_grad(model, batch, params)
        if kind == "adversarial":
            direction = [torch.zeros_like(p) if g is None else g.detach().float() for p, g in zip(params, grads)]
        else:
            direction = [torch.randn(p.shape, generator=generator).to(p.device) for p in params]
        e = [rho * d for d in _unit(direction)]
        with weights_at(model, [w + ei for w, ei in zip(base, e)]):
            with torch.no_grad():
                loss_e = loss_and_logits(model(**batch))[0].float().item()
        diffs.append(loss_e - loss)
        perturbed.append(loss_e)
    n = len(batches)
    return {"sharpness": sum(diffs) / n, "perturbed_loss": sum(perturbed) / n, "rho": rho, "kind": kind, "n": n}


def asymmetry_factor(model, batches, mu: float, num_directions: int = 30, seed: int = 0, train_batches=None) -> dict:
    """Omega over `num_directions` random directions at distance `mu` (loss over all of `batches`,
    a function returning an iterable of dict batches). With `train_batches`, BatchNorm statistics
    are recomputed at every evaluated point, the centre included."""
    params = [p for _, p in trainable(model)]
    generator = torch.Generator().manual_seed(seed)
    base = [p.detach().clone() for p in params]
    loss = evaluate_at(model, base, batches, train_batches)
    ratios, rises = [], []
    for _ in range(num_directions):
        u = _unit([torch.rand(p.shape, generator=generator).to(p.device) for p in params])
        up, down = [
            evaluate_at(model, [w + sign * mu * ui for w, ui in zip(base, u)], batches, train_batches) - loss
            for sign in (1, -1)
        ]
        ratios.append(min(up, down) / max(up, down) if max(up, down) > 0 else 1.0)
        rises.append((up, down))
    return {"omega": sum(ratios) / len(ratios), "mu": mu, "directions": num_directions, "rises": rises}


def evaluate_at(model, point, batches, train_batches=None) -> float:
    """The loss over `batches` with the trainable weights at `point` (BatchNorm recomputed on
    `train_batches` if given); the model is left as it was."""
    with weights_at(model, point, train_batches):
        return evaluate(model, batches, metric=None)["loss"]


def top_hessian_eigenvalue(model, batches, iterations: int = 50, tol: float = 1e-4, seed: int = 0) -> dict:
    """The eigenvalue of largest magnitude of the Hessian of the mean loss over `batches`, by
    power iteration with exact Hessian-vector products (double backward)."""
    params = [p for _, p in trainable(model)]
    generator = torch.Generator().manual_seed(seed)
    v = _unit([torch.randn(p.shape, generator=generator).to(p.device) for p in params])
    eigenvalue = None
    for i in range(iterations):
        hv = hessian_vector_product(model, batches, params, v)
        new = dot(v, hv)
        v = _unit(hv)
        if eigenvalue is not None and abs(new - eigenvalue) <= tol * max(abs(eigenvalue), 1e-12):
            eigenvalue = new
            break
        eigenvalue = new
    return {"eigenvalue": eigenvalue, "iterations": i + 1}


def hessian_vector_product(model, batches, params, v):
    """H v for the mean loss over `batches` (weighted by batch size). Attention runs on PyTorch's
    math kernel, the one with a double backward."""
    with sdpa_kernel(SDPBackend.MATH):
        return _hessian_vector_product(model, batches, params, v)


def _hessian_vector_product(model, batches, params, v):
    model.eval()
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in batches():
        n = next(iter(batch.values())).shape[0]
        loss = loss_and_logits(model(**batch))[0].float()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None]
        grad_dot_v = sum((g * vi).sum() for g, vi in pairs)
        hv = torch.autograd.grad(grad_dot_v, params, allow_unused=True)
        for t, h in zip(total, hv):
            if h is not None:
                t.add_(h.detach().float(), alpha=n)
        count += n
    return [t / count for t in total]
