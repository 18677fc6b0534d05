"""Before and after of each choice on LLMRec's fast path, measured in one process.

    python -m recbole_eisam.bench.fastpath --dataset=ml-100k --steps=10 --rounds=2
    python -m recbole_eisam.bench.fastpath --dataset=ml-100k --train_method=eisam

Each line compares the way a plain implementation does one thing ("before") with what
LLMRec does ("after"), on the same model, weights and batches:

* ``prompt_building``: a batch's prompts rendered as text and tokenized per batch (padded
  to the longest row) vs assembled from token ids cached once per item (ms per batch).
* ``padding``: every prompt padded to the longest possible one (prefix + ``max_history_items``
  x ``max_item_tokens`` + suffix) vs to the longest prompt of the batch (s per step).
* ``length_buckets``: each batch's prompts in one group padded to the longest vs in 4 groups
  of similar length, each padded to its own longest (``prompt_length_buckets``; s per step).
* ``attention``: eager attention vs PyTorch's scaled-dot-product attention (s per step).
* ``gradient_checkpointing``: off vs on (s per step and peak memory: memory for time).
* ``bf16_autocast``: float32 vs bfloat16 autocast of the forward pass (s per step).
* ``item_encodings``: encoding every item text with the frozen LLM vs reading the
  encodings back from the on-disk cache (s once per run).

Steps are the trainer's own (``train_method`` of the config, erm by default), timed as in
:mod:`recbole_eisam.bench.speed`: warm-up steps, then timed ones, the weights reset between
variants, and with ``--rounds`` every other round in reverse order; a step's figure is the
median. ``--changes=a,b`` picks lines; ``--threads``, ``--result_file``, ``--config_files``
and ``--key=value`` overrides work as in ``bench_speed``. The last line of stdout is one
JSON object: per change, ``before``, ``after``, ``unit``, ``after_over_before`` and
``default`` (the setting LLMRec uses unless told otherwise).
"""

import contextlib
import os
import statistics
import sys
import tempfile
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

#: change -> (before, after, unit); the "after" side is what LLMRec does by default,
#: except where ``DEFAULTS`` says otherwise
CHANGES = {
    "prompt_building": ("tokenizer per batch", "cached token ids", "ms/batch"),
    "padding": ("longest possible", "longest in batch", "s/step"),
    "length_buckets": ("one group", "4 length groups", "s/step"),
    "attention": ("eager", "sdpa", "s/step"),
    "gradient_checkpointing": ("off", "on", "s/step"),
    "bf16_autocast": ("float32", "bf16 autocast", "s/step"),
    "item_encodings": ("encode all items", "disk cache", "s/run"),
}
STEP_CHANGES = ("padding", "length_buckets", "attention", "gradient_checkpointing", "bf16_autocast")


def _base_model(model):
    backbone = model.backbone
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


@contextlib.contextmanager
def _fixed_width_prompts(model):
    """Pad every prompt to the longest possible prompt (what fixed-length batching does)."""
    builder = model.prompt_builder
    width = int(
        builder.prefix_ids.numel()
        + builder.max_history_items * builder.item_token_ids.size(1)
        + builder.suffix_ids.numel()
    )
    dynamic = builder.forward

    def fixed(*args, **kwargs):
        out = dynamic(*args, **kwargs)
        pad = width - out[0].size(1)
        if pad <= 0:
            return out
        grow = lambda t: torch.cat([t, t.new_zeros(t.size(0), pad)], dim=1)  # noqa: E731
        return (grow(out[0]), grow(out[1]), out[2]) + tuple(grow(t) for t in out[3:])

    builder.forward = fixed
    try:
        yield width
    finally:
        del builder.forward  # back to the class's method


