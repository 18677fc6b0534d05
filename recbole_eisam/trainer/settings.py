"""The trainer family's keys: their checks, and the settings a ``train_method`` implies.

The defaults are written once, in ``properties/eisam.yaml`` (and ``head_ratio`` /
``gradient_accumulation_steps`` in ``properties/overall.yaml``); :func:`resolve_settings`
fills a key the configuration lacks from there. What each method means is
:data:`recbole_eisam.methods.METHODS`.
"""

import math

from recbole_eisam.defaults import trainer_defaults
from recbole_eisam.methods import BASE_LOSSES, TRAIN_METHODS
from recbole_eisam.trainer.weighting import WEIGHT_FAMILIES, WEIGHT_NORMS

#: keys whose value is one of a few names
CHOICES = {
    "train_method": tuple(TRAIN_METHODS),
    "eisam_weight": WEIGHT_FAMILIES,
    "eisam_weight_norm": WEIGHT_NORMS,
    "eisam_scope": ("all", "head"),
    "imbsam_split": ("eta", "head_ratio"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "amp_dtype": ("bfloat16", "float16"),
}
#: real-valued keys and their lower bound (``None``: any finite number)
FLOATS = {
    "eisam_rho": None,  # > 0, checked apart
    "eisam_lambda": 0.0,
    "eisam_alpha": None,
    "eisam_c": None,
    "eisam_gamma": None,
    "reweight_beta": 0.0,
    "logit_adjust_tau": 0.0,
}
#: integer keys and their lower bound
INTEGERS = {
    "train_sample_num": 0,
    "gradient_accumulation_steps": 1,
    "lr_warmup_steps": 0,
    "eisam_start_epoch": 0,
    "imbsam_eta": 1,
}
#: every key of the trainer family (``base_loss``: ``~`` or one of BASE_LOSSES)
KEYS = tuple(CHOICES) + tuple(FLOATS) + tuple(INTEGERS) + ("base_loss", "reweight_eisam_weight", "head_ratio")
#: keys that must be numbers (the command line's checks)
NUMBER_KEYS = tuple(FLOATS) + tuple(INTEGERS)


def _choice(s, key, choices):
    s[key] = str(s[key]).lower()
    if s[key] not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {s[key]!r}.")
    return s[key]


def _base_loss(s, method):
    """The base loss of ``method``: its own, or the ``base_loss`` key where the method composes."""
    spec = TRAIN_METHODS[method]
    if s["base_loss"] is None:
        return spec.base_loss
    chosen = _choice(s, "base_loss", BASE_LOSSES)
    if chosen != spec.base_loss and not spec.composes:
        own = f"the {spec.base_loss} loss" + (" with post-hoc logit adjustment" if spec.posthoc else "")
        raise ValueError(
            f"train_method={method} trains on {own}, so base_loss={chosen} contradicts it; "
            f"choose a method of that base loss (logit_adjust, reweight, eisam_la, eisam_rw) or "
            f"set base_loss on sam, imbsam or eisam."
        )
    return chosen


def _check_values(s):
    """Names, numbers and integers of the keys, each refused with one sentence."""
    for key, choices in CHOICES.items():
        _choice(s, key, choices)
    for key, low in FLOATS.items():
        s[key] = float(s[key])
        if not math.isfinite(s[key]) or (low is not None and s[key] < low):
            bound = "" if low is None else f" >= {low:g}"
            raise ValueError(f"{key} must be a finite number{bound}, got {s[key]}.")
    if s["eisam_rho"] <= 0:
        raise ValueError(f"eisam_rho must be > 0 (the perturbation radius), got {s['eisam_rho']}.")
    for key, low in INTEGERS.items():
        if isinstance(s[key], bool) or int(s[key]) != s[key] or int(s[key]) < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {s[key]}.")
        s[key] = int(s[key])
    if not isinstance(s["reweight_eisam_weight"], bool):
        raise ValueError(f"reweight_eisam_weight must be True or False, got {s['reweight_eisam_weight']!r}.")


def resolve_settings(config):
    """Check the keys and apply the ``train_method`` (:data:`TRAIN_METHODS`); returns a dict.

    Besides the keys, it holds ``method`` (the :class:`~recbole_eisam.methods.Method`),
    ``base_loss``, the sharpness weighting actually used (``eisam_weight``, ``weight_norm``,
    ``weight_eta``), ``tau`` (training logit adjustment), ``posthoc_tau`` (prediction),
    ``reweight_family`` and ``per_sample`` (whether the step needs per-sample losses).
    """
    defaults = trainer_defaults()

    def get(key):
        value = config[key] if key in config else None
        return defaults.get(key) if value is None else value

    s = {key: get(key) for key in KEYS}
    _check_values(s)
    method = s["train_method"]
    spec = s["method"] = TRAIN_METHODS[method]

    # the base loss l_j, and its knob
    base = s["base_loss"] = _base_loss(s, method)
    s["reweight_family"] = None
    if s["reweight_eisam_weight"]:
        if base != "reweight":
            raise ValueError(
                f"reweight_eisam_weight=True sets the re-weighted loss's weights, but train_method={method} "
                f"trains on the {base} loss; use train_method=reweight (or base_loss: reweight)."
            )
        s["reweight_family"] = s["eisam_weight"]  # the user's family, before a preset replaces it
    if base == "reweight" and s["reweight_family"] is None and s["reweight_beta"] == 0:
        raise ValueError(f"train_method={method} re-weights the loss by n^-reweight_beta, so it needs reweight_beta > 0.")
    if (base == "logit_adjust" or spec.posthoc) and s["logit_adjust_tau"] == 0:
        raise ValueError(f"train_method={method} adjusts the logits by tau log prior, so it needs logit_adjust_tau > 0.")
    s["tau"] = s["logit_adjust_tau"] if base == "logit_adjust" else 0.0
    s["posthoc_tau"] = s["logit_adjust_tau"] if spec.posthoc else 0.0
    if base != "reweight" or s["reweight_family"] is not None:
        s["reweight_beta"] = 0.0

    # the sharpness term: its weighting w and lambda
    s["weight_norm"], s["weight_eta"] = s["eisam_weight_norm"], None
    if spec.sharpness is None:
        s["eisam_lambda"] = 0.0
    elif spec.sharpness == "uniform":
        s["eisam_weight"], s["weight_norm"] = "uniform", "max"
    elif spec.sharpness == "imbsam":  # w = 1 on tail items, 0 elsewhere: lambda w_j in {0, lambda}
        s["eisam_weight"], s["weight_norm"] = "tail", "max"
        s["weight_eta"] = s["imbsam_eta"] if s["imbsam_split"] == "eta" else None
    s["per_sample"] = spec.sharpness is not None or base != "ce"
    return s
