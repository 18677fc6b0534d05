"""Fixes that let RecBole 1.2.1 run on the dependency set pinned in setup.cfg.

RecBole 1.2.1 was released for NumPy 1.x. Two of its code paths that this package
uses break on NumPy 2:

* ``Config.compatibility_settings`` re-creates the removed aliases ``np.float`` ... from
  ``np.float_`` ..., which NumPy 2 removed as well, so building any ``Config`` raises.
* ``recbole.evaluator.metrics`` (``NDCG``, ``MAP``, ``MRR``...) still calls ``np.float``
  and ``np.bool``.

And one that costs time on any version: importing ``recbole.model.sequential_recommender``
(which ``recbole.utils.get_model`` does) runs ``torch.autograd.set_detect_anomaly(True)``
from ``sine.py``, slowing every backward pass of every model. :func:`apply` imports that
package once and switches anomaly detection back off.

And one for several processes: ``recbole.utils.ensure_dir`` checks that a folder is missing,
then creates it, so two processes started together (``nproc``) both see ``./log`` missing
and the second one's ``os.makedirs`` raises ``FileExistsError``. :func:`apply` puts
``os.makedirs(..., exist_ok=True)`` in its place in every RecBole module that imported it.

And one for CPUs: ``Config._init_device`` starts RecBole's distributed mode with NCCL only;
:mod:`recbole_eisam.distributed` adds gloo on CPU.

:func:`apply` restores the aliases with their NumPy-2 meanings (exactly what RecBole
intends) and replaces ``compatibility_settings`` by a no-op. It is idempotent and is run
by ``import recbole_eisam``.
"""

import importlib
import os

import numpy as np

_NUMPY_ALIASES = {
    "bool": np.bool_,
    "int": np.int64,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int64,
    "unicode": np.str_,
}


def _compatibility_settings(self):  # replaces Config.compatibility_settings
    """NumPy aliases are restored once by :func:`recbole_eisam.compat.apply`."""


def _ensure_dir(dir_path):  # replaces recbole.utils.ensure_dir
    """Create ``dir_path`` (and its parents) unless it exists; safe when processes race."""
    os.makedirs(dir_path, exist_ok=True)


# the RecBole modules that bind ``ensure_dir`` by name (``from recbole.utils import ensure_dir``)
_ENSURE_DIR_MODULES = (
    "recbole.utils.utils",
    "recbole.utils",
    "recbole.utils.logger",
    "recbole.data.utils",
    "recbole.data.dataset.dataset",
    "recbole.trainer.trainer",
)


def apply():
    """Install the NumPy aliases, the safe ``Config.compatibility_settings`` and ``ensure_dir``."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    from recbole.config import Config

    Config.compatibility_settings = _compatibility_settings
    for module_name in _ENSURE_DIR_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = _ensure_dir
    from recbole_eisam import distributed

    distributed.install()  # gloo on CPU in RecBole's distributed mode (it hardcodes NCCL)

    import recbole.model.sequential_recommender  # noqa: F401  (its sine.py turns anomaly mode on)
    import torch

    torch.autograd.set_detect_anomaly(False)
