"""Training-step speed and memory of erm, sam and eisam (scope all / head), in one process.

    python -m recbole_eisam.bench.speed --model=LLMRec --dataset=ml-100k --steps=20
    python -m recbole_eisam.bench.speed --model=SASRec --dataset=ml-100k --steps=20 --rounds=2
    python -m recbole_eisam.bench.speed --model=SASRec --dataset=tiny --data_path=DIR --steps=2

Options: ``--steps=N`` timed steps per method and round (default 20), ``--warmup=K``
untimed steps before them (default 2), ``--rounds=R`` repetitions of the whole method
sequence, in alternating order to even out drift (default 1), ``--methods=erm,sam,...``
(default ``erm,sam,eisam,eisam_head``; any method of :data:`recbole_eisam.methods.METHODS`),
``--threads=T`` (``torch.set_num_threads``; on a CPU shared with other jobs
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

* ``seconds_per_step``: the median over all timed steps (all rounds); ``ratio_to_erm``;
  ``seconds_per_epoch``: a whole epoch of the training split at that pace (how a grid is
  sized before it runs).
* ``tokens_per_s`` (models with ``build_prompts``, i.e. LLMRec): real (non-padding) prompt
  tokens of the training batches per second of training, each prompt counted once per step;
  for LLMRecGen the prompt and the target title it is trained to write.
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

import math
import os
import statistics
import sys
import time

import torch
from recbole.utils import init_seed

from recbole_eisam.bench.timing import (
    MemoryProbe,
    close_trainer,
    make_trainer,
    process_peak_rss_bytes,
    report,
    setup,
    sync,
    time_method,
    timing_parser,
)
from recbole_eisam.cli import config_files_option, main_guard, parse_overrides
from recbole_eisam.errors import EISAMError
from recbole_eisam.methods import METHODS
from recbole_eisam.methods import overrides as method_overrides
from recbole_eisam.trainer.losses import get_head_split, head_split_reason
from recbole_eisam.utils.machine import device_name

DEFAULT_METHODS = ("erm", "sam", "eisam", "eisam_head")
MiB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- set-up
def _param_stats(model):
    """Parameter counts and bytes: total, trainable and (if the model has one) the head."""
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


def _prompt_tokens(model, group):
    """``(real, padded)`` prompt tokens of one step's batches, or ``None`` without prompts
    (a model that writes its targets counts them too: ``training_tokens``)."""
    if hasattr(model, "training_tokens"):
        with torch.no_grad():
            counts = [model.training_tokens(interaction) for interaction in group]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
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


# --------------------------------------------------------------------------- one method
def time_evaluation(trainer, train_data, test_data):
    """``(users, seconds)`` of RecBole's full evaluation of ``test_data``."""
    device = trainer.device
    trainer.eval_collector.data_collect(train_data)  # what fit() does first (item counts, ...)
    sync(device)
    start = time.perf_counter()
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    sync(device)
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


def _bench(model_name, dataset_name, config_file_list, config_dict, steps, warmup, rounds, methods, evaluate):

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
    trainer = make_trainer(config, model, train_data.dataset, method_overrides("erm"))
    try:
        model.train()
        trainer._step(groups[0], torch.amp.GradScaler("cuda", enabled=trainer.enable_scaler))
    finally:
        close_trainer(trainer)
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
                trainer = make_trainer(config, model, train_data.dataset, method_overrides(name))
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
                close_trainer(trainer)
            del trainer
            times[name].extend(step_times)
            peaks[name] = max(peaks.get(name, 0), peak)
            if delta is not None:
                deltas[name] = max(deltas.get(name, delta), delta)

    eval_users = eval_seconds = None
    if evaluate:
        snapshot.restore(model)
        init_seed(config["seed"], config["reproducibility"])
        trainer = make_trainer(config, model, train_data.dataset, method_overrides("erm"))
        try:
            eval_users, eval_seconds = time_evaluation(trainer, train_data, test_data)
        finally:
            close_trainer(trainer)

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
        "epoch_samples": int(train_data.sample_size),
        "seconds_per_epoch": {  # a whole epoch of the training split at the timed step's pace
            m: (train_data.sample_size / samples_per_step * seconds[m] if _finite(seconds[m]) else None) for m in methods
        },
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
    epoch = ", ".join(f"{m} {_fmt(result['seconds_per_epoch'][m], '.0f')} s" for m in result["methods"]
                      if result["seconds_per_epoch"].get(m) is not None)
    lines += ["", f"one whole epoch ({result['epoch_samples']:,} training sequences) at these paces: {epoch}"]
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
