"""LLMRec loads a model by its Hugging Face hub id from the hub's cache, offline (no download)."""

import os
import shutil

import pytest

from recbole_eisam.model import llm_backbone
from test_llmrec import build, save_tiny_llama, tiny_llm_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A hub cache holding ``tiny-org/tiny-llama`` in huggingface_hub's layout, used offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    save_tiny_llama(tmp_path / "model")
    shutil.copytree(tmp_path / "model", snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(cache), str(snapshot)


def test_hub_id_resolves_to_the_cached_snapshot(offline_hub):
    _, snapshot = offline_hub
    folder, gguf = llm_backbone.resolve_model_source("tiny-org/tiny-llama")
    assert os.path.samefile(folder, snapshot) and gguf is None


def test_llmrec_loads_a_model_by_hub_id(offline_hub, tiny_config_dict, tmp_path):
    config = tiny_llm_config(tiny_config_dict, "tiny-org/tiny-llama", tmp_path / "llm_cache")
    model, (train, _, _), _ = build(config)
    assert model.backbone_info["hidden_size"] == 32  # the tiny Llama of the cache
    assert os.path.samefile(model.backbone_info["folder"], offline_hub[1])


def test_an_id_missing_from_the_cache_offline_is_one_sentence(offline_hub):
    cache, _ = offline_hub
    with pytest.raises(FileNotFoundError, match=f"'other-org/missing' is a Hugging Face hub id.*{cache}.*HF_HUB_OFFLINE"):
        llm_backbone.resolve_model_source("other-org/missing")
    with pytest.raises(FileNotFoundError, match="neither a local model folder, a .gguf file nor a Hugging Face hub id"):
        llm_backbone.resolve_model_source("./no/such/folder/here")
