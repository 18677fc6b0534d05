"""The EISAM trainer family (ERM, SAM, ImbSAM, re-weighting, logit adjustment, EISAM and its
compositions): :data:`recbole_eisam.methods.TRAIN_METHODS` lists them."""

from recbole_eisam.methods import TRAIN_METHODS
from recbole_eisam.trainer.checkpoint import load_checkpoint, save_checkpoint
from recbole_eisam.trainer.eisam import EISAMTrainer
from recbole_eisam.trainer.losses import ADAPTERS, UNSUPPORTED, get_logits_fn, per_sample_losses, unsupported_reason
from recbole_eisam.trainer.settings import resolve_settings
from recbole_eisam.trainer.weighting import (
    WEIGHT_FAMILIES,
    WEIGHT_NORMS,
    item_weights,
    log_prior,
    normalize_weights,
    raw_item_weights,
    reweight_weights,
)

__all__ = [
    "ADAPTERS",
    "EISAMTrainer",
    "TRAIN_METHODS",
    "UNSUPPORTED",
    "WEIGHT_FAMILIES",
    "WEIGHT_NORMS",
    "get_logits_fn",
    "item_weights",
    "load_checkpoint",
    "log_prior",
    "normalize_weights",
    "per_sample_losses",
    "raw_item_weights",
    "resolve_settings",
    "reweight_weights",
    "save_checkpoint",
    "unsupported_reason",
]
