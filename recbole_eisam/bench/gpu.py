"""The GPU check: LoRA training steps of a real-sized LLM inside LLMRec, in minutes, offline.

    python -m recbole_eisam.bench.gpu --arch=qwen2.5-0.5b --steps=10
    python -m recbole_eisam.bench.gpu --arch=llama-3.2-1b --steps=10 --result_file=gpu.json
    python -m recbole_eisam.bench.gpu --arch=tiny-llama --steps=2      # any CPU, in seconds

No weights are downloaded: the model is built with random weights from an architecture
written below (:data:`ARCHITECTURES`: the shapes of the public models, with their
vocabularies), saved with a character-level tokenizer to a temporary folder, and loaded by
LLMRec with ``properties/gpu.yaml`` (every layer, bf16 base weights on a GPU, LoRA r 16 on the
attention projections) on a synthetic catalog. Random weights time and size exactly like
trained ones.

It prints, for ERM, EISAM (all parameters) and EISAM (head scope): seconds per step, prompt
tokens per second, the achieved TFLOP/s of the work each step does (forward passes at
``2 N`` FLOPs per token and backward passes at ``2 N``: LoRA leaves the base weights
without gradients; ``N`` the decoder's non-embedding parameters, attention's ``T^2`` terms
added), the model FLOPs utilisation against ``--peak_tflops`` (by default the device's bf16
dense peak from :data:`PEAK_TFLOPS`), and the peak memory. Then it checks that one EISAM step
of a tiny float32 model, taken with plain SGD so that the change is the update itself, changes
the weights the same way on the GPU as on the CPU (largest difference, against ``1e-5``). The
last line of stdout is one JSON object.
"""

import os
import sys
import tempfile

import torch
from recbole.utils import init_seed

from recbole_eisam.bench.timing import (
    MemoryProbe,
    close_trainer,
    make_trainer,
    report,
    setup,
    sync,
    time_method,
    timing_parser,
)
from recbole_eisam.cli import config_files_option, main_guard, parse_overrides
from recbole_eisam.defaults import PROPERTIES_DIR
from recbole_eisam.errors import EISAMError
from recbole_eisam.methods import overrides as method_overrides
from recbole_eisam.utils.machine import device_name

#: architecture name -> (transformers config class, its keyword arguments)
ARCHITECTURES = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                          rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          rope_theta=500000.0, tie_word_embeddings=True)),
}
#: bf16 dense peak TFLOP/s of known devices (the first name contained in the device's name)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}
METHODS = ("erm", "eisam", "eisam_head")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer():
    """A character-level fast tokenizer (no files needed), with ``[PAD]``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def write_random_model(arch, folder, dtype=torch.float32, seed=0):
    """Save a randomly initialised base model of architecture ``arch`` and the tokenizer."""
    import transformers

    if arch not in ARCHITECTURES:
        raise EISAMError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}.")
    class_name, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, class_name)(pad_token_id=1, max_position_embeddings=4096, **kwargs)
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config).to(dtype).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder, config


def write_catalog(root, n_users=512, n_items=2000, per_user=24, seed=0):
    """A synthetic dataset ``catalog`` with titles: popularity-skewed sequences of ``n_items``."""
    generator = torch.Generator().manual_seed(seed)
    folder = os.path.join(root, "catalog")
    os.makedirs(folder, exist_ok=True)
    weights = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64) ** 0.8
    with open(os.path.join(folder, "catalog.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(n_users):
            items = torch.multinomial(weights, per_user, replacement=False, generator=generator)
            f.writelines(f"u{u}\ti{int(i)}\t{t}\n" for t, i in enumerate(items))
    with open(os.path.join(folder, "catalog.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\n")
        f.writelines(f"i{i}\tThe Item Number {i} of the Catalog\n" for i in range(n_items))
    return root


def step_flops(config, tokens, prompt_length, forward, backward):
    """FLOPs of ``forward`` forward and ``backward`` backward passes over ``tokens`` prompt tokens:
    ``2 N`` per token and pass for the decoder's ``N`` non-embedding parameters, plus attention's
    ``2 * 2 * L * d * T`` per token (scores and values) for prompts of ``T`` tokens."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    per_layer = d * d * 2 + 2 * d * kv * head_dim + 3 * d * config.intermediate_size
    dense = 2 * per_layer * layers
    attention = 4 * layers * d * prompt_length
    return (dense + attention) * tokens * (forward + backward)


#: (forward, backward) passes of the backbone per step
PASSES = {"erm": (1, 1), "eisam": (2, 3), "eisam_head": (1, 1)}


