"""Model soups: the weights of several fine-tuned models of one architecture, averaged into one
model (Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon,
Kornblith, Schmidt, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, arXiv 2203.05482).

- **Uniform soup** (section 3): the elementwise mean of all the models' weights.
- **Greedy soup** (Recipe 1): sort the models by their held-out score, best first; the soup starts
  as the best model, and each next model joins it only if the uniform mean of the soup's models
  and it scores no worse on the held-out data than the soup without it (a tie keeps it).

What is averaged: every floating-point entry of the models' ``state_dict`` (parameters and
floating buffers). BatchNorm running statistics are not averaged: they are recomputed for the
soup's weights with one pass over data (`hf_flat.averaging.recompute_batchnorm`), as for SWA.
Entries that are not floating point (``num_batches_tracked``, integer ``position_ids``) are taken
from the soup's first model. Sums are kept in float32 (float64 for float64 weights) and the mean is
cast back to each entry's dtype.

The models may be ``nn.Module``s or their ``state_dict``s (the CLI keeps candidates as CPU state
dicts, so that only one model sits on the accelerator); they must have the same entry names and
shapes, which is checked first (`check_soup_compatible`).
"""

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..averaging import recompute_batchnorm


class SoupMismatchError(ValueError):
    """The models cannot be averaged entry by entry: names or shapes differ."""


def _state(item) -> Mapping:
    """A model's ``state_dict``, or `item` itself when it already is one."""
    if isinstance(item, nn.Module):
        return item.state_dict()
    if isinstance(item, Mapping):
        return item
    raise TypeError(f"a soup takes nn.Module objects or their state_dicts, not {type(item).__name__}.")


def _names(models, names):
    if names is None:
        return [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models: give one name per model.")
    return [str(n) for n in names]


def _template(models, model):
    """The module that the soup is loaded into: `model`, or a copy of the first module among `models`."""
    if model is not None:
        return model
    first = next((m for m in models if isinstance(m, nn.Module)), None)
    if first is None:
        raise ValueError("the models are all state_dicts: pass `model`, a module of their architecture, to load "
                         "the soup into.")
    return copy.deepcopy(first)


def batchnorm_statistics(model: nn.Module) -> list[str]:
    """The ``state_dict`` names of the BatchNorm running statistics of `model` (running_mean,
    running_var, num_batches_tracked of every BatchNorm layer that tracks them): recomputed, not averaged."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, buffer, None) is not None:
                    names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def check_soup_compatible(models, names=None) -> None:
    """Raise `SoupMismatchError` naming the first entry in which `models` (modules or state dicts)
    differ: an entry one model lacks, a shape, or a floating-point entry that another model holds as
    integers. Models are compared with the first, in order; within a model, entries in the first
    model's order."""
    names = _names(models, names)
    if len(models) < 1:
        raise ValueError("a soup needs at least one model.")
    reference = _state(models[0])
    for name, item in zip(names[1:], models[1:]):
        state = _state(item)
        for key in reference:
            if key not in state:
                raise SoupMismatchError(
                    f"{name} has no entry {key!r}, which {names[0]} has: a soup averages models of one "
                    "architecture, entry by entry.")
        for key in state:
            if key not in reference:
                raise SoupMismatchError(
                    f"{name} has an entry {key!r} that {names[0]} lacks: a soup averages models of one "
                    "architecture, entry by entry.")
        for key, value in reference.items():
            other = state[key]
            if tuple(value.shape) != tuple(other.shape):
                raise SoupMismatchError(
                    f"entry {key!r} has shape {tuple(value.shape)} in {names[0]} and {tuple(other.shape)} in {name}: "
                    "a soup averages models of one architecture and size (e.g. the same num_labels).")
            if value.is_floating_point() != other.is_floating_point():
                raise SoupMismatchError(
                    f"entry {key!r} is {value.dtype} in {names[0]} and {other.dtype} in {name}: a soup averages "
                    "floating-point entries and copies the others, so each must be one or the other in every model.")


def _averaged(state, skip) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and k not in skip]


def _sum_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _accumulate(total, state, keys):
    """Add the entries `keys` of `state` into the float32 (or float64) sums `total`, in place."""
    for key in keys:
        total[key].add_(state[key].detach().to(device=total[key].device, dtype=total[key].dtype))


