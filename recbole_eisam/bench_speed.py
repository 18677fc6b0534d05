"""Training-step speed and memory of erm, sam and eisam (scope all / head), in one process.

    python -m recbole_eisam.bench_speed --model=LLMRec --dataset=ml-100k --steps=20
    python -m recbole_eisam.bench_speed --model=SASRec --dataset=ml-100k --steps=20 --rounds=2
    python -m recbole_eisam.bench_speed --model=SASRec --dataset=tiny --data_path=DIR --steps=2

Options: ``--steps=N`` timed steps per method and round (default 20), ``--warmup=K``
untimed steps before them (default 2), ``--rounds=R`` repetitions of the whole method
sequence, in alternating order to even out drift (default 1), ``--methods=erm,sam,...``
(default ``erm,sam,eisam_all,eisam_head``; also ``imbsam``, ``reweight``, ``logit_adjust``,
``eisam``), ``--threads=T`` (``torch.set_num_threads``; on a CPU shared with other jobs
``--threads=1`` avoids the stalls of oversubscribed parallel kernels, which can slow small
models many times over), ``--no_eval`` (skip the evaluation timing), ``--result_file=PATH``
(the JSON also written there), ``--debug``. Any other ``--key=value`` is a config override, and
``--config_files`` adds YAML files, as for ``run_recbole_eisam.py``.

How it measures. Config, dataset, dataloaders and model are built once (as
:func:`recbole_eisam.quick_start.run` does). The first ``(warmup + steps) *
gradient_accumulation_steps`` training batches are taken once, moved to the device and
grouped into steps, so every method runs the very same steps. One untimed erm step runs
first, so that one-time costs (thread pools, kernel caches) are charged to no method. For
each method (all of them, ``--rounds`` times, every other round in reverse order) the model is
reset to the same initial trainable weights, the RNGs are re-seeded, a fresh
:class:`~recbole_eisam.trainer.EISAMTrainer` (fresh optimizer) is built with that method's
``train_method`` / ``eisam_scope``, and ``trainer._step`` (the trainer's own optimizer step)
runs the warm-up steps and then the timed ones, each timed with ``time.perf_counter``
(after ``torch.cuda.synchronize`` on a GPU). Data loading is not part of a step's time.

Reported, per method:

* ``seconds_per_step``: the median over all timed steps (all rounds); ``ratio_to_erm``.
* ``tokens_per_s`` (models with ``build_prompts``, i.e. LLMRec): real (non-padding) prompt
  tokens of the training batches per second of training, each prompt counted once per step.
* Memory, on CPU: ``peak_memory_bytes`` is the peak RSS while the method ran (the kernel's
  high-water mark, reset before each method through ``/proc/self/clear_refs``),
  ``peak_memory_delta_bytes`` that peak minus the RSS just before the method's first step
  (optimizer state, activations, the method's own buffers) and ``extra_memory_vs_erm_bytes``
  the difference of that delta to erm's. On a GPU the same from
  ``torch.cuda.max_memory_allocated``. Measured RSS is noisy at the MiB scale; the exact
  figure is ``perturbation_state_bytes``: the tensors the step keeps for the perturbation,
  one copy of the trainable parameters (theta, restored after the perturbed pass) and one
  gradient (g_w) for ``all``, the head's g_w and its perturbed copy for ``head``. Neither
  ever copies frozen weights (an LLM backbone): compare ``params.trainable`` with
  ``params.total``.

And once: ``eval_users_per_s``, the test users scored per second by RecBole's full
evaluation (``trainer.evaluate(test_data, load_best_model=False)``, all metrics included).

The output is a table, then, as the last line of stdout, one JSON object with all numbers.
"""

import ctypes
import gc
import json
import math
import os
import re
import resource
import statistics
import sys
import time

from recbole_eisam.cli import build_parser, config_files_option, main_guard, parse_overrides
from recbole_eisam.errors import EISAMError
from recbole_eisam.methods import TRAIN_METHODS
from recbole_eisam.utils.machine import device_name

#: method name -> config overrides that select it: every train_method, and EISAM in both scopes
METHODS = {
    **{name: {"train_method": name} for name in TRAIN_METHODS},
    "eisam_all": {"train_method": "eisam", "eisam_scope": "all"},
    "eisam_head": {"train_method": "eisam", "eisam_scope": "head"},
}
DEFAULT_METHODS = ("erm", "sam", "eisam_all", "eisam_head")
MiB = 1024.0 * 1024.0


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
        import torch

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
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            peak = hwm * 1024 if hwm is not None else process_peak_rss_bytes()
            if not self.resettable or self.base is None:
                return peak, None
        return peak, peak - self.base


