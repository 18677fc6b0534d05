"""Item weights: decreasing in training frequency, mean 1 over training samples, train split only."""

import math

import pytest
import torch

from recbole_eisam import compat

compat.apply()

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from recbole_eisam.trainer import (  # noqa: E402
    EISAMTrainer,
    item_weights,
    log_prior,
    resolve_settings,
    reweight_weights,
)

DECREASING = [
    ("power", {"eisam_alpha": 0.5, "eisam_c": 1.0}),
    ("power", {"eisam_alpha": 2.0, "eisam_c": 0.1}),
    ("log", {}),
    ("focal", {"eisam_gamma": 2.0}),
    ("tail", {}),
    ("uniform", {}),
]


def assert_non_increasing(counts, w):
    """n_a > n_b  =>  w_a <= w_b, over real items (id 0 is padding)."""
    n, w = counts[1:].double(), w[1:].double()
    bigger = n[:, None] > n[None, :]
    assert torch.all((w[:, None] <= w[None, :] + 1e-6)[bigger])


def sample_mean(counts, w):
    return float((counts.double() * w.double()).sum() / counts.sum())


@pytest.mark.parametrize("family,params", DECREASING)
def test_families_on_synthetic_counts(family, params):
    counts = torch.tensor([0, 50, 20, 20, 7, 3, 1, 1, 0, 12])
    kw = {"alpha": params.get("eisam_alpha", 0.5), "c": params.get("eisam_c", 1.0),
          "gamma": params.get("eisam_gamma", 1.0), "head_ratio": 0.2}
    w = item_weights(counts, family, **kw)
    assert w.dtype == torch.float32 and w.shape == counts.shape
    assert math.isclose(sample_mean(counts, w), 1.0, rel_tol=1e-6)
    assert_non_increasing(counts, w)
    assert torch.all(torch.isfinite(w)) and torch.all(w >= 0)


def test_family_values():
    counts = torch.tensor([0, 3, 1])  # N = 4
    w = item_weights(counts, "power", alpha=1.0, c=1.0)  # raw 1/4, 1/2 -> mean (3/4 + 2/4)/4
    assert torch.allclose(w[1:], torch.tensor([0.25, 0.5]) / (1.25 / 4))
    w = item_weights(counts, "tail", head_ratio=0.5)  # item 1 head, item 2 tail: w2 * 1/4 = 1
    assert torch.allclose(w[1:], torch.tensor([0.0, 4.0]))
    w = item_weights(counts, "focal", gamma=1.0)  # raw 0, 2/3 -> w2 = 4
    assert torch.allclose(w[1:], torch.tensor([0.0, 4.0]))
    r = reweight_weights(counts, 1.0)  # raw 1/3, 1 -> mean (1 + 1)/4 = 1/2
    assert torch.allclose(r[1:], torch.tensor([2 / 3, 2.0]))
    assert torch.allclose(log_prior(counts), torch.log(torch.tensor([0.25, 0.75, 0.25])))


def test_tail_weights_without_tail_samples_refused():
    with pytest.raises(ValueError, match="weight 0"):
        item_weights(torch.tensor([0, 5, 0, 0]), "tail", head_ratio=0.4)


@pytest.fixture
def tiny_run(tiny_config_dict):
    config = Config(
        model="SASRec",
        dataset="tiny",
        config_file_list=["properties/overall.yaml", "properties/eisam.yaml"],
        config_dict={**tiny_config_dict, "metrics": ["Hit"], "topk": [10], "valid_metric": "Hit@10"},
    )
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return config, dataset, train_data


@pytest.mark.parametrize("family,params", DECREASING)
def test_trainer_item_weight(tiny_run, family, params):
    config, dataset, train_data = tiny_run
    config["train_method"], config["eisam_weight"] = "eisam", family
    for key, value in params.items():
        config[key] = value
    trainer = EISAMTrainer(config, get_model("SASRec")(config, train_data._dataset))
    w = trainer.setup_item_weights(train_data.dataset)
    assert w is trainer.item_weight and w.shape == (dataset.item_num,)
    # training frequency counted here from the training samples' targets (train split only)
    targets = train_data.dataset.inter_feat["item_id"]
    counts = torch.bincount(targets, minlength=dataset.item_num)
    full = torch.bincount(dataset.inter_feat["item_id"], minlength=dataset.item_num)
    assert not torch.equal(counts, full)  # valid/test interactions are not counted
    assert math.isclose(float(w[targets].double().mean()), 1.0, rel_tol=1e-6)  # mean over samples
    assert_non_increasing(counts, w)
    if family != "uniform":
        assert w[1:].max() > w[1:].min()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("train_method", "adam", "train_method must be one of"),
        ("eisam_weight", "cubic", "eisam_weight must be one of"),
        ("eisam_rho", 0.0, "eisam_rho must be > 0"),
        ("eisam_rho", -1.0, "eisam_rho must be > 0"),
        ("eisam_lambda", -0.5, "eisam_lambda must be >= 0"),
        ("eisam_scope", "backbone", "eisam_scope must be 'all' or 'head'"),
        ("reweight_beta", -1.0, "reweight_beta must be"),
        ("train_sample_num", -3, "train_sample_num must be"),
    ],
)
def test_invalid_keys_raise(key, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_settings({"train_method": "eisam", key: value})


def test_presets():
    assert resolve_settings({"train_method": "erm"})["eisam_lambda"] == 0
    s = resolve_settings({"train_method": "sam", "eisam_weight": "log", "eisam_lambda": 0.2})
    assert (s["eisam_weight"], s["eisam_lambda"]) == ("uniform", 1.0)
    s = resolve_settings({"train_method": "imbsam"})
    assert s["eisam_weight"] == "tail"
    s = resolve_settings({"train_method": "reweight"})
    assert (s["reweight_beta"], s["eisam_lambda"], s["per_sample"]) == (1.0, 0.0, True)
    s = resolve_settings({"train_method": "logit_adjust"})
    assert (s["logit_adjust_tau"], s["eisam_lambda"]) == (1.0, 0.0)
    s = resolve_settings({"train_method": "eisam", "logit_adjust_tau": 0.5})
    assert (s["logit_adjust_tau"], s["reweight_beta"], s["eisam_lambda"]) == (0.5, 0.0, 1.0)
    assert resolve_settings({})["per_sample"] is False
    with pytest.raises(ValueError, match="needs reweight_beta > 0"):
        resolve_settings({"train_method": "reweight", "reweight_beta": 0})
    s = resolve_settings({"train_method": "reweight", "reweight_eisam_weight": True, "eisam_weight": "log"})
    assert (s["reweight_family"], s["reweight_beta"], s["per_sample"]) == ("log", 0.0, True)
    s = resolve_settings({"train_method": "sam", "reweight_eisam_weight": True, "eisam_weight": "log"})
    assert (s["reweight_family"], s["eisam_weight"]) == ("log", "uniform")  # the user's family, not SAM's
    assert resolve_settings({"train_method": "reweight"})["reweight_family"] is None
    with pytest.raises(ValueError, match="reweight_beta and reweight_eisam_weight=True both"):
        resolve_settings({"train_method": "reweight", "reweight_eisam_weight": True, "reweight_beta": 0.5})
    with pytest.raises(ValueError, match="reweight_eisam_weight must be True or False"):
        resolve_settings({"train_method": "reweight", "reweight_eisam_weight": "yes"})
