"""Loss-surface analysis: interpolations, 2-D planes, sharpness, asymmetry, Hessian eigenvalue;
mode connectivity (a trained curve between two models); model soups (uniform and greedy weight
averages of fine-tuned models)."""

from .connect import CurveModel, barrier, connect, curve_point, evaluate_curve, fit_curve
from .directions import filter_normalize, gaussian_direction, plane_directions
from .sharpness import asymmetry_factor, hessian_vector_product, sharpness, top_hessian_eigenvalue
from .soups import SoupMismatchError, check_soup_compatible, greedy_soup, load_soup, uniform_soup
from .surface import evaluate, interpolate, plane, weights_at

__all__ = [
    "CurveModel", "barrier", "connect", "curve_point", "evaluate_curve", "fit_curve",
    "SoupMismatchError", "asymmetry_factor", "check_soup_compatible", "evaluate", "filter_normalize",
    "gaussian_direction", "greedy_soup", "hessian_vector_product", "interpolate", "load_soup", "plane",
    "plane_directions", "sharpness", "top_hessian_eigenvalue", "uniform_soup", "weights_at",
]
