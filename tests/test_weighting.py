"""Item weights: decreasing in training frequency, mean 1 over training samples, train split only."""

import math

import pytest
import torch

from recbole_eisam import patches

patches.apply()

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from recbole_eisam.evaluator.collector import TailCollector  # noqa: E402
from recbole_eisam.trainer import (  # noqa: E402
    EISAMTrainer,
    item_weights,
    log_prior,
    resolve_settings,
    reweight_weights,
)
from recbole_eisam.utils import item_counts  # noqa: E402

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


def training_interactions(config, dataset):
    """Every interaction of the training split, read here from the atomic file itself: each
    user's interactions in time order without the last two (validation and test targets)."""
    path = f"{config['data_path']}/tiny.inter"
    rows = [line.rstrip("\n").split("\t") for line in open(path)][1:]
    by_user = {}
    for user, item, _, time in rows:
        by_user.setdefault(user, []).append((float(time), item))
    items = [item for seq in by_user.values() for _, item in sorted(seq)[:-2]]
    return torch.as_tensor(dataset.token2id("item_id", items))


def test_item_counts_count_every_training_interaction(tiny_run):
    """The head, the weights and the prior count each user's first interaction too (it is
    never a training target of RecBole's augmented sequences)."""
    config, dataset, train_data = tiny_run
    expected = torch.bincount(training_interactions(config, dataset), minlength=dataset.item_num)
    assert torch.equal(item_counts(train_data.dataset), expected)
    targets = torch.bincount(train_data.dataset.inter_feat["item_id"], minlength=dataset.item_num)
    assert int(expected.sum() - targets.sum()) == dataset.user_num - 1  # one first interaction per user
    # the metrics' collector reads the same counts
    collector = TailCollector(dict(config.final_config_dict, metrics=["TailHit"], topk=[10]))
    collector.data_collect(train_data)
    counted = collector.data_struct.get("data.count_items")
    assert {i: n for i, n in counted.items()} == {i: int(n) for i, n in enumerate(expected) if n > 0}


