"""recbole_eisam.bench.speed through its command line, on the tiny dataset."""

import json
import math

import pytest
from test_llmrec import save_tiny_llama, tiny_llm_config

from recbole_eisam.bench.speed import main
from recbole_eisam.cli import main_guard

METHODS = ("erm", "sam", "eisam", "eisam_head")


def _argv(config_dict):
    return [f"--{key}={value!r}" for key, value in config_dict.items()]


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) > 1, "a table is printed before the JSON line"
    return json.loads(out[-1]), "\n".join(out[:-1])


def _check_speed(result, steps):
    for key in (
        "model", "device", "seconds_per_step", "ratio_to_erm", "tokens_per_s", "eval_users_per_s",
        "peak_memory_bytes", "extra_memory_vs_erm_bytes", "perturbation_state_bytes", "params",
        "steps", "batch_size",
    ):
        assert key in result
    assert result["steps"] == steps
    seconds = result["seconds_per_step"]
    assert set(seconds) == set(METHODS)
    for method in METHODS:
        value = seconds[method]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (method, value)
        assert len(result["step_seconds"][method]) == steps
        assert result["peak_memory_bytes"][method] > 0
    assert set(result["ratio_to_erm"]) == {"sam", "eisam", "eisam_head"}
    for method, ratio in result["ratio_to_erm"].items():
        assert ratio == pytest.approx(seconds[method] / seconds["erm"], rel=1e-12)
    assert result["eval_users"] > 0 and result["eval_users_per_s"] > 0
    for method in METHODS:  # an epoch at the timed pace
        expected = result["epoch_samples"] / result["samples_per_step"] * seconds[method]
        assert result["seconds_per_epoch"][method] == pytest.approx(expected)
    params = result["params"]
    assert 0 < params["head"] <= params["trainable"] <= params["total"]
    state = result["perturbation_state_bytes"]
    assert state["erm"] == 0
    assert state["sam"] == state["eisam"] == 2 * params["trainable_bytes"]
    assert state["eisam_head"] == 2 * params["head_bytes"]


def test_sasrec_speed_json_is_the_last_line(tiny_config_dict, capsys, tmp_path):
    result_file = tmp_path / "speed.json"
    argv = ["--model=SASRec", "--dataset=tiny", "--steps=2", "--warmup=1", "--threads=1", f"--result_file={result_file}"]
    assert main(argv + _argv(tiny_config_dict)) == 0
    result, table = _last_json(capsys)
    _check_speed(result, steps=2)
    assert result["model"] == "SASRec" and result["device"] == "cpu"
    assert result["batch_size"] == tiny_config_dict["train_batch_size"]
    assert result["tokens_per_s"] is None  # no text prompts
    assert json.loads(result_file.read_text())["seconds_per_step"] == result["seconds_per_step"]
    for method in METHODS:
        assert method in table
    assert "users/s" in table


def test_llmrec_speed_reports_tokens_and_frozen_backbone(tiny_config_dict, capsys, tmp_path):
    llm = save_tiny_llama(tmp_path / "tiny_llama")
    config = tiny_llm_config(tiny_config_dict, llm, tmp_path / "llm_cache")
    argv = ["--model=LLMRec", "--dataset=tiny", "--steps=2", "--warmup=1", "--threads=1"]
    assert main(argv + _argv(config)) == 0
    result, table = _last_json(capsys)
    _check_speed(result, steps=2)
    assert result["tokens_per_step"] > 0
    for method in METHODS:
        assert result["tokens_per_s"][method] > 0
    params = result["params"]
    assert params["trainable"] < params["total"]  # the frozen LLM is never part of the state
    assert "prompt tokens per step" in table


def test_bad_options_are_one_line_errors(tiny_config_dict, capsys):
    argv = ["--model=SASRec", "--dataset=tiny", "--steps=0"] + _argv(tiny_config_dict)
    assert main_guard(main, argv) == 2
    assert "steps >= 1" in capsys.readouterr().err
    argv = ["--model=SASRec", "--dataset=tiny", "--methods=erm,nope"] + _argv(tiny_config_dict)
    assert main_guard(main, argv) == 2
    assert "nope" in capsys.readouterr().err


def test_llmrecgen_speed_counts_prompt_and_target_tokens_and_refuses_head_scope(tiny_config_dict, capsys, tmp_path):
    from test_llmrec_gen import save_tiny_causal_llama

    llm = save_tiny_causal_llama(tmp_path / "tiny_causal_llama")
    config = tiny_llm_config(tiny_config_dict, llm, tmp_path / "llm_cache", gen_end_token="\n", num_beams=10)
    for key in ("item_prompt_template", "projection_size", "head_dropout"):  # LLMRec's keys
        config.pop(key)
    argv = ["--model=LLMRecGen", "--dataset=tiny", "--steps=2", "--warmup=1", "--threads=1"]
    assert main(argv + _argv(config)) == 0
    result, table = _last_json(capsys)
    seconds = result["seconds_per_step"]
    assert all(seconds[m] > 0 for m in ("erm", "sam", "eisam"))
    assert seconds["eisam_head"] is None or not math.isfinite(seconds["eisam_head"])
    assert "eisam_scope=head" in result["errors"]["eisam_head"]
    assert result["tokens_per_step"] > 0 and all(result["tokens_per_s"][m] > 0 for m in ("erm", "sam", "eisam"))
    assert result["eval_users"] > 0 and result["eval_users_per_s"] > 0
