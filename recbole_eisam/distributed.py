"""RecBole's distributed mode on CPUs too: gloo where RecBole 1.2.1 hardcodes NCCL.

RecBole's ``Config._init_device`` starts the process group whenever the configuration has
a ``local_rank`` (set for each process by ``quick_start.run(nproc=N)``), always with NCCL on
``cuda:<local_rank>``, which fails on a machine without GPUs. :func:`init_device` replaces
it: NCCL on GPUs as before, gloo on CPU (``dist_backend`` overrides the choice), and an
already initialised process group is kept. Without ``local_rank`` it is RecBole's own.

``compat.apply`` (run by ``import recbole_eisam``) installs it.
"""

import os

import torch
import torch.distributed as dist

_recbole_init_device = None


def init_device(self):  # replaces Config._init_device
    """Device and process group of this process (see the module docstring)."""
    cfg = self.final_config_dict
    if "local_rank" not in cfg:
        return _recbole_init_device(self)
    gpu_id = cfg["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    cfg["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    rank, local_rank = cfg["local_rank"] + (cfg.get("offset") or 0), cfg["local_rank"]
    use_cuda = bool(cfg.get("use_gpu", True)) and len(gpu_id) > 0 and torch.cuda.is_available()
    backend = cfg.get("dist_backend") or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=cfg["world_size"],
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
        )
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


def install():
    """Put :func:`init_device` in place of ``Config._init_device`` (idempotent)."""
    global _recbole_init_device
    from recbole.config import Config

    if Config._init_device is not init_device:
        _recbole_init_device = Config._init_device
        Config._init_device = init_device