@contextlib.contextmanager
def _setting(model, change, after):
    """The model in the ``after`` (True) or ``before`` (False) state of ``change``."""
    base = _base_model(model)
    if change == "padding":
        if after:
            yield
        else:
            with _fixed_width_prompts(model):
                yield
    elif change == "length_buckets":
        previous = model.prompt_length_buckets
        model.prompt_length_buckets = 4 if after else 1
        try:
            yield
        finally:
            model.prompt_length_buckets = previous
    elif change == "attention":
        previous = base.config._attn_implementation
        base.set_attn_implementation("sdpa" if after else "eager")
        try:
            yield
        finally:
            base.set_attn_implementation(previous)
    elif change == "gradient_checkpointing":
        previous = bool(getattr(base, "is_gradient_checkpointing", False))
        if after:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        try:
            yield
        finally:
            if previous:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_disable()
    else:  # bf16_autocast: a trainer setting, see _trainer_overrides
        yield


def _trainer_overrides(change, after):
    if change == "bf16_autocast":
        return dict(enable_amp=bool(after), amp_dtype="bfloat16", enable_scaler=False)
    return {}


def time_prompt_building(model, groups):
    """Median ms per batch of building the prompts: tokenizer per batch vs cached ids."""
    builder, tokenizer = model.prompt_builder, model.tokenizer
    prefix, suffix = model.prompt_template.split("{history}")
    texts = model.item_texts

    def naive(interaction):
        hist = builder.history(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]).tolist()
        prompts = [
            prefix + "".join(model.history_item_template.replace("{item}", texts[i]) for i in row if i) + suffix
            for row in hist
        ]
        enc = tokenizer(prompts, add_special_tokens=False, padding="longest", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def cached(interaction):
        return model.build_prompts(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])

    batches = [b for group in groups for b in group]
    out = {}
    with torch.no_grad():
        for name, fn in (("before", naive), ("after", cached)):
            fn(batches[0])  # warm-up
            times = []
            for interaction in batches:
                start = time.perf_counter()
                fn(interaction)
                times.append(time.perf_counter() - start)
            out[name] = 1000.0 * statistics.median(times)
    return out


def time_item_encodings(model):
    """Seconds to get every item's encoding: encoded with the frozen LLM vs read from the cache."""
    out = {}
    with tempfile.TemporaryDirectory() as fresh:
        cache_dir = model.llm_cache_dir
        try:
            for name, directory in (("before", fresh), ("after", fresh)):  # miss writes, hit reads
                model.llm_cache_dir = directory
                start = time.perf_counter()
                _, _, hit = model._item_encodings(model.item_encode_batch_size)
                out[name] = time.perf_counter() - start
                if hit != (name == "after"):
                    raise EISAMError("The item-encoding cache did not behave as expected (miss, then hit).")
        finally:
            model.llm_cache_dir = cache_dir
    return out


