"""LLMRec's frozen-LLM fast path: prompt states computed once, cached on disk, head-only training."""

import os

import pytest
import torch

from recbole_eisam.quick_start import run
from test_llmrec import build, first_batch, tiny_llm_config

pytest.importorskip("transformers")


@pytest.fixture
def frozen_config(tiny_config_dict, tiny_llm, tmp_path):
    # one batch for every pass, so the prompts are encoded in the same company everywhere
    return tiny_llm_config(
        tiny_config_dict, tiny_llm, tmp_path / "llm_cache", llm_frozen=True, item_id_tokens=False,
        train_sample_num=0, train_batch_size=1000, eval_batch_size=1000, item_encode_batch_size=1000,
        head_dropout=0.0, epochs=3, learning_rate=0.01, metrics=["Hit", "NDCG", "TailMRR"], topk=[10],
    )


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from test_llmrec import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_frozen"))


def test_cached_states_equal_the_frozen_models_states(frozen_config):
    model, (train, _, _), _ = build(frozen_config)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # frozen: no adapters
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(model.HEAD_MODULES)  # training updates only the head
    assert len(model.state_cache) == len({tuple(w.tolist()) for w in model.prompt_builder.history(
        train.dataset.inter_feat[model.ITEM_SEQ], train.dataset.inter_feat[model.ITEM_SEQ_LEN])})
    assert os.path.isfile(model.state_cache.path)
    batch = first_batch(train)
    cached = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    windows = model.prompt_builder.history(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    direct = model._frozen_states(windows)
    assert torch.allclose(cached, direct, atol=1e-5)
    assert not cached.requires_grad


def test_cached_run_equals_the_uncached_frozen_run(frozen_config):
    cached = run("LLMRec", "tiny", config_dict=dict(frozen_config))
    uncached = run("LLMRec", "tiny", config_dict=dict(frozen_config, llm_state_cache=False))
    assert cached["test_result"] == uncached["test_result"]
    assert cached["best_valid_result"] == uncached["best_valid_result"]
    assert cached["test_result"]["ndcg@10"] > 0
    again = run("LLMRec", "tiny", config_dict=dict(frozen_config))  # every state read from the disk cache
    assert again["test_result"] == cached["test_result"]


def test_on_the_fast_path_eisams_head_scope_is_its_full_scope(frozen_config):
    # only the head trains, so perturbing "all trainable parameters" perturbs the head
    config = dict(frozen_config, train_method="eisam", eisam_rho=0.05, eisam_lambda=1.0, head_dropout=0.1)
    full = run("LLMRec", "tiny", config_dict=dict(config, eisam_scope="all"))
    head = run("LLMRec", "tiny", config_dict=dict(config, eisam_scope="head"))
    assert head["test_result"] == full["test_result"]
    assert head["best_valid_result"] == full["best_valid_result"]
    erm = run("LLMRec", "tiny", config_dict=dict(config, train_method="erm"))
    assert erm["best_valid_result"] != full["best_valid_result"]  # the sharpness term did act


def test_second_build_reads_the_cache_instead_of_encoding(frozen_config, monkeypatch):
    first, _, _ = build(frozen_config)
    first.flush_caches()
    calls = []
    from recbole_eisam.model import llmrec

    original = llmrec.LLMRec._frozen_states
    monkeypatch.setattr(llmrec.LLMRec, "_frozen_states", lambda self, w: calls.append(len(w)) or original(self, w))
    second, (train, _, _), _ = build(frozen_config)
    assert calls == [] and len(second.state_cache) == len(first.state_cache)


def test_frozen_with_id_tokens_is_one_sentence(frozen_config):
    with pytest.raises(ValueError, match="llm_frozen=True .* set item_id_tokens: False"):
        build(dict(frozen_config, item_id_tokens=True))


def test_a_stopped_build_resumes_from_what_it_wrote(frozen_config, monkeypatch):
    """The cache writes during a long build: a build stopped after two batches keeps their
    states, and the next build encodes only the rest."""
    from recbole_eisam.model import llmrec, state_cache

    monkeypatch.setattr(state_cache.PromptStateCache, "FLUSH_SECONDS", -1)  # write after every batch
    original = llmrec.LLMRec._frozen_states
    encoded = []

    def stop_after_two(self, windows):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(len(windows))
        return original(self, windows)

    config = dict(frozen_config, item_encode_batch_size=64)
    monkeypatch.setattr(llmrec.LLMRec, "_frozen_states", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(config)
    assert encoded == [64, 64]
    encoded.clear()
    monkeypatch.setattr(llmrec.LLMRec, "_frozen_states", lambda self, w: encoded.append(len(w)) or original(self, w))
    model, _, _ = build(config)
    assert sum(encoded) == len(model.state_cache) - 128  # the first two batches came from the disk