# --------------------------------------------------------------------------- set-up
def _param_stats(model):
    """Parameter counts and bytes: total, trainable and (if the model has one) the head."""
    from recbole_eisam.trainer.losses import get_head_split, head_split_reason

    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = [p for p in params.values() if p.requires_grad]
    stats = {
        "total": total,
        "trainable": sum(p.numel() for p in trainable),
        "total_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "head": None,
        "head_bytes": None,
    }
    if head_split_reason(model) is None:
        head = [params[name] for name in get_head_split(model).head_names]
        stats["head"] = sum(p.numel() for p in head)
        stats["head_bytes"] = sum(p.numel() * p.element_size() for p in head)
    return stats


def perturbation_state_bytes(settings, params):
    """Bytes of the tensors a step keeps for the perturbation (see the module docstring)."""
    lam = settings["eisam_lambda"]
    if lam is not None and lam == 0:
        return 0
    if settings["eisam_scope"] == "head" and params["head_bytes"] is not None:
        return 2 * params["head_bytes"]  # g_w on the head + the perturbed head tensors
    return 2 * params["trainable_bytes"]  # saved theta + g_w, trainable tensors only


def _fixed_steps(train_data, n_steps, accumulation, device):
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


def _prompt_tokens(model, group):
    """``(real, padded)`` prompt tokens of one step's batches, or ``None`` without prompts."""
    import torch

    if not hasattr(model, "build_prompts"):
        return None
    real = padded = 0
    with torch.no_grad():
        for interaction in group:
            input_ids, attention_mask, _ = model.build_prompts(
                interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
            )
            real += int(attention_mask.sum())
            padded += int(input_ids.numel())
    return real, padded


class _TrainableSnapshot:
    """The trainable parameters and the buffers of a model, to reset it between methods
    (frozen parameters never change in training and are not copied)."""

    def __init__(self, model):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def restore(self, model):
        import torch

        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for name, value in self.params.items():
                params[name].copy_(value)
                params[name].grad = None
            for name, value in self.buffers.items():
                buffers[name].copy_(value)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- one method
def _make_trainer(config, model, train_dataset, overrides):
    """A fresh trainer (fresh optimizer) for ``model`` with ``overrides`` applied to ``config``
    while it is built (the trainer reads its settings then); ``config`` is left unchanged."""
    from recbole_eisam.quick_start import trainer_class

    saved = {key: (config[key] if key in config else None) for key in overrides}
    try:
        for key, value in overrides.items():
            config[key] = value
        trainer = trainer_class(config)(config, model)
    finally:
        for key, value in saved.items():
            config[key] = value
    if getattr(trainer, "logits_fn", None) is None:
        _close(trainer)
        raise EISAMError(
            f"Model '{config['model']}' gives no per-sample losses, so the EISAM trainer "
            "cannot run its step for it (see recbole_eisam.trainer.losses)."
        )
    trainer.setup_item_weights(train_dataset)
    return trainer


def _close(trainer):
    writer = getattr(trainer, "tensorboard", None)
    if writer is not None:
        writer.close()


def time_method(trainer, steps, warmup, probe):
    """Run ``warmup`` then the remaining steps of ``steps``; ``(seconds per timed step, peak, delta)``."""
    import torch

    device = trainer.device
    scaler = torch.amp.GradScaler("cuda", enabled=trainer.enable_scaler)
    trainer.model.train()
    probe.start()
    for group in steps[:warmup]:
        trainer._step(group, scaler)
    times = []
    for group in steps[warmup:]:
        _sync(device)
        start = time.perf_counter()
        trainer._step(group, scaler)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak, delta = probe.stop()
    return times, peak, delta


def time_evaluation(trainer, train_data, test_data):
    """``(users, seconds)`` of RecBole's full evaluation of ``test_data``."""
    device = trainer.device
    trainer.eval_collector.data_collect(train_data)  # what fit() does first (item counts, ...)
    _sync(device)
    start = time.perf_counter()
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    _sync(device)
    return int(test_data.sample_size), time.perf_counter() - start


# --------------------------------------------------------------------------- the benchmark
def _finite(value):
    return value is not None and math.isfinite(value)


def _ratio(value, base):
    return value / base if _finite(value) and _finite(base) and base > 0 else None


