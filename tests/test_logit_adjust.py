"""Logit adjustment in its two forms (Menon et al., ICLR 2021), on a synthetic long tail.

The loss form trains on ``logits + tau * log prior`` and predicts with the raw logits; the
post-hoc form trains plainly and predicts with ``logits - tau * log prior``. Both must
recommend *less* popular items than plain training. The opposite sign (training on
``logits - tau * log prior``) teaches the prior twice and recommends popular items more:
these tests fail on it.
"""

import csv

import pytest
import torch

from recbole_eisam.quick_start import run


@pytest.fixture(scope="module")
def long_tail(tmp_path_factory):
    """300 users, 150 items with Zipf popularity: SASRec, 4 epochs, seed 3."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("long_tail")
    data_path = write_tiny_dataset(str(root / "data"), name="longtail", n_users=300, n_items=150, seed=1)
    config = dict(
        data_path=data_path, checkpoint_dir=str(root / "saved"), show_progress=False, epochs=4,
        train_batch_size=64, eval_batch_size=256, MAX_ITEM_LIST_LENGTH=10, hidden_size=16, inner_size=32,
        n_layers=1, n_heads=1, seed=3, device="cpu", use_gpu=False, topk=[10], valid_metric="NDCG@10",
        metrics=["Hit", "NDCG", "AveragePopularity", "TailCoverage"],
    )
    results = {}
    for method in ("erm", "logit_adjust", "logit_adjust_posthoc"):
        topk = root / f"{method}.tsv"
        out = run("SASRec", "longtail", config_dict=dict(config, train_method=method), saved=False,
                  save_topk=str(topk))
        results[method] = (out["test_result"], topk)
    return results


def _popularity_of_topk(path, counts):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sum(counts.get(i, 0) for r in rows for i in r["topk_item_ids"].split()) / (10 * len(rows))


@pytest.mark.parametrize("method", ["logit_adjust", "logit_adjust_posthoc"])
def test_logit_adjustment_recommends_the_tail_more(long_tail, method):
    erm, adjusted = long_tail["erm"][0], long_tail[method][0]
    assert adjusted["averagepopularity@10"] < 0.5 * erm["averagepopularity@10"]
    assert adjusted["tailcoverage@10"] > erm["tailcoverage@10"]


def test_posthoc_ranking_reaches_the_topk_file(long_tail):
    """--save_topk writes the ranking the evaluator scored: the post-hoc one is adjusted too."""
    counts = {}
    with open(long_tail["erm"][1]) as f:  # any popularity order will do: the targets' counts
        for row in csv.DictReader(f, delimiter="\t"):
            counts[row["target_item_id"]] = counts.get(row["target_item_id"], 0) + 1
    assert _popularity_of_topk(long_tail["logit_adjust_posthoc"][1], counts) < _popularity_of_topk(
        long_tail["erm"][1], counts
    )


def test_posthoc_scores_subtract_the_scaled_prior(tiny_config_dict):
    """The trainer's ranking scores are ``scores - tau * log prior`` (prior from the training split)."""
    from recbole.data import data_preparation
    from recbole.utils import get_model

    from recbole_eisam.quick_start import build_dataset, load_config
    from recbole_eisam.trainer import EISAMTrainer, log_prior
    from recbole_eisam.utils import item_counts

    config = load_config("SASRec", "tiny", config_dict=dict(
        tiny_config_dict, train_method="logit_adjust_posthoc", logit_adjust_tau=0.7))
    dataset = build_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    trainer = EISAMTrainer(config, get_model("SASRec")(config, train.dataset))
    trainer.setup_item_weights(train.dataset)
    scores = torch.randn(3, dataset.item_num)
    expected = scores - 0.7 * log_prior(item_counts(train.dataset))
    assert torch.allclose(trainer._adjust_posthoc(scores.clone()), expected)