@pytest.mark.parametrize("norm", ["mean", "max"])
@pytest.mark.parametrize("family,params", DECREASING)
def test_trainer_item_weight(tiny_run, family, params, norm):
    config, dataset, train_data = tiny_run
    config["train_method"], config["eisam_weight"], config["eisam_weight_norm"] = "eisam", family, norm
    for key, value in params.items():
        config[key] = value
    trainer = EISAMTrainer(config, get_model("SASRec")(config, train_data._dataset))
    w = trainer.setup_item_weights(train_data.dataset)
    assert w is trainer.item_weight and w.shape == (dataset.item_num,)
    # training frequency counted here from the atomic file (train split only)
    items = training_interactions(config, dataset)
    counts = torch.bincount(items, minlength=dataset.item_num)
    full = torch.bincount(dataset.inter_feat["item_id"], minlength=dataset.item_num)
    assert not torch.equal(counts, full)  # valid/test interactions are not counted
    if norm == "mean":
        assert math.isclose(float(w[items].double().mean()), 1.0, rel_tol=1e-6)  # mean over interactions
    else:
        assert math.isclose(float(w[counts > 0].max()), 1.0, rel_tol=1e-6) and float(w.min()) >= 0
    assert_non_increasing(counts, w)
    if family != "uniform":
        assert w[1:].max() > w[1:].min()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("train_method", "adam", "train_method must be one of erm, sam"),
        ("eisam_weight", "cubic", "eisam_weight must be one of"),
        ("eisam_rho", 0.0, "eisam_rho must be > 0"),
        ("eisam_rho", -1.0, "eisam_rho must be > 0"),
        ("eisam_lambda", -0.5, "eisam_lambda must be a finite number >= 0"),
        ("eisam_scope", "backbone", "eisam_scope must be one of all, head"),
        ("reweight_beta", -1.0, "reweight_beta must be"),
        ("train_sample_num", -3, "train_sample_num must be"),
        ("eisam_weight_norm", "sum", "eisam_weight_norm must be one of max, mean, got 'sum'"),
        ("base_loss", "focal", "base_loss must be one of ce, logit_adjust, reweight, got 'focal'"),
        ("imbsam_split", "median", "imbsam_split must be one of eta, head_ratio"),
        ("imbsam_eta", 0, "imbsam_eta must be an integer >= 1, got 0"),
        ("imbsam_eta", 2.5, "imbsam_eta must be an integer >= 1, got 2.5"),
        ("eisam_start_epoch", -1, "eisam_start_epoch must be an integer >= 0"),
        ("logit_adjust_tau", float("inf"), "logit_adjust_tau must be a finite number"),
    ],
)
def test_invalid_keys_raise(key, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_settings({"train_method": "eisam", key: value})


def test_methods_mean_their_method():
    """Each train_method fixes its sharpness term and base loss; base_loss composes with the
    plain sharpness methods only, and a contradicting key is refused."""
    s = resolve_settings({"train_method": "erm", "logit_adjust_tau": 2.0, "reweight_beta": 0.5})
    assert (s["eisam_lambda"], s["tau"], s["posthoc_tau"], s["reweight_beta"], s["per_sample"]) == (0, 0, 0, 0, False)
    s = resolve_settings({"train_method": "sam", "eisam_weight": "log", "eisam_lambda": 0.2})
    assert (s["eisam_weight"], s["eisam_lambda"]) == ("uniform", 0.2)  # lambda is tuned like any knob
    s = resolve_settings({"train_method": "imbsam"})
    assert (s["eisam_weight"], s["weight_norm"], s["weight_eta"], s["eisam_lambda"]) == ("tail", "max", 20, 1.0)
    s = resolve_settings({"train_method": "imbsam", "imbsam_split": "head_ratio"})
    assert s["weight_eta"] is None
    s = resolve_settings({"train_method": "reweight"})
    assert (s["base_loss"], s["reweight_beta"], s["eisam_lambda"], s["per_sample"]) == ("reweight", 1.0, 0.0, True)
    s = resolve_settings({"train_method": "logit_adjust", "logit_adjust_tau": 0.5})
    assert (s["base_loss"], s["tau"], s["posthoc_tau"], s["eisam_lambda"]) == ("logit_adjust", 0.5, 0.0, 0.0)
    s = resolve_settings({"train_method": "logit_adjust_posthoc", "logit_adjust_tau": 0.5})
    assert (s["base_loss"], s["tau"], s["posthoc_tau"], s["per_sample"]) == ("ce", 0.0, 0.5, False)
    s = resolve_settings({"train_method": "eisam_la"})
    assert (s["base_loss"], s["tau"], s["eisam_lambda"], s["eisam_weight_norm"]) == ("logit_adjust", 1.0, 1.0, "max")
    s = resolve_settings({"train_method": "eisam_rw", "reweight_beta": 0.25})
    assert (s["base_loss"], s["reweight_beta"], s["tau"]) == ("reweight", 0.25, 0.0)
    s = resolve_settings({"train_method": "sam", "base_loss": "logit_adjust"})
    assert (s["base_loss"], s["tau"], s["eisam_weight"]) == ("logit_adjust", 1.0, "uniform")
    assert resolve_settings({})["per_sample"] is False
    for method, base in (("erm", "logit_adjust"), ("logit_adjust", "ce"), ("eisam_la", "reweight"),
                         ("logit_adjust_posthoc", "logit_adjust")):
        with pytest.raises(ValueError, match=f"train_method={method} trains on .* base_loss={base} contradicts"):
            resolve_settings({"train_method": method, "base_loss": base})
    with pytest.raises(ValueError, match="needs reweight_beta > 0"):
        resolve_settings({"train_method": "reweight", "reweight_beta": 0})
    with pytest.raises(ValueError, match="needs logit_adjust_tau > 0"):
        resolve_settings({"train_method": "logit_adjust_posthoc", "logit_adjust_tau": 0})
    s = resolve_settings({"train_method": "reweight", "reweight_eisam_weight": True, "eisam_weight": "log"})
    assert (s["reweight_family"], s["reweight_beta"], s["per_sample"]) == ("log", 0.0, True)
    s = resolve_settings({"train_method": "sam", "base_loss": "reweight", "reweight_eisam_weight": True,
                          "eisam_weight": "log"})
    assert (s["reweight_family"], s["eisam_weight"]) == ("log", "uniform")  # the user's family, not SAM's
    assert resolve_settings({"train_method": "reweight"})["reweight_family"] is None
    with pytest.raises(ValueError, match="reweight_eisam_weight=True sets the re-weighted loss's weights"):
        resolve_settings({"train_method": "eisam", "reweight_eisam_weight": True})
    with pytest.raises(ValueError, match="reweight_eisam_weight must be True or False"):
        resolve_settings({"train_method": "reweight", "reweight_eisam_weight": "yes"})


def test_weight_norms_on_ml100k_like_counts():
    """Under max normalisation lambda w_j never exceeds lambda, so with lambda <= 1 no
    plain-loss coefficient 1 - lambda w_j is negative; under mean normalisation some are."""
    counts = torch.tensor([0] + [500, 200, 100, 50, 20] + [5] * 20 + [1] * 40)
    for family in ("power", "log", "focal"):
        w_max = item_weights(counts, family, "max", alpha=0.5)
        w_mean = item_weights(counts, family, "mean", alpha=0.5)
        assert float(w_max[counts > 0].max()) == pytest.approx(1.0)
        assert float(w_max[counts > 0].min()) >= 0.0
        assert float(w_mean.max()) > 1.0  # the rarest samples' 1 - w_j < 0 at lambda = 1
        assert torch.allclose(w_max / w_max[-1], w_mean / w_mean[-1])  # same shape, other scale
    w = item_weights(counts, "tail", "max", eta=20)  # ImbSAM: items with fewer than 20 interactions
    assert w[1:].tolist() == [0.0] * 5 + [1.0] * 60  # 20 itself is not rare
    with pytest.raises(ValueError, match="imbsam_eta"):
        item_weights(counts, "tail", "max", eta=1)  # no training item has fewer than 1
    with pytest.raises(ValueError, match="eisam_weight_norm must be one of"):
        item_weights(counts, "log", "sum")
