"""The GPU check runs on any machine: a tiny architecture on the CPU, in seconds."""

import json



from recbole_eisam.bench import gpu
from recbole_eisam.cli import main_guard


def test_gpu_check_on_cpu_with_a_tiny_architecture(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    argv = ["--arch=tiny-llama", "--steps=2", "--warmup=1", "--batch_size=4", "--threads=1", f"--result_file={out}",
            "--max_history_items=3", "--max_item_tokens=8", "--use_gpu=False"]
    assert main_guard(gpu.main, argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result == json.loads(out.read_text())
    assert set(result["methods"]) == {"erm", "eisam", "eisam_head"}
    for r in result["methods"].values():
        assert r["seconds_per_step"] > 0 and r["tokens_per_s"] > 0 and r["achieved_tflops"] > 0
        assert r["mfu"] is None  # no known peak for a CPU, and none given
    assert result["cpu_cuda_max_abs_diff"] is None  # no CUDA device here
    assert result["trainable"] < result["parameters"]  # LoRA: the base stays frozen
    assert "one EISAM step, CPU against CUDA: no CUDA device" in "\n".join(printed)


def test_flops_of_a_step_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)
    # per layer: q, o (8x8 each), k, v (8x4 each), gate/up/down (8x16 each) = 128 + 64 + 384 = 576
    dense = 2 * 576 * 2  # 2 FLOPs per weight and token, 2 layers
    attention = 4 * 2 * 8 * 10  # scores and values over 10-token prompts
    assert gpu.step_flops(config, tokens=100, prompt_length=10, forward=2, backward=3) == (dense + attention) * 100 * 5


def test_unknown_architecture_is_one_sentence(capsys):
    assert main_guard(gpu.main, ["--arch=gpt-9"]) == 2
    assert "--arch must be one of tiny-llama, qwen2.5-0.5b, llama-3.2-1b" in capsys.readouterr().err


def test_the_cpu_cuda_check_compares_gradients_not_signs(tmp_path):
    """One EISAM step with plain SGD moves each weight by lr times its own gradient: the sizes of
    the changes vary, where Adam's first step moves almost every weight by lr itself (95% of them
    within 1% of the largest change, measured)."""
    import torch

    change = gpu.eisam_step_change("cpu", str(tmp_path))
    sizes = torch.cat([c.flatten() for c in change.values()]).abs()
    sizes = sizes[sizes > 0]
    assert sizes.numel() > 100
    assert float((sizes > 0.99 * sizes.max()).float().mean()) < 0.01
    again = gpu.eisam_step_change("cpu", str(tmp_path / "again"))
    assert all(torch.equal(change[n], again[n]) for n in change)
