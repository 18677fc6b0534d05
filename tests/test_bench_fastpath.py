"""recbole_eisam.bench.fastpath: each before / after pair computes the same thing, and the
command line prints one JSON line with every change."""

import json
import math

import pytest
import torch
from test_bench_speed import _argv, _last_json
from test_llmrec import build, first_batch, save_tiny_llama, tiny_llm_config

from recbole_eisam.bench import fastpath as bf
from recbole_eisam.cli import main_guard


@pytest.fixture
def llm_config(tiny_config_dict, tmp_path):
    llm = save_tiny_llama(tmp_path / "tiny_llama")
    return tiny_llm_config(tiny_config_dict, llm, tmp_path / "llm_cache")


@pytest.mark.parametrize("change", ["padding", "length_buckets", "attention", "gradient_checkpointing"])
def test_before_and_after_give_the_same_loss_and_restore_the_model(llm_config, change):
    model, (train, _, _), _ = build(dict(llm_config, item_id_tokens=True))
    model.eval()
    batch = first_batch(train)
    base = bf._base_model(model)
    attn, ckpt = base.config._attn_implementation, bool(base.is_gradient_checkpointing)
    buckets = model.prompt_length_buckets
    losses = {}
    for after in (False, True):
        with bf._setting(model, change, after):
            if change == "padding" and not after:
                ids, mask, _ = model.build_prompts(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
                builder = model.prompt_builder
                width = builder.prefix_ids.numel() + builder.max_history_items * builder.item_token_ids.size(1)
                assert ids.size(1) == width + builder.suffix_ids.numel() > int(mask.sum(1).max())
            if change == "length_buckets":
                assert model.prompt_length_buckets == (4 if after else 1)
            losses[after] = model.calculate_loss(batch).item()
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)
    assert model.prompt_length_buckets == buckets
    assert base.config._attn_implementation == attn and bool(base.is_gradient_checkpointing) == ckpt
    assert "forward" not in vars(model.prompt_builder)  # the padding patch is gone


def test_command_line_measures_every_change(llm_config, capsys, tmp_path):
    result_file = tmp_path / "fastpath.json"
    argv = ["--dataset=tiny", "--steps=2", "--warmup=1", "--threads=1", f"--result_file={result_file}"]
    assert bf.main(argv + _argv(llm_config)) == 0
    result, table = _last_json(capsys)
    assert set(result["changes"]) == set(bf.CHANGES)
    for change, r in result["changes"].items():
        assert math.isfinite(r["before"]) and r["before"] > 0 and r["after"] > 0, change
        assert r["after_over_before"] == pytest.approx(r["after"] / r["before"], rel=1e-12)
        assert r["unit"] == bf.CHANGES[change][2] and change in table
    assert result["changes"]["gradient_checkpointing"]["default"] == "before"  # off unless asked for
    assert result["changes"]["padding"]["default"] == "after"
    assert result["changes"]["length_buckets"]["default"] == "after"  # LLMRec.yaml: 4 groups
    assert json.loads(result_file.read_text())["changes"].keys() == result["changes"].keys()


def test_bad_change_is_a_one_line_error(llm_config, capsys):
    assert main_guard(bf.main, ["--dataset=tiny", "--changes=padding,nope"] + _argv(llm_config)) == 2
    assert "nope" in capsys.readouterr().err
