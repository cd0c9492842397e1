"""Directions in weight space for loss-surface plots (Kaddour, Liu, Silva, Kusner, "When Do Flat
Minima Optimizers Work?", NeurIPS 2022, arXiv 2202.00661, appendix A; Li, Xu, Taylor, Studer,
Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, arXiv 1712.09913).

A direction is a list of tensors shaped like the model's trainable parameters. Filter
normalisation scales each filter (each slice along dimension 0 of a weight with 2 or more
dimensions) to the norm of the same filter of the weights; one-dimensional parameters (biases,
normalisation layers) get a zero direction, as in Li et al.'s default.
"""

import torch


def trainable(model) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def gaussian_direction(params, generator=None) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device) for p in params]


def filter_normalize(direction, params) -> list[torch.Tensor]:
    """d_k <- d_k / ||d_k|| * ||w_k|| for every filter k; zero for 1-D parameters."""
    out = []
    for d, w in zip(direction, params):
        if w.dim() <= 1:
            out.append(torch.zeros_like(d))
            continue
        d_flat, w_flat = d.reshape(d.shape[0], -1), w.detach().float().reshape(w.shape[0], -1)
        scale = w_flat.norm(dim=1, keepdim=True) / d_flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
        out.append((d_flat * scale).reshape(d.shape))
    return out


def plane_directions(params, generator=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two filter-normalised Gaussian directions, the second orthogonal to the first.

    Gram-Schmidt runs filter by filter (eta_k <- eta_k - (eta_k . delta_k / delta_k . delta_k) delta_k):
    the directions are then orthogonal filter by filter, so they stay orthogonal after filter
    normalisation, which rescales each filter on its own. (Orthogonalising the whole vectors first
    and normalising afterwards, as the appendix words it, would break the orthogonality.)
    """
    delta = gaussian_direction(params, generator)
    eta = gaussian_direction(params, generator)
    for d, e in zip(delta, eta):
        if d.dim() <= 1:
            continue
        d_flat, e_flat = d.reshape(d.shape[0], -1), e.reshape(e.shape[0], -1)
        coef = (d_flat * e_flat).sum(1, keepdim=True) / (d_flat * d_flat).sum(1, keepdim=True).clamp(min=1e-12)
        e_flat -= coef * d_flat
    return filter_normalize(delta, params), filter_normalize(eta, params)


def dot(a, b) -> float:
    return sum((x.double() * y.double()).sum().item() for x, y in zip(a, b))
