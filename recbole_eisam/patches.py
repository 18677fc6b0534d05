"""Fixes that let RecBole 1.2.1 run on the dependency set pinned in setup.cfg, in one place.

:func:`apply` (run by ``import recbole_eisam``, idempotent) installs them:

* **NumPy 2.** ``Config.compatibility_settings`` re-creates the removed aliases ``np.float``
  ... from ``np.float_`` ..., which NumPy 2 removed as well, so building any ``Config``
  raises; ``recbole.evaluator.metrics`` (``NDCG``, ``MAP``, ``MRR``...) still calls
  ``np.float`` and ``np.bool``. The aliases are restored with their NumPy-2 meanings and
  ``compatibility_settings`` becomes a no-op.
* **Anomaly mode.** Importing ``recbole.model.sequential_recommender`` (which
  ``recbole.utils.get_model`` does) runs ``torch.autograd.set_detect_anomaly(True)`` from
  ``sine.py``, slowing every backward pass of every model; it is switched back off.
* **Processes racing for a folder.** ``recbole.utils.ensure_dir`` checks that a folder is
  missing, then creates it, so two processes started together both see ``./log`` missing
  and the second one's ``os.makedirs`` raises; it becomes ``os.makedirs(..., exist_ok=True)``
  in every RecBole module that imported it.
* **Distributed mode on CPUs.** ``Config._init_device`` starts the process group whenever
  the configuration has a ``local_rank``, always with NCCL on ``cuda:<local_rank>``, which
  fails on a machine without GPUs; :func:`init_device` uses NCCL on GPUs and gloo on CPU
  (``dist_backend`` overrides), and keeps an already initialised process group.
* **Plugin defaults.** ``Config`` reads a model's defaults from RecBole's own
  ``properties/model/<Model>.yaml`` only; it also reads this package's
  ``properties/eisam.yaml`` (the trainer family's keys) and ``properties/model/<Model>.yaml``
  for this package's models, as the lowest layer, so ``Config(model="LLMRec", ...)`` without
  any of our files gets the documented defaults.
* **Values as code.** ``Config`` turns every string value of ``config_dict`` into a value
  with ``eval`` (``--eisam_rho=9**9**9`` would compute for hours); :func:`_convert_config_dict`
  reads literals only (:func:`recbole_eisam.cli.literal_value`), the same values without
  running anything.
* **Console noise.** RecBole's dataset code (``recbole.data.dataset.dataset``) calls pandas
  in ways pandas 2.2 deprecates, which prints screens of ``FutureWarning`` on every run;
  exactly those (that module, that category) are ignored, every other warning still shows.
"""

import importlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist

from recbole_eisam import defaults
from recbole_eisam.cli import literal_value

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

# the RecBole modules that bind ``ensure_dir`` by name (``from recbole.utils import ensure_dir``)
_ENSURE_DIR_MODULES = (
    "recbole.utils.utils",
    "recbole.utils",
    "recbole.utils.logger",
    "recbole.data.utils",
    "recbole.data.dataset.dataset",
    "recbole.trainer.trainer",
)

_recbole = {}  # the replaced RecBole functions, by name


def _compatibility_settings(self):  # replaces Config.compatibility_settings
    """NumPy aliases are restored once by :func:`apply`."""


def _ensure_dir(dir_path):  # replaces recbole.utils.ensure_dir
    """Create ``dir_path`` (and its parents) unless it exists; safe when processes race."""
    os.makedirs(dir_path, exist_ok=True)


def _load_internal_config_dict(self, model, model_class, dataset):  # wraps Config's
    """RecBole's internal layer, then this package's trainer keys and model file beneath the user's."""
    _recbole["_load_internal_config_dict"](self, model, model_class, dataset)
    for path in (os.path.join(defaults.PROPERTIES_DIR, "eisam.yaml"), defaults.model_file(model)):
        if path is not None and os.path.isfile(path):
            self._update_internal_config_dict(path)


def _convert_config_dict(self, config_dict):  # replaces Config._convert_config_dict
    """String values as the literals they spell; nothing is evaluated."""
    for key, value in config_dict.items():
        if isinstance(value, str):
            config_dict[key] = literal_value(value)
    return config_dict


def init_device(self):  # replaces Config._init_device
    """Device and process group of this process: RecBole's own without ``local_rank``."""
    cfg = self.final_config_dict
    if "local_rank" not in cfg:
        return _recbole["_init_device"](self)
    gpu_id = cfg["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    cfg["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    rank, local_rank = cfg["local_rank"] + (cfg.get("offset") or 0), cfg["local_rank"]
    use_cuda = bool(cfg.get("use_gpu", True)) and len(gpu_id) > 0 and torch.cuda.is_available()
    backend = cfg.get("dist_backend") or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        init_method = cfg.get("dist_init_method") or f"tcp://{cfg['ip']}:{cfg['port']}"  # env:// under torchrun
        dist.init_process_group(backend=backend, rank=rank, world_size=cfg["world_size"], init_method=init_method)
    if use_cuda:
        cfg["device"] = torch.device("cuda", local_rank)
        torch.cuda.set_device(local_rank)
    else:
        cfg["device"] = torch.device("cpu")
    cfg["single_spec"] = False
    if local_rank != 0:  # as RecBole: one process reports
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


def _replace(owner, name, new):
    """``owner.name = new``, remembering RecBole's own the first time."""
    current = getattr(owner, name)
    if current is not new:
        _recbole[name] = current
        setattr(owner, name, new)


def apply():
    """Install every fix of the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.data\.dataset\.dataset")
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    from recbole.config import Config

    Config.compatibility_settings = _compatibility_settings
    _replace(Config, "_load_internal_config_dict", _load_internal_config_dict)
    _replace(Config, "_init_device", init_device)
    _replace(Config, "_convert_config_dict", _convert_config_dict)
    for module_name in _ENSURE_DIR_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = _ensure_dir
    importlib.import_module("recbole.model.sequential_recommender")  # its sine.py turns anomaly mode on
    torch.autograd.set_detect_anomaly(False)
