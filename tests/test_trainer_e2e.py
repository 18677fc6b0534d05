"""End to end: every train_method trains and evaluates; checkpoints are safe and exact."""

import copy
import logging
import math
import os

import pytest
import torch

from recbole_eisam import patches

patches.apply()

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from recbole_eisam.trainer import TRAIN_METHODS, EISAMTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPS = [os.path.join(ROOT, "properties", name) for name in ("overall.yaml", "eisam.yaml")]


def build(model_name, config_dict, **extra):
    config = Config(
        model=model_name,
        dataset="tiny",
        config_file_list=PROPS,
        config_dict={**config_dict, "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", **extra},
    )
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], True)
    model = get_model(model_name)(config, train_data._dataset)
    return config, model, train_data, valid_data, test_data


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_each_train_method_trains_and_evaluates(tiny_config_dict, method):
    config, model, train_data, valid_data, test_data = build(
        "SASRec", tiny_config_dict, train_method=method, epochs=1
    )
    trainer = EISAMTrainer(config, model)
    before = copy.deepcopy(model.state_dict())
    best_score, _ = trainer.fit(train_data, valid_data, saved=True)
    result = trainer.evaluate(test_data, load_best_model=True)
    assert math.isfinite(best_score)
    assert set(result) == {"hit@10", "ndcg@10"} and all(math.isfinite(v) for v in result.values())
    assert trainer.epoch_stats["samples"] == len(train_data.dataset)
    assert math.isfinite(trainer.epoch_stats["train_loss"])
    if TRAIN_METHODS[method].sharpness is not None:
        assert trainer.eisam_lambda > 0 and trainer.epoch_stats["mean_sharpness"] != 0
    else:
        assert trainer.eisam_lambda == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bert4rec_eisam_trains(tiny_config_dict):
    config, model, train_data, valid_data, test_data = build(
        "BERT4Rec", tiny_config_dict, train_method="eisam", epochs=1, mask_ratio=0.3
    )
    trainer = EISAMTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert all(math.isfinite(v) for v in result.values())
    # samples are masked positions, not sequences
    assert trainer.epoch_stats["samples"] != len(train_data.dataset)


def test_best_checkpoint_reload_equals_in_memory_best(tiny_config_dict):
    config, model, train_data, valid_data, test_data = build(
        "SASRec", tiny_config_dict, train_method="eisam", epochs=3, stopping_step=10
    )
    trainer = EISAMTrainer(config, model)
    best_state = {}

    def remember_best(epoch_idx, valid_score):
        if trainer.cur_step == 0:  # early_stopping just recorded a new best
            best_state.update({k: v.clone() for k, v in model.state_dict().items()})
            best_state["epoch"] = epoch_idx

    trainer.fit(train_data, valid_data, saved=True, callback_fn=remember_best)
    assert trainer.saved_model_file.endswith(".safetensors") and os.path.exists(trainer.saved_model_file)
    model.load_state_dict({k: v for k, v in best_state.items() if k != "epoch"})
    in_memory = trainer.evaluate(test_data, load_best_model=False)
    with torch.no_grad():  # spoil the in-memory weights: the reload must restore them exactly
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    reloaded = trainer.evaluate(test_data, load_best_model=True)
    assert reloaded == in_memory
    for key, value in model.state_dict().items():
        assert torch.equal(value, best_state[key]), key