def bench_fastpath(dataset_name, config_file_list=None, config_dict=None, steps=10, warmup=2, rounds=1,
                   changes=tuple(CHANGES), threads=None, model_name="LLMRec"):
    """Measure each change of ``changes``; returns the JSON object the command line prints."""

    unknown = [c for c in changes if c not in CHANGES]
    if unknown:
        raise EISAMError(f"Unknown change(s) {', '.join(unknown)}; choose from {', '.join(CHANGES)}.")
    if steps < 1 or warmup < 0 or rounds < 1:
        raise EISAMError(f"Need steps >= 1, warmup >= 0 and rounds >= 1, got {steps}, {warmup}, {rounds}.")
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        config, model, train_data, _, groups, snapshot = setup(
            model_name, dataset_name, config_file_list, config_dict, warmup + steps
        )
        if not hasattr(model, "prompt_builder"):
            raise EISAMError(f"bench_fastpath measures LLMRec's prompt path; model '{config['model']}' has none.")
        device = config["device"]
        probe = MemoryProbe(device)
        results = {}
        for change in changes:
            if change == "prompt_building":
                measured, peaks = time_prompt_building(model, groups), {}
            elif change == "item_encodings":
                measured, peaks = time_item_encodings(model), {}
            else:
                times, peaks = {"before": [], "after": []}, {}
                for r in range(rounds):
                    for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                        after = side == "after"
                        snapshot.restore(model)
                        init_seed(config["seed"], config["reproducibility"])
                        trainer = make_trainer(config, model, train_data.dataset,
                                                _trainer_overrides(change, after))
                        try:
                            with _setting(model, change, after):
                                step_times, peak, _ = time_method(trainer, groups, warmup, probe)
                        finally:
                            trainer.optimizer.zero_grad(set_to_none=True)
                            close_trainer(trainer)
                        times[side].extend(step_times)
                        peaks[side] = max(peaks.get(side, 0), peak)
                measured = {side: statistics.median(t) for side, t in times.items()}
            before, after, unit = CHANGES[change]
            results[change] = {
                "before": measured["before"],
                "after": measured["after"],
                "unit": unit,
                "before_is": before,
                "after_is": after,
                "after_over_before": measured["after"] / measured["before"] if measured["before"] else None,
                "peak_memory_bytes": peaks or None,
                "default": _default(config, change),
            }
        snapshot.restore(model)
        sync(device)
        return {
            "model": config["model"],
            "dataset": config["dataset"],
            "device": str(device),
            "train_method": config["train_method"] or "erm",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "batch_size": int(config["train_batch_size"]),
            "memory_kind": probe.kind,
            "changes": results,
            "process_peak_rss_bytes": process_peak_rss_bytes(),
        }
    finally:
        torch.set_num_threads(default_threads)


def _default(config, change):
    """Which side LLMRec's configuration uses: "after", "before" or a word on what decides it."""
    if change == "gradient_checkpointing":
        return "after" if config["gradient_checkpointing"] else "before"
    if change == "bf16_autocast":
        return "after" if config["enable_amp"] else "before"
    if change == "attention":
        return "after" if (config["llm_attn_implementation"] or "sdpa") == "sdpa" else "before"
    if change == "length_buckets":
        return "after" if int(config["prompt_length_buckets"]) > 1 else "before"
    return "after"


def format_table(result):
    lines = [
        f"bench_fastpath: {result['model']} on {result['dataset']}, device {result['device']}, "
        f"{result['train_method']} steps of batch {result['batch_size']}, {result['torch_threads']} threads, "
        f"{result['warmup']} warm-up + {result['steps']} timed steps x {result['rounds']} round(s)",
        "",
    ]
    header = f"{'change':<24}{'before':<22}{'after':<20}{'unit':<10}{'before':>10}{'after':>10}{'after/before':>14}  default"
    lines += [header, "-" * len(header)]
    for change, r in result["changes"].items():
        ratio = "-" if r["after_over_before"] is None else f"{r['after_over_before']:.2f}"
        lines.append(
            f"{change:<24}{r['before_is']:<22}{r['after_is']:<20}{r['unit']:<10}"
            f"{r['before']:>10.4f}{r['after']:>10.4f}{ratio:>14}  {r['default']}"
        )
    for change, r in result["changes"].items():
        if r["peak_memory_bytes"]:
            mem = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in r["peak_memory_bytes"].items())
            lines.append(f"peak memory ({result['memory_kind']}) during {change}: {mem}")
    return "\n".join(lines)


def main(argv):
    parser = timing_parser(__doc__.splitlines()[0], steps=10, unit="variant")
    parser.add_argument("--changes", default=",".join(CHANGES), help=f"comma-separated, from {', '.join(CHANGES)}")
    args, extra = parser.parse_known_args(argv)
    result = bench_fastpath(
        args.dataset,
        config_file_list=config_files_option(args),
        config_dict=parse_overrides(extra),
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        changes=[c.strip() for c in args.changes.split(",") if c.strip()],
        threads=args.threads,
        model_name=args.model,
    )
    report(result, format_table(result), args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
