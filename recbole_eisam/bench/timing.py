"""What the speed benchmarks share: the same steps for every method, fresh trainers, timers
and memory probes, and the output (a table, then one JSON line).

Memory on CPU is the RSS high-water mark, reset before each block of work through
``/proc/self/clear_refs``; on a GPU ``torch.cuda.max_memory_allocated``.
"""

import ctypes
import gc
import json
import os
import re
import resource
import sys
import time

import torch
from recbole.utils import get_model, init_seed

from recbole_eisam.cli import build_parser
from recbole_eisam.errors import EISAMError
from recbole_eisam.quick_start import build_dataset, load_config
from recbole_eisam.registry import trainer_class
from recbole_eisam.utils.windows import prepare_data


# --------------------------------------------------------------------------- memory
def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_rss_peak():
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS starts low
    except (OSError, AttributeError):
        pass


def process_peak_rss_bytes():
    """The process's peak RSS since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class MemoryProbe:
    """Peak memory of one block of work: RSS on CPU, ``max_memory_allocated`` on CUDA."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "rss"

    def start(self):
        _release_free_memory()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.resettable = True
        else:
            self.resettable = _reset_rss_peak()
            rss = _proc_status_kib("VmRSS")
            self.base = None if rss is None else rss * 1024

    def stop(self):
        """``(peak bytes, peak minus the start, or None when the peak could not be reset)``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            peak = hwm * 1024 if hwm is not None else process_peak_rss_bytes()
            if not self.resettable or self.base is None:
                return peak, None
        return peak, peak - self.base


# --------------------------------------------------------------------------- the steps and the model
def fixed_steps(train_data, n_steps, accumulation, device):
    """``n_steps`` lists of ``accumulation`` training batches each, on ``device``."""
    needed = n_steps * accumulation
    batches = []
    while len(batches) < needed:
        before = len(batches)
        for interaction in train_data:
            batches.append(interaction.to(device))
            if len(batches) == needed:
                break
        if len(batches) == before:
            raise EISAMError("The training split is empty: there is no batch to time.")
    return [batches[i : i + accumulation] for i in range(0, needed, accumulation)]


class TrainableSnapshot:
    """The trainable parameters and the buffers of a model, to reset it between methods
    (frozen parameters never change in training and are not copied)."""

    def __init__(self, model):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def restore(self, model):
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for name, value in self.params.items():
                params[name].copy_(value)
                params[name].grad = None
            for name, value in self.buffers.items():
                buffers[name].copy_(value)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- one method
def make_trainer(config, model, train_dataset, overrides):
    """A fresh trainer (fresh optimizer) for ``model`` with ``overrides`` applied to ``config``
    while it is built (the trainer reads its settings then); ``config`` is left unchanged."""
    saved = {key: (config[key] if key in config else None) for key in overrides}
    try:
        for key, value in overrides.items():
            config[key] = value
        trainer = trainer_class(config)(config, model)
    finally:
        for key, value in saved.items():
            config[key] = value
    if getattr(trainer, "losses_fn", None) is None:
        close_trainer(trainer)
        raise EISAMError(
            f"Model '{config['model']}' gives no per-sample losses, so the EISAM trainer "
            "cannot run its step for it (see recbole_eisam.trainer.losses)."
        )
    trainer.setup_item_weights(train_dataset)
    return trainer


def close_trainer(trainer):
    writer = getattr(trainer, "tensorboard", None)
    if writer is not None:
        writer.close()


def time_method(trainer, steps, warmup, probe):
    """Run ``warmup`` then the remaining steps of ``steps``; ``(seconds per timed step, peak, delta)``."""
    device = trainer.device
    scaler = torch.amp.GradScaler("cuda", enabled=trainer.enable_scaler)
    trainer.model.train()
    probe.start()
    for group in steps[:warmup]:
        trainer._step(group, scaler)
    times = []
    for group in steps[warmup:]:
        sync(device)
        start = time.perf_counter()
        trainer._step(group, scaler)
        sync(device)
        times.append(time.perf_counter() - start)
    peak, delta = probe.stop()
    return times, peak, delta


def setup(model_name, dataset_name, config_file_list, config_dict, n_steps):
    """Config, data and model as :func:`recbole_eisam.quick_start.run` builds them, plus the
    first ``n_steps`` training steps' batches (on the device) and a snapshot of the weights.

    Returns:
        tuple: ``(config, model, train_data, test_data, groups, snapshot)``.
    """
    config = load_config(model_name, dataset_name, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = build_dataset(config)
    train_data, _, test_data = prepare_data(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    snapshot = TrainableSnapshot(model)
    init_seed(config["seed"], config["reproducibility"])
    accumulation = int(config["gradient_accumulation_steps"] or 1)
    groups = fixed_steps(train_data, n_steps, accumulation, config["device"])
    return config, model, train_data, test_data, groups, snapshot


# --------------------------------------------------------------------------- output
def timing_parser(description, steps, unit):
    """The command-line parser of a timing benchmark: the usual options plus ``--steps``,
    ``--warmup``, ``--rounds``, ``--threads`` and ``--result_file``."""
    parser = build_parser(description)
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps per {unit} and round (default {steps})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions, every other one in reverse order (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--result_file", default=None, help="also write the JSON result to this path")
    return parser


def report(result, table, result_file=None):
    """Write ``result`` to ``result_file`` (if given), print ``table``, then ``result`` as the
    last line of stdout (one JSON object)."""
    if result_file:
        os.makedirs(os.path.dirname(os.path.abspath(result_file)), exist_ok=True)
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
    print(table)
    print(json.dumps(result), flush=True)
