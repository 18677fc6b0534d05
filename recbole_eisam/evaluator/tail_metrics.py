"""Tail-aware top-K metrics, registered into RecBole's evaluator by ``import recbole_eisam``.

Head and tail follow :mod:`recbole_eisam.utils.longtail`: the head is the
``ceil(head_ratio * |I|)`` most frequent items of the training split, the tail every other
real item. Each row of evaluation has one ground-truth item (next-item recommendation).

* ``HeadHit@K`` / ``TailHit@K``: Hit@K averaged over the rows whose ground-truth item is a
  head / tail item.
* ``HeadNDCG@K`` / ``TailNDCG@K``: the same for NDCG@K (one relevant item, so
  ``NDCG = 1 / log2(rank + 1)`` when ``rank <= K``, else 0).
* ``TailCoverage@K``: share of tail items that appear in at least one top-K list.
* ``HeadMRR`` / ``TailMRR``: the mean of ``1 / rank`` over the head / tail rows, ``rank`` the
  target's rank among *all* items (no cut-off): every row counts, so these see the tail's
  movement below rank 10, where a tail target usually is.

A group with no row (e.g. no test target is a head item) gives ``nan``: the average over
an empty set is undefined, and 0 would be a wrong number.
They work in full ranking and in sampled evaluation (``uni100`` ...), in which the
top-K list is taken among the sampled candidates, as for RecBole's ``Hit`` and ``NDCG``.
"""

import numpy as np
import torch
from recbole.evaluator.base_metric import AbstractMetric, TopkMetric
from recbole.utils import EvaluatorType

from recbole_eisam.evaluator.collector import GT_ITEMS, TARGET_RANK
from recbole_eisam.utils.longtail import head_item_mask


def _head_mask(config, dataobject):
    """Head mask over internal item ids, from the training split's item counter."""
    num_items = dataobject.get("data.num_items")
    counts = torch.zeros(num_items, dtype=torch.long)
    for item, n in dataobject.get("data.count_items").items():
        counts[int(item)] = int(n)
    return head_item_mask(counts, config["head_ratio"]).numpy()


class _GroupTopkMetric(TopkMetric):
    """Hit / NDCG averaged over the rows whose target is in one item group."""

    metric_need = ["rec.topk", GT_ITEMS, "data.count_items", "data.num_items"]
    group = None  # "head" or "tail"
    base = None  # "hit" or "ndcg"

    def __init__(self, config):
        super().__init__(config)
        self.config = config

    def calculate_metric(self, dataobject):
        pos_index, _ = self.used_info(dataobject)
        is_head = _head_mask(self.config, dataobject)[dataobject.get(GT_ITEMS).numpy()]
        rows = is_head if self.group == "head" else ~is_head
        ranks = np.arange(1, pos_index.shape[1] + 1)
        if self.base == "hit":
            per_row = np.cumsum(pos_index, axis=1) > 0
        else:
            per_row = np.cumsum(np.where(pos_index, 1.0 / np.log2(ranks + 1), 0.0), axis=1)
        selected = per_row[rows].astype(np.float64)
        name = f"{self.group}{self.base}"
        result = {}
        for k in self.topk:
            value = selected[:, k - 1].mean() if selected.shape[0] else float("nan")
            result[f"{name}@{k}"] = round(float(value), self.decimal_place)
        return result


class HeadHit(_GroupTopkMetric):
    r"""Hit@K over the evaluation rows whose ground-truth item is a head item."""

    group, base = "head", "hit"


class TailHit(_GroupTopkMetric):
    r"""Hit@K over the evaluation rows whose ground-truth item is a tail item."""

    group, base = "tail", "hit"


class HeadNDCG(_GroupTopkMetric):
    r"""NDCG@K over the evaluation rows whose ground-truth item is a head item."""

    group, base = "head", "ndcg"


class TailNDCG(_GroupTopkMetric):
    r"""NDCG@K over the evaluation rows whose ground-truth item is a tail item."""

    group, base = "tail", "ndcg"


class _GroupRankMetric(AbstractMetric):
    """Mean reciprocal full rank over the rows whose target is in one item group."""

    metric_type = EvaluatorType.RANKING
    metric_need = [TARGET_RANK, GT_ITEMS, "data.count_items", "data.num_items"]
    group = None  # "head" or "tail"

    def __init__(self, config):
        super().__init__(config)
        self.config = config

    def calculate_metric(self, dataobject):
        is_head = _head_mask(self.config, dataobject)[dataobject.get(GT_ITEMS).numpy()]
        rows = is_head if self.group == "head" else ~is_head
        ranks = dataobject.get(TARGET_RANK).numpy().astype(np.float64)[rows]
        value = float((1.0 / ranks).mean()) if ranks.size else float("nan")
        return {f"{self.group}mrr": round(value, self.decimal_place)}


class HeadMRR(_GroupRankMetric):
    r"""Mean of 1 / (full rank of the target) over the rows whose target is a head item."""

    group = "head"


class TailMRR(_GroupRankMetric):
    r"""Mean of 1 / (full rank of the target) over the rows whose target is a tail item."""

    group = "tail"


class TailCoverage(AbstractMetric):
    r"""Share of tail items recommended in at least one top-K list.

    .. math::
        \mathrm{TailCoverage@K} = \frac{|\bigcup_u \hat{R}_K(u) \cap T|}{|T|}
    """

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.items", "data.count_items", "data.num_items"]

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self.topk = config["topk"]

    def calculate_metric(self, dataobject):
        items = dataobject.get("rec.items").numpy()
        is_tail = ~_head_mask(self.config, dataobject)
        is_tail[0] = False  # padding is never an item
        n_tail = int(is_tail.sum())
        result = {}
        for k in self.topk:
            shown = np.unique(items[:, :k])
            value = is_tail[shown].sum() / n_tail if n_tail else float("nan")
            result[f"tailcoverage@{k}"] = round(float(value), self.decimal_place)
        return result


TAIL_METRICS = [HeadHit, TailHit, HeadNDCG, TailNDCG, HeadMRR, TailMRR, TailCoverage]
