"""Loss-surface analysis: interpolations, 2-D planes, sharpness, asymmetry, Hessian eigenvalue."""

from .directions import filter_normalize, gaussian_direction, plane_directions
from .sharpness import asymmetry_factor, hessian_vector_product, sharpness, top_hessian_eigenvalue
from .surface import evaluate, interpolate, plane, weights_at

__all__ = [
    "asymmetry_factor", "evaluate", "filter_normalize", "gaussian_direction", "hessian_vector_product",
    "interpolate", "plane", "plane_directions", "sharpness", "top_hessian_eigenvalue", "weights_at",
]