def test_resume_and_foreign_checkpoints(tiny_config_dict, tmp_path):
    config, model, train_data, valid_data, test_data = build(
        "SASRec", tiny_config_dict, train_method="eisam", epochs=1
    )
    trainer = EISAMTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    path = trainer.saved_model_file
    # resume: weights, epoch and optimizer state come back without unpickling
    config2, model2, *_ = build("SASRec", tiny_config_dict, train_method="eisam", epochs=1, seed=7)
    trainer2 = EISAMTrainer(config2, model2)
    trainer2.resume_checkpoint(path)
    assert trainer2.start_epoch == 1
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = trainer.optimizer.state_dict(), trainer2.optimizer.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for idx in s1["state"]:
        for name, value in s1["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][idx][name]))
    # a checkpoint of another model is refused with a clear message
    config3, model3, _, _, test3 = build("GRU4Rec", tiny_config_dict, train_method="erm")
    with pytest.raises(ValueError, match="trained for model 'SASRec', not 'GRU4Rec'"):
        EISAMTrainer(config3, model3).evaluate(test3, load_best_model=True, model_file=path)
    # a pickled RecBole checkpoint is never loaded
    pth = str(tmp_path / "old.pth")
    torch.save({"state_dict": model.state_dict()}, pth)
    with pytest.raises(ValueError, match="pickled"):
        trainer.evaluate(test_data, load_best_model=True, model_file=pth)


def test_model_without_protocol(tiny_config_dict):
    config, model, train_data, valid_data, test_data = build("Pop", tiny_config_dict, train_method="eisam")
    with pytest.raises(ValueError, match="train_method=eisam needs per-sample losses, but Pop gives no"):
        EISAMTrainer(config, model)
    config["train_method"] = "erm"
    trainer = EISAMTrainer(config, model)  # plain ERM through RecBole's own loop
    trainer.fit(train_data, valid_data, saved=True)
    assert trainer.item_weight is not None and not trainer.epoch_stats  # RecBole's loop ran
    result = trainer.evaluate(test_data, load_best_model=True)
    assert result["hit@10"] > 0


def test_train_sample_num(tiny_config_dict, caplog):
    caplog.set_level(logging.INFO)
    config, model, train_data, valid_data, _ = build(
        "SASRec", tiny_config_dict, train_method="sam", epochs=2, train_sample_num=100
    )
    trainer = EISAMTrainer(config, model)
    seen = []
    original = trainer._step

    def spy(batches, scaler):
        seen.append(torch.cat([b["item_id"] for b in batches]))
        return original(batches, scaler)

    trainer._step = spy
    trainer._train_epoch(train_data, 0)
    first = torch.cat(seen)
    assert trainer.epoch_stats["samples"] == 100 and len(first) == 100
    seen.clear()
    trainer._train_epoch(train_data, 1)
    second = torch.cat(seen)
    assert len(second) == 100 and not torch.equal(first, second)  # a fresh sample per epoch
    said = [r.getMessage() for r in caplog.records if "train_sample_num=100" in r.getMessage()]
    assert len(said) == 1 and f"of the {train_data.sample_size} training sequences" in said[0]


def test_eisam_with_amp_adam_weight_decay_and_clipping(tiny_config_dict):
    config, model, train_data, valid_data, test_data = build(
        "GRU4Rec", tiny_config_dict, train_method="eisam", epochs=1, enable_amp=True,
        learner="adamw", weight_decay=0.01, clip_grad_norm={"max_norm": 1.0},
        gradient_accumulation_steps=2, eisam_weight="log", logit_adjust_tau=0.5,
    )
    trainer = EISAMTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    assert trainer.epoch_stats["steps"] == math.ceil(len(train_data) / 2)
    assert math.isfinite(trainer.epoch_stats["mean_sharpness"])
    result = trainer.evaluate(test_data, load_best_model=False)
    assert all(math.isfinite(v) for v in result.values())


@pytest.mark.parametrize("mask", [True, False])
def test_eval_mask_history(tiny_config_dict, mask):
    """Full ranking ranks the items of the input sequence last only with eval_mask_history."""
    config, model, train_data, valid_data, test_data = build("SASRec", tiny_config_dict, eval_mask_history=mask)
    trainer = EISAMTrainer(config, model)
    trainer.tot_item_num = test_data._dataset.item_num
    batch = next(iter(test_data))
    interaction, scores, _, _ = trainer._full_sort_batch_eval(batch)
    seq = interaction[model.ITEM_SEQ]
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, seq, True)
    seen[:, 0] = False
    assert seen.any()
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isneginf(scores[seen]).all() == mask
    assert torch.isfinite(scores[:, 1:][~seen[:, 1:]]).all()  # every other real item keeps its score
