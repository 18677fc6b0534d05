"""Item-frequency weighting functions for EISAM, re-weighting and logit adjustment.

Every weight vector here is indexed by RecBole's internal item id and computed from the
*training* frequencies ``n_i`` (:func:`recbole_eisam.utils.longtail.item_counts`).
EISAM's weights are normalised one of two ways (``eisam_weight_norm``, docs/EISAM.md,
"Objective"):

* ``max``: ``w / max_i w_i`` over the items seen in training, so every coefficient
  ``lambda * w_j`` lies in ``[0, lambda]`` (the rarest training items get ``lambda``);
* ``mean``: ``(1/N) * sum_j w(n_{y_j}) = sum_i n_i w_i / sum_i n_i = 1``, so ``lambda``
  keeps one meaning across datasets (with ``lambda = 1`` the rarest items' plain-loss
  coefficients ``1 - lambda * w_j`` are negative).

Re-weighting's loss weights are always mean-normalised (the loss keeps its scale).

Families (``eisam_weight``), each non-increasing in ``n``:

=========  =====================================  ===========================================
name       unnormalised ``w(n)``                  parameters
=========  =====================================  ===========================================
power      ``(n + c) ** -alpha``                  ``eisam_alpha`` (0 = uniform), ``eisam_c``
log        ``1 / log(e + n)``                     none
focal      ``(1 - n / n_max) ** gamma``           ``eisam_gamma`` (the most frequent item gets 0)
tail       1 on tail items, 0 on head items       ``head_ratio``, or ``eta``: tail = fewer than
                                                  eta training interactions (ImbSAM)
uniform    1                                      none (SAM)
=========  =====================================  ===========================================

The padding id 0 never is a training target; it gets the formula's value at ``n = 0``
and plays no role.
"""

import math

import torch

from recbole_eisam.utils.longtail import head_item_mask

WEIGHT_FAMILIES = ("power", "log", "focal", "tail", "uniform")
WEIGHT_NORMS = ("max", "mean")


def normalize_weights(raw, counts):
    """Scale ``raw`` so that ``sum_i n_i w_i / sum_i n_i == 1``; returns float32 weights.

    Raises:
        ValueError: when no training sample gets a positive weight (the scale is undefined).
    """
    raw = torch.as_tensor(raw, dtype=torch.float64)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("item counts are all zero: the training split has no interactions.")
    mean = (counts * raw).sum() / total
    if not torch.isfinite(mean) or mean <= 0:
        raise ValueError(
            "the item weights give every training sample weight 0 (e.g. 'tail' weights when "
            "every training target is a head item); choose another eisam_weight or head_ratio."
        )
    return (raw / mean).float()


def normalize_max(raw, counts):
    """Scale ``raw`` so that its largest value over the items seen in training is 1.

    Raises:
        ValueError: when every item seen in training has weight 0 (the scale is undefined).
    """
    raw = torch.as_tensor(raw, dtype=torch.float64)
    seen = torch.as_tensor(counts) > 0
    if not bool(seen.any()):
        raise ValueError("item counts are all zero: the training split has no interactions.")
    top = raw[seen].max()
    if not torch.isfinite(top) or top <= 0:
        raise ValueError(
            "the item weights give every training sample weight 0 (e.g. 'tail' weights when "
            "every training item is a head item); choose another eisam_weight, head_ratio or imbsam_eta."
        )
    return (raw / top).float()


def raw_item_weights(counts, family, alpha=0.5, c=1.0, gamma=1.0, head_ratio=0.2, eta=None):
    """Unnormalised weights ``w(n_i)`` of one family (see the module docstring); for
    ``tail``, ``eta`` (when given) makes the tail the items with fewer than ``eta``
    training interactions instead of the items outside the ``head_ratio`` head."""
    n = torch.as_tensor(counts).to(torch.float64)
    if family == "power":
        if c <= 0:
            raise ValueError(f"eisam_c must be > 0 for the power weighting, got {c}.")
        if alpha < 0:
            raise ValueError(f"eisam_alpha must be >= 0, got {alpha}.")
        return (n + c) ** (-float(alpha))
    if family == "log":
        return 1.0 / torch.log(math.e + n)
    if family == "focal":
        if gamma < 0:
            raise ValueError(f"eisam_gamma must be >= 0, got {gamma}.")
        n_max = n.max().clamp(min=1.0)
        return (1.0 - n / n_max).clamp(min=0.0) ** float(gamma)
    if family == "tail":
        if eta is not None:
            return (n < float(eta)).to(torch.float64)
        return (~head_item_mask(torch.as_tensor(counts), head_ratio)).to(torch.float64)
    if family == "uniform":
        return torch.ones_like(n)
    raise ValueError(
        f"eisam_weight must be one of {', '.join(WEIGHT_FAMILIES)}, got {family!r}."
    )


def item_weights(counts, family, norm="mean", **params):
    """Weights of one family, normalised by ``norm`` (``mean``: mean 1 over training
    samples; ``max``: largest 1 over training items), as float32 [n_items]."""
    raw = raw_item_weights(counts, family, **params)
    if norm == "max":
        return normalize_max(raw, counts)
    if norm == "mean":
        return normalize_weights(raw, counts)
    raise ValueError(f"eisam_weight_norm must be one of {', '.join(WEIGHT_NORMS)}, got {norm!r}.")


def reweight_weights(counts, beta):
    """Re-weighting baseline: loss weights ``~ n_i ** -beta`` (n floored at 1), mean 1 over samples."""
    if beta < 0:
        raise ValueError(f"reweight_beta must be >= 0, got {beta}.")
    n = torch.as_tensor(counts).to(torch.float64).clamp(min=1.0)
    return normalize_weights(n ** (-float(beta)), counts)


def log_prior(counts):
    """``log pi_i`` with ``pi_i = max(n_i, 1) / N``: unseen items (and padding) count as seen once."""
    n = torch.as_tensor(counts).to(torch.float64)
    total = n.sum().clamp(min=1.0)
    return torch.log(n.clamp(min=1.0) / total).float()
