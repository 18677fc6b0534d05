"""Tail-aware metrics against hand computations, through RecBole's own Collector/Evaluator path."""

import math
from collections import Counter

import pytest
import torch
from recbole.evaluator import Evaluator

from recbole_eisam.evaluator import TailCollector
from recbole_eisam.utils import head_item_mask

NEG = -float("inf")
# internal items 1..6 (0 is padding). Training counts: head_ratio 0.4 -> ceil(2.4) = 3 head
# items: item 2 (9), then the ties at 5 broken by the smaller id: items 1 and 3 (not 5).
COUNTS = Counter({1: 5, 2: 9, 3: 5, 4: 2, 5: 5})
HEAD = {1, 2, 3}
TARGETS = torch.tensor([2, 5, 4, 3])  # head, tail, tail, head
FULL_SCORES = torch.tensor(
    [
        [NEG, 5, 6, 1, 4, 2, 0],  # ranking 2 1 4 5 3 6 -> target 2 at rank 1
        [NEG, 6, 5, 3, 2, 4, 1],  # ranking 1 2 5 3 4 6 -> target 5 at rank 3
        [NEG, 6, 5, 4, 1, 3, 2],  # ranking 1 2 3 5 6 4 -> target 4 at rank 6
        [NEG, 6, 4, 5, 1, 2, 3],  # ranking 1 3 2 6 5 4 -> target 3 at rank 2
    ]
)
CANDIDATES = [[2, 3, 6], [5, 3, 6], [4, 5, 6], [3, 4, 5]]  # uni-sampled evaluation


def _config(topk=(1, 3)):
    return {
        "metrics": ["Hit", "NDCG", "HeadHit", "TailHit", "HeadNDCG", "TailNDCG", "TailCoverage"],
        "topk": list(topk),
        "head_ratio": 0.4,
        "metric_decimal_place": 6,
        "eval_args": {"mode": "full"},
        "device": torch.device("cpu"),
    }


class _TrainData:
    class dataset:
        item_counter = COUNTS
        item_num = 7

        @staticmethod
        def num(field):
            return 7

    @property
    def _dataset(self):
        return self.dataset


def _evaluate(scores, config):
    config = dict(config, ITEM_ID_FIELD="item_id", USER_ID_FIELD="user_id")
    collector = TailCollector(config)
    collector.data_collect(_TrainData())
    positive_u = torch.arange(len(TARGETS))
    collector.eval_batch_collect(scores, None, positive_u, TARGETS)
    return Evaluator(config).evaluate(collector.get_data_struct())


def test_head_mask_ties_go_to_smaller_id():
    counts = torch.zeros(7, dtype=torch.long)
    for item, n in COUNTS.items():
        counts[item] = n
    mask = head_item_mask(counts, 0.4)
    assert set(torch.nonzero(mask).flatten().tolist()) == HEAD
    assert not mask[0]


def test_full_ranking_by_hand():
    r = _evaluate(FULL_SCORES.clone(), _config())
    ndcg_rank2, ndcg_rank3 = 1 / math.log2(3), 1 / math.log2(4)
    assert r["headhit@1"] == pytest.approx(0.5)  # user 0 hits at 1, user 3 at rank 2
    assert r["headhit@3"] == pytest.approx(1.0)
    assert r["tailhit@1"] == pytest.approx(0.0)
    assert r["tailhit@3"] == pytest.approx(0.5)  # user 1 at rank 3, user 2 at rank 6
    assert r["headndcg@3"] == pytest.approx((1 + ndcg_rank2) / 2, abs=1e-6)
    assert r["tailndcg@3"] == pytest.approx(ndcg_rank3 / 2, abs=1e-6)
    # top-3 lists show tail items 4 (user 0) and 5 (user 1) out of {4, 5, 6}
    assert r["tailcoverage@3"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["tailcoverage@1"] == pytest.approx(0.0)
    # head and tail rows partition the users: the group means recombine into RecBole's NDCG
    assert (r["headndcg@3"] * 2 + r["tailndcg@3"] * 2) / 4 == pytest.approx(r["ndcg@3"], abs=1e-5)
    assert (r["headhit@3"] * 2 + r["tailhit@3"] * 2) / 4 == pytest.approx(r["hit@3"], abs=1e-5)


def test_sampled_ranking_by_hand():
    scores = torch.full_like(FULL_SCORES, NEG)
    for row, items in enumerate(CANDIDATES):
        scores[row, items] = FULL_SCORES[row, items]
    config = dict(_config(), eval_args={"mode": "uni100"})
    r = _evaluate(scores, config)
    # ranks among the candidates: 1, 1, 3, 1
    assert r["headhit@1"] == pytest.approx(1.0)
    assert r["tailhit@1"] == pytest.approx(0.5)
    assert r["tailhit@3"] == pytest.approx(1.0)
    assert r["tailndcg@3"] == pytest.approx((1 + 0.5) / 2, abs=1e-6)
    assert r["headndcg@3"] == pytest.approx(1.0)
    assert r["tailcoverage@1"] == pytest.approx(1 / 3, abs=1e-6)  # only item 5
    assert r["tailcoverage@3"] == pytest.approx(1.0)


def test_empty_group_is_nan_not_zero():
    targets_all_head = torch.tensor([2, 1, 3, 3])
    config = dict(_config(), ITEM_ID_FIELD="item_id", USER_ID_FIELD="user_id")
    collector = TailCollector(config)
    collector.data_collect(_TrainData())
    collector.eval_batch_collect(FULL_SCORES.clone(), None, torch.arange(4), targets_all_head)
    r = Evaluator(config).evaluate(collector.get_data_struct())
    assert math.isnan(r["tailhit@3"]) and not math.isnan(r["headhit@3"])


def test_rows_with_several_positives_are_refused():
    config = dict(_config(), ITEM_ID_FIELD="item_id", USER_ID_FIELD="user_id")
    collector = TailCollector(config)
    with pytest.raises(ValueError, match="exactly one ground-truth item"):
        collector.eval_batch_collect(FULL_SCORES.clone(), None, torch.tensor([0, 0, 1, 2, 3]), torch.tensor([1, 2, 5, 4, 3]))


def test_mrr_of_the_full_rank_by_hand():
    """Ranks 1, 3, 6, 2 (module header): head rows 1 and 2, tail rows 3 and 6."""
    config = dict(_config(), metrics=["HeadMRR", "TailMRR", "TailNDCG"], topk=[1])
    r = _evaluate(FULL_SCORES.clone(), config)
    assert r["headmrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert r["tailmrr"] == pytest.approx((1 / 3 + 1 / 6) / 2)
    assert r["tailndcg@1"] == 0  # the cut-off metric sees neither tail row


def test_target_rank_shares_ties():
    from recbole_eisam.evaluator.collector import target_rank

    scores = torch.tensor([[NEG, 2.0, 2.0, 1.0, 2.0], [NEG, 3.0, 1.0, 1.0, 0.5]])
    ranks = target_rank(scores, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert ranks.tolist() == [2.0, 2.5]  # three-way tie at the top; two-way tie for second
