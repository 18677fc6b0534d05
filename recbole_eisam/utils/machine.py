"""What a measurement ran on, in words, for benchmark rows and speed reports."""

import os
import platform


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


def machine_description(device=None):
    """``"<CPU or GPU name>, <n> cores, torch <version>"``: two CPUs of one family can give
    different numbers for the same run (different kernels), so every result row names its machine."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"