def eisam_step_change(where, tmp):
    """The weight change of one EISAM step of a tiny float32 LLMRec on device ``where`` ("cpu" or
    "cuda"), always from the same weights and batch. The optimizer is plain SGD, so the change is
    ``-lr * G``: Adam's first step would be ``-lr * sign(G)`` and hide any difference in ``G``."""
    folder, _ = write_random_model("tiny-llama", os.path.join(tmp, "model"))
    data = write_catalog(os.path.join(tmp, "data"), n_users=64, n_items=200, per_user=12)
    overrides = dict(_llmrec_config(folder, data, tmp), llm_dtype="float32", use_gpu=where == "cuda",
                     device=where, head_dropout=0.0, lora_dropout=0.0)
    config, model, train_data, _, groups, _ = setup("LLMRec", "catalog", None, overrides, 1)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(config, model, train_data.dataset, dict(method_overrides("eisam"), learner="sgd"))
    trainer._step(groups[0], torch.amp.GradScaler("cuda", enabled=False))
    change = {n: p.detach().cpu() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    close_trainer(trainer)
    return change


def cpu_cuda_agreement(device):
    """Largest difference between one EISAM step's weight change on the CPU and on ``device``
    (:func:`eisam_step_change`), or ``None`` without a CUDA device."""
    if device.type != "cuda":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cpu = eisam_step_change("cpu", os.path.join(tmp, "cpu"))
        cuda = eisam_step_change("cuda", os.path.join(tmp, "cuda"))
    return max(float((cpu[n] - cuda[n]).abs().max()) for n in cpu)


def _llmrec_config(folder, data_path, tmp):
    return {"llm_path": folder, "llm_gguf_file": None, "data_path": data_path, "checkpoint_dir": os.path.join(tmp, "saved"),
            "llm_cache_dir": os.path.join(tmp, "llm_cache"), "show_progress": False, "item_id_tokens": False,
            "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "item_text_fields": ["movie_title"],
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]}}


def bench(arch, steps=10, warmup=2, batch_size=None, config_file_list=None, config_dict=None, peak_tflops=None):
    """Time ERM and EISAM (both scopes) on ``arch``; returns the JSON object the command prints."""
    if steps < 1 or warmup < 0:
        raise EISAMError(f"Need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
    files = [os.path.join(PROPERTIES_DIR, "gpu.yaml")] + list(config_file_list or [])
    with tempfile.TemporaryDirectory() as tmp:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        folder, arch_config = write_random_model(arch, os.path.join(tmp, "model"), dtype)
        data = write_catalog(os.path.join(tmp, "data"))
        overrides = dict(_llmrec_config(folder, data, tmp), **(config_dict or {}))
        if batch_size:
            overrides["train_batch_size"] = int(batch_size)
        config, model, train_data, _, groups, snapshot = setup("LLMRec", "catalog", files, overrides, steps + warmup)
        device = config["device"]
        tokens = sum(int(model.build_prompts(b[model.ITEM_SEQ], b[model.ITEM_SEQ_LEN])[1].sum()) for b in groups[0])
        width = max(int(model.build_prompts(b[model.ITEM_SEQ], b[model.ITEM_SEQ_LEN])[1].size(1)) for b in groups[0])
        peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name(device)), None)
        result = {"arch": arch, "device": device_name(device), "dtype": str(dtype), "steps": steps,
                  "batch_size": int(config["train_batch_size"]), "prompt_tokens_per_step": tokens,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "peak_tflops": peak, "methods": {}}
        for method in METHODS:
            snapshot.restore(model)
            init_seed(config["seed"], config["reproducibility"])
            trainer = make_trainer(config, model, train_data.dataset, method_overrides(method))
            times, mem_peak, _ = time_method(trainer, groups, warmup, MemoryProbe(device))
            close_trainer(trainer)
            seconds = sorted(times)[len(times) // 2]
            flops = step_flops(arch_config, tokens, width, *PASSES[method])
            tflops = flops / seconds / 1e12
            result["methods"][method] = {
                "seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "achieved_tflops": tflops,
                "mfu": tflops / peak if peak else None, "peak_memory_bytes": mem_peak,
            }
        sync(device)
        result["cpu_cuda_max_abs_diff"] = cpu_cuda_agreement(device)
    return result


def format_table(result):
    lines = [f"bench.gpu: {result['arch']} in LLMRec on {result['device']} ({result['dtype']}), batch "
             f"{result['batch_size']}, {result['prompt_tokens_per_step']} prompt tokens per step, "
             f"{result['parameters']:,} parameters ({result['trainable']:,} trainable)",
             "", f"{'method':12}{'s/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}"]
    for method, r in result["methods"].items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{method:12}{r['seconds_per_step']:>10.4f}{r['tokens_per_s']:>12.0f}{r['achieved_tflops']:>10.2f}"
                     f"{mfu:>8}{r['peak_memory_bytes'] / 2**30:>10.2f}")
    diff = result["cpu_cuda_max_abs_diff"]
    lines.append("")
    lines.append("one EISAM step, CPU against CUDA: " + ("no CUDA device" if diff is None else
                 f"largest weight difference {diff:.2e} ({'within' if diff <= 1e-5 else 'OUTSIDE'} 1e-5)"))
    return "\n".join(lines)


def main(argv):
    parser = timing_parser(__doc__.splitlines()[0], steps=10, unit="method")
    parser.add_argument("--arch", default="qwen2.5-0.5b", help=f"one of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch_size", type=int, default=None, help="training sequences per step (default gpu.yaml's)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 peak (default: known devices)")
    args, extra = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args.arch, args.steps, args.warmup, args.batch_size, config_files_option(args),
                   parse_overrides(extra), args.peak_tflops)
    report(result, format_table(result), args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