def _mean(total, count, first, keys) -> dict:
    """A state dict: ``total / count`` for `keys` (cast to the dtypes of `first`), `first`'s other entries."""
    soup = {}
    for key, value in first.items():
        if key in total:
            soup[key] = (total[key] / count).to(value.dtype)
        else:
            soup[key] = value.detach().clone()
    return soup


def _new_sums(state, keys) -> dict:
    return {k: state[k].detach().to(dtype=_sum_dtype(state[k].dtype), copy=True) for k in keys}


def _batchnorm_layers(model) -> list[str]:
    return [prefix or "(the model itself)" for prefix, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


def _need_batches(model, batchnorm_batches):
    """Refuse BatchNorm layers without data to recompute their statistics on."""
    layers = _batchnorm_layers(model)
    if layers and batchnorm_batches is None:
        raise ValueError(
            f"the models have BatchNorm layers (e.g. {layers[0]}), whose running statistics are recomputed for the "
            "soup's weights, not averaged: pass batchnorm_batches (a function returning training batches).")


def load_soup(model: nn.Module, soup: Mapping, batchnorm_batches=None) -> nn.Module:
    """Load the state dict `soup` into `model` and, when the model has BatchNorm layers, recompute
    their running statistics for these weights with one pass over `batchnorm_batches` (a function
    returning an iterable of dict batches on the model's device); return the model."""
    _need_batches(model, batchnorm_batches)
    model.load_state_dict(soup)
    if batchnorm_batches is not None:
        recompute_batchnorm(model, batchnorm_batches)  # (iterates nothing without BatchNorm)
    return model


def _with_statistics(soup, model):
    """`soup` with the BatchNorm statistics that `model` now holds."""
    buffers = model.state_dict()
    for key in batchnorm_statistics(model):
        soup[key] = buffers[key].detach().clone()
    return soup


def uniform_soup(models, model: nn.Module | None = None, batchnorm_batches=None, names=None) -> dict:
    """The uniform soup of `models` (modules or state dicts of one architecture): a state dict
    holding the mean of every floating-point entry and the first model's other entries; for models
    with BatchNorm, running statistics recomputed for the mean weights on `batchnorm_batches`.

    `model` is a module of the models' architecture; if given, it holds the soup on return (it
    is needed when `models` are all state dicts). The BatchNorm statistics are recomputed in it,
    or in a copy of the first module among `models`. `names` name the models in errors.
    """
    check_soup_compatible(models, names)
    source = model if model is not None else next((m for m in models if isinstance(m, nn.Module)), None)
    if source is None:
        raise ValueError("the models are all state_dicts: pass `model`, a module of their architecture, to tell "
                         "BatchNorm statistics (recomputed) from weights (averaged).")
    _need_batches(source, batchnorm_batches)
    skip = set(batchnorm_statistics(source))
    first = _state(models[0])
    keys = _averaged(first, skip)
    total = _new_sums(first, keys)
    for item in models[1:]:
        _accumulate(total, _state(item), keys)
    soup = _mean(total, len(models), first, keys)
    if skip or model is not None:
        work = model if model is not None else copy.deepcopy(source)
        load_soup(work, soup, batchnorm_batches)
        soup = _with_statistics(soup, work)
    return soup


def _score(result, key):
    """The number compared: `result` itself, or its entry `key` when it is a mapping."""
    if isinstance(result, Mapping):
        if key is None or key not in result:
            raise ValueError(f"evaluate_fn returned a mapping ({sorted(result)}); name the entry to compare with "
                             f"key= (got key={key!r}).")
        return float(result[key])
    return float(result)


def greedy_soup(models, evaluate_fn, higher_is_better: bool = True, model: nn.Module | None = None,
                batchnorm_batches=None, names=None, key=None) -> tuple[dict, dict]:
    """The greedy soup of `models` (Recipe 1 of Wortsman et al., ICML 2022, arXiv 2203.05482).

    ``evaluate_fn(module)`` scores the weights the module holds on held-out data: a number, or a
    mapping of numbers whose entry `key` is compared (the whole mapping goes into the record).
    `higher_is_better` is True for accuracy-like scores, False for a loss.

    1. Every candidate is scored as it is (its own BatchNorm statistics) and the candidates are
       sorted best first (a stable sort: ties keep the given order; a NaN score goes last).
    2. The soup starts as the best candidate. With BatchNorm its statistics are recomputed, and the
       soup is scored again, so that every soup score below is measured the same way.
    3. For each next candidate: the trial soup is the uniform mean of the soup's models and it
       (BatchNorm statistics recomputed on `batchnorm_batches`); it is kept if the trial scores
       >= the current soup (<= when lower is better), else dropped.

    `model` (default: a copy of the first module among `models`) is the module every candidate and
    trial is loaded into; on return it holds the soup. Returns the soup's state dict and a record:
    ``higher_is_better``, ``candidates`` (name and score, in the given order), ``order`` (best
    first), ``steps`` (per candidate in that order: its score, the trial soup's score, the score it
    had to match, whether it was kept and why), ``ingredients`` and ``score`` (the soup's).
    """
    check_soup_compatible(models, names)
    names = _names(models, names)
    if model is not None and any(m is model for m in models):
        raise ValueError("`model` is one of `models`: every candidate and trial is loaded into it, which would "
                         "overwrite that candidate; pass a copy, or leave `model` out (a copy is made).")
    work = _template(models, model)
    skip = set(batchnorm_statistics(work))
    has_batchnorm = bool(skip)
    _need_batches(work, batchnorm_batches)

    def scored(result):
        return {"score": _score(result, key), **({"result": dict(result)} if isinstance(result, Mapping) else {})}

    candidates = []
    for name, item in zip(names, models):
        work.load_state_dict(_state(item))  # the candidate as it is, with its own statistics
        candidates.append({"name": name, **scored(evaluate_fn(work))})
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(models)), key=lambda i: (math.isnan(candidates[i]["score"]), -sign * candidates[i]["score"]))

    def better_or_equal(new, old):
        return new >= old if higher_is_better else new <= old

    first = _state(models[order[0]])
    keys = _averaged(first, skip)
    total = _new_sums(first, keys)
    ingredients = [order[0]]
    best = candidates[order[0]]
    start = {"candidate": names[order[0]], "candidate_score": best["score"]}
    if has_batchnorm:
        load_soup(work, first, batchnorm_batches)
        current = scored(evaluate_fn(work))
        start["note"] = "BatchNorm statistics recomputed for the soup, which is scored again"
    else:
        current = {k: v for k, v in best.items() if k != "name"}
    steps = [{**start, "soup_score": current["score"], **({"soup_result": current["result"]} if "result" in current else {}),
              "score_before": None, "kept": True, "decision": "kept: the best candidate starts the soup",
              "ingredients": [names[order[0]]]}]
    for i in order[1:]:
        state = _state(models[i])
        trial = {k: v.clone() for k, v in total.items()}
        _accumulate(trial, state, keys)
        load_soup(work, _mean(trial, len(ingredients) + 1, first, keys), batchnorm_batches)
        result = scored(evaluate_fn(work))
        kept = better_or_equal(result["score"], current["score"])
        if kept:
            total, ingredients = trial, ingredients + [i]
        decision = (f"{'kept' if kept else 'dropped'}: the soup scores {result['score']:.6g} with it and "
                    f"{current['score']:.6g} without it ({'higher' if higher_is_better else 'lower'} is better"
                    f"{'; a tie keeps it' if result['score'] == current['score'] else ''})")
        steps.append({"candidate": names[i], "candidate_score": candidates[i]["score"], "soup_score": result["score"],
                      **({"soup_result": result["result"]} if "result" in result else {}),
                      "score_before": current["score"], "kept": kept, "decision": decision,
                      "ingredients": [names[j] for j in ingredients]})
        if kept:
            current = result
    soup = _mean(total, len(ingredients), first, keys)
    load_soup(work, soup, batchnorm_batches)
    soup = _with_statistics(soup, work)
    record = {
        "higher_is_better": higher_is_better,
        "candidates": candidates,
        "order": [names[i] for i in order],
        "steps": steps,
        "ingredients": [names[i] for i in ingredients],
        "score": current["score"],
        **({"result": current["result"]} if "result" in current else {}),
    }
    return soup, record