def bench(
    model_name,
    dataset_name,
    config_file_list=None,
    config_dict=None,
    steps=20,
    warmup=2,
    rounds=1,
    methods=DEFAULT_METHODS,
    evaluate=True,
    threads=None,
):
    """Time the training step of each method on identical model states and batches.

    Returns:
        dict: the JSON object printed by the command line (see the module docstring).
    """
    import torch

    if steps < 1 or warmup < 0 or rounds < 1:
        raise EISAMError(f"Need steps >= 1, warmup >= 0 and rounds >= 1, got {steps}, {warmup}, {rounds}.")
    if threads is not None and threads < 1:
        raise EISAMError(f"Need threads >= 1, got {threads}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EISAMError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    methods = ["erm"] + [m for m in dict.fromkeys(methods) if m != "erm"]  # erm: the reference
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(model_name, dataset_name, config_file_list, config_dict, steps, warmup, rounds, methods, evaluate)
    finally:
        torch.set_num_threads(default_threads)  # the process's setting, for whatever runs next


def setup(model_name, dataset_name, config_file_list, config_dict, n_steps):
    """Config, data and model as :func:`recbole_eisam.quick_start.run` builds them, plus the
    first ``n_steps`` training steps' batches (on the device) and a snapshot of the weights.

    Returns:
        tuple: ``(config, model, train_data, test_data, groups, snapshot)``.
    """
    from recbole.data import data_preparation
    from recbole.utils import get_model, init_seed

    from recbole_eisam.quick_start import build_dataset, load_config

    config = load_config(model_name, dataset_name, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = build_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    snapshot = _TrainableSnapshot(model)
    init_seed(config["seed"], config["reproducibility"])
    accumulation = int(config["gradient_accumulation_steps"] or 1)
    groups = _fixed_steps(train_data, n_steps, accumulation, config["device"])
    return config, model, train_data, test_data, groups, snapshot


def _bench(model_name, dataset_name, config_file_list, config_dict, steps, warmup, rounds, methods, evaluate):
    import torch
    from recbole.utils import init_seed

    config, model, train_data, test_data, groups, snapshot = setup(
        model_name, dataset_name, config_file_list, config_dict, warmup + steps
    )
    device = config["device"]
    params = _param_stats(model)
    accumulation = int(config["gradient_accumulation_steps"] or 1)
    timed = groups[warmup:]
    samples_per_step = statistics.mean(sum(len(b) for b in g) for g in timed)
    tokens = [_prompt_tokens(model, g) for g in timed]
    tokens_per_step = None if tokens[0] is None else statistics.mean(t[0] for t in tokens)
    padded_per_step = None if tokens[0] is None else statistics.mean(t[1] for t in tokens)

    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' jobs skew CPU timings
    probe = MemoryProbe(device)
    # one untimed erm step first: lazy one-time costs (thread pools, kernel caches, allocator
    # arenas) are then paid by no method, not by whichever happens to run first
    trainer = _make_trainer(config, model, train_data.dataset, METHODS["erm"])
    try:
        model.train()
        trainer._step(groups[0], torch.amp.GradScaler("cuda", enabled=trainer.enable_scaler))
    finally:
        _close(trainer)
    del trainer
    times = {m: [] for m in methods}
    peaks, deltas, state_bytes, errors = {}, {}, {}, {}
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for name in order:
            if name in errors:
                continue
            snapshot.restore(model)
            init_seed(config["seed"], config["reproducibility"])
            try:
                trainer = _make_trainer(config, model, train_data.dataset, METHODS[name])
            except (ValueError, EISAMError) as err:
                if name == "erm":
                    raise
                errors[name] = str(err).strip()
                continue
            try:
                state_bytes[name] = perturbation_state_bytes(trainer.settings, params)
                step_times, peak, delta = time_method(trainer, groups, warmup, probe)
            finally:
                trainer.optimizer.zero_grad(set_to_none=True)
                _close(trainer)
            del trainer
            times[name].extend(step_times)
            peaks[name] = max(peaks.get(name, 0), peak)
            if delta is not None:
                deltas[name] = max(deltas.get(name, delta), delta)

    eval_users = eval_seconds = None
    if evaluate:
        snapshot.restore(model)
        init_seed(config["seed"], config["reproducibility"])
        trainer = _make_trainer(config, model, train_data.dataset, METHODS["erm"])
        try:
            eval_users, eval_seconds = time_evaluation(trainer, train_data, test_data)
        finally:
            _close(trainer)

    seconds = {m: (statistics.median(times[m]) if times[m] else None) for m in methods}
    erm = seconds["erm"]
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "batch_size": int(config["train_batch_size"]),
        "gradient_accumulation_steps": accumulation,
        "samples_per_step": samples_per_step,
        "methods": methods,
        "seconds_per_step": seconds,
        "ratio_to_erm": {m: _ratio(seconds[m], erm) for m in methods if m != "erm"},
        "step_seconds": {m: times[m] for m in methods},
        "tokens_per_step": tokens_per_step,
        "padded_tokens_per_step": padded_per_step,
        "tokens_per_s": None
        if tokens_per_step is None
        else {m: (tokens_per_step / seconds[m] if _finite(seconds[m]) and seconds[m] > 0 else None) for m in methods},
        "samples_per_s": {m: (samples_per_step / seconds[m] if _finite(seconds[m]) and seconds[m] > 0 else None) for m in methods},
        "eval_users": eval_users,
        "eval_seconds": eval_seconds,
        "eval_users_per_s": eval_users / eval_seconds if eval_seconds else None,
        "memory_kind": probe.kind,
        "peak_memory_bytes": {m: peaks.get(m) for m in methods},
        "peak_memory_delta_bytes": {m: deltas.get(m) for m in methods},
        "extra_memory_vs_erm_bytes": {
            m: (deltas[m] - deltas["erm"] if m in deltas and "erm" in deltas else None) for m in methods
        },
        "perturbation_state_bytes": {m: state_bytes.get(m) for m in methods},
        "params": params,
        "process_peak_rss_bytes": process_peak_rss_bytes(),
    }
    if errors:
        result["errors"] = errors
    return result


# --------------------------------------------------------------------------- output
def _fmt(value, spec, scale=None):
    if value is None:
        return "-"
    return format(value if scale is None else value / scale, spec)


def format_table(result):
    """The human-readable summary of :func:`bench`'s result."""
    p = result["params"]
    share = 100.0 * p["trainable"] / max(p["total"], 1)
    lines = [
        f"bench_speed: {result['model']} on {result['dataset']}, device {result['device']} "
        f"({result['device_name']}, {result['torch_threads']} threads, load {_fmt(result['load_average_1min'], '.2f')} "
        f"on {result['cpu_count']} CPUs), batch {result['batch_size']} "
        f"x {result['gradient_accumulation_steps']} micro-batch(es), {result['warmup']} warm-up + "
        f"{result['steps']} timed steps x {result['rounds']} round(s)",
        f"parameters: total {p['total']:,}, trainable {p['trainable']:,} ({share:.2f}%, "
        f"{p['trainable_bytes'] / MiB:.2f} MiB), head {'-' if p['head'] is None else format(p['head'], ',')}",
    ]
    if result["tokens_per_step"] is not None:
        lines.append(
            f"prompt tokens per step: {result['tokens_per_step']:.0f} real, "
            f"{result['padded_tokens_per_step']:.0f} with padding"
        )
    mem = "RSS" if result["memory_kind"] == "rss" else "CUDA"
    header = (
        f"{'method':<13}{'s/step':>10}{'x erm':>8}{'samples/s':>11}{'tokens/s':>11}"
        f"{'peak ' + mem + ' MiB':>16}{'delta MiB':>11}{'vs erm MiB':>12}{'state MiB':>11}"
    )
    lines += ["", header, "-" * len(header)]
    tokens = result["tokens_per_s"] or {}
    for m in result["methods"]:
        ratio = 1.0 if m == "erm" else result["ratio_to_erm"].get(m)
        lines.append(
            f"{m:<13}{_fmt(result['seconds_per_step'][m], '.4f'):>10}{_fmt(ratio, '.2f'):>8}"
            f"{_fmt(result['samples_per_s'][m], '.1f'):>11}{_fmt(tokens.get(m), '.0f'):>11}"
            f"{_fmt(result['peak_memory_bytes'][m], '.1f', MiB):>16}"
            f"{_fmt(result['peak_memory_delta_bytes'][m], '.1f', MiB):>11}"
            f"{_fmt(result['extra_memory_vs_erm_bytes'][m], '.1f', MiB):>12}"
            f"{_fmt(result['perturbation_state_bytes'][m], '.2f', MiB):>11}"
        )
    for m, message in (result.get("errors") or {}).items():
        lines.append(f"{m}: not run: {message}")
    lines.append("")
    if result["eval_seconds"] is not None:
        lines.append(
            f"evaluation: {result['eval_users']} test users in {result['eval_seconds']:.2f} s = "
            f"{result['eval_users_per_s']:.1f} users/s (full ranking, RecBole's evaluate)"
        )
    lines.append(
        "delta = peak minus memory before the method's first step (optimizer state, activations, "
        "perturbation); state = tensors kept for the perturbation (trainable params only)"
    )
    return "\n".join(lines)


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


def main(argv):
    parser = timing_parser(__doc__.splitlines()[0], steps=20, unit="method")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {', '.join(METHODS)}"
    )
    parser.add_argument("--no_eval", action="store_true", help="skip the evaluation timing")
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)
    result = bench(
        args.model,
        args.dataset,
        config_file_list=config_files_option(args),
        config_dict=overrides,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        evaluate=not args.no_eval,
        threads=args.threads,
    )
    report(result, format_table(result), args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
