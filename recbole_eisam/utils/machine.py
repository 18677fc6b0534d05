"""What a measurement ran on, in words, for benchmark rows and speed reports."""

import os
import platform

import torch


def cpu_name():
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device):
    """The GPU's name for a CUDA device, else the CPU's."""

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_description():
    """``"<device name>, <n> cores, torch <version>"`` of the device RecBole's runs take (the
    GPU when one is visible): two CPUs of one family can give different numbers for the same
    run (different kernels), so every result row names its machine."""

    name = device_name("cuda" if torch.cuda.is_available() else "cpu")
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"
