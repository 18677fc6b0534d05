"""Per-user metrics from top-K files, and the per-item training statistics behind them.

A top-K file is the TSV written by ``quick_start.run(save_topk=PATH)``: one row per test
user (leave-one-out: one target item per row), columns ``user_id``, ``target_item_id``,
``topk_item_ids`` (space-separated original tokens, best first) and, in files written since
full ranks are kept, ``target_rank`` (the target's rank among all items).

With one relevant item per row, ``NDCG@K = 1 / log2(rank + 1)`` when the target's rank
is ``<= K`` and 0 otherwise; ``Hit@K`` is 1 when the rank is ``<= K``. These are the
numbers RecBole's ``NDCG`` and ``Hit`` average, so means of the columns below reproduce
the ``test_result`` of the run.

An item-statistics file (``item_stats.tsv``) lists every real item of the dataset with
its training-split frequency: ``item_id`` (token), ``train_count``, ``popularity_rank``
(1 = most frequent; ties -> smaller internal id, the rule of
:func:`recbole_eisam.utils.head_item_mask`) and ``is_head`` (1/0, from that function).
"""

import os

import numpy as np
import pandas as pd
import torch

from recbole_eisam.utils import head_item_mask, item_counts

TOPK_COLUMNS = ("user_id", "target_item_id", "topk_item_ids")
ITEM_STATS_COLUMNS = ("item_id", "train_count", "popularity_rank", "is_head")


def _read_tsv(path, columns, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist.")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} '{path}' lacks the column(s) {', '.join(missing)}.")
    return frame


def target_ranks(frame):
    """1-based rank of each row's target in its top-K list, ``inf`` when it is absent."""
    ranks = np.full(len(frame), np.inf)
    for row, (target, items) in enumerate(zip(frame["target_item_id"], frame["topk_item_ids"])):
        listed = items.split()
        if target in listed:
            ranks[row] = listed.index(target) + 1
    return ranks


def read_topk(path, k=10):
    """Read a top-K TSV; adds ``rank``, ``ndcg`` (NDCG@k) and ``hit`` (Hit@k) per row, and,
    when the file has the full rank, ``full_rank`` and ``rr`` (``1 / full_rank``).

    Raises ``ValueError`` when a list is shorter than ``k`` (the metric would be wrong).
    """
    frame = _read_tsv(path, TOPK_COLUMNS, "Top-K file")
    lengths = frame["topk_item_ids"].str.split().str.len()
    if len(frame) and int(lengths.min()) < k:
        raise ValueError(
            f"Top-K file '{path}' holds lists of {int(lengths.min())} items, fewer than k={k}."
        )
    ranks = target_ranks(frame)
    frame = frame.copy()
    frame["rank"] = ranks
    frame["hit"] = (ranks <= k).astype(np.float64)
    with np.errstate(divide="ignore"):
        frame["ndcg"] = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    if "target_rank" in frame.columns:
        frame["full_rank"] = frame["target_rank"].astype(np.float64)
        frame["rr"] = 1.0 / frame["full_rank"]
    # a user may in principle appear twice (several test targets): number the occurrences
    frame["occurrence"] = frame.groupby(["user_id", "target_item_id"]).cumcount()
    return frame


def paired_rows(frame_a, frame_b):
    """Rows of two top-K frames matched by (user, target, occurrence); raises if they differ."""
    keys = ["user_id", "target_item_id", "occurrence"]
    merged = frame_a.merge(frame_b, on=keys, how="inner", suffixes=("_a", "_b"))
    if len(merged) != len(frame_a) or len(merged) != len(frame_b):
        raise ValueError(
            f"the two top-K files do not hold the same test rows ({len(frame_a)} and "
            f"{len(frame_b)} rows, {len(merged)} in common): compare runs on the same split."
        )
    return merged


def read_item_stats(path):
    """Read an item-statistics TSV (see the module docstring) with numeric columns typed."""
    frame = _read_tsv(path, ITEM_STATS_COLUMNS, "Item-statistics file")
    frame["train_count"] = frame["train_count"].astype(np.int64)
    frame["popularity_rank"] = frame["popularity_rank"].astype(np.int64)
    frame["is_head"] = frame["is_head"].astype(np.int64).astype(bool)
    return frame


def write_item_stats(frame, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = frame.loc[:, list(ITEM_STATS_COLUMNS)].copy()
    out["is_head"] = out["is_head"].astype(int)
    out.to_csv(path, sep="\t", index=False)


def item_stats_from_counts(tokens, counts, head_ratio):
    """Item statistics from the training counts by internal id (index 0 = padding, dropped).

    Args:
        tokens (Sequence[str]): original token of every internal id (same length as counts).
        counts (torch.Tensor | np.ndarray): training frequency per internal id.
        head_ratio (float): share of real items in the head.
    """


    counts = torch.as_tensor(np.asarray(counts)).long()
    head = head_item_mask(counts, head_ratio).numpy()
    order = torch.sort(-counts[1:], stable=True).indices.numpy() + 1  # ids, most frequent first
    rank = np.empty(counts.numel(), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return pd.DataFrame(
        {
            "item_id": [str(t) for t in list(tokens)[1:]],
            "train_count": counts.numpy()[1:],
            "popularity_rank": rank[1:],
            "is_head": head[1:],
        }
    )


def item_stats_from_dataset(train_dataset, head_ratio):
    """Item statistics of a RecBole training split (``train_data.dataset``)."""
    field = train_dataset.iid_field
    counts = item_counts(train_dataset)
    tokens = train_dataset.field2id_token[field]
    return item_stats_from_counts(tokens, counts, head_ratio)


def popularity_decile(item_stats, bins=10):
    """Decile (1 = most popular) of every item, from its popularity rank: equal-size item groups."""
    n = len(item_stats)
    ranks = item_stats["popularity_rank"].to_numpy()
    return pd.Series(
        np.minimum((ranks - 1) * bins // max(n, 1) + 1, bins).astype(int),
        index=item_stats["item_id"].to_numpy(),
    )


def annotate_targets(frame, item_stats, bins=10):
    """Add ``target_is_head``, ``target_count`` and ``target_decile`` to a top-K frame.

    Targets unknown to the statistics (should not happen: every test item is in the
    dataset's vocabulary) raise ``ValueError``.
    """
    stats = item_stats.set_index("item_id")
    missing = ~frame["target_item_id"].isin(stats.index)
    if missing.any():
        example = frame.loc[missing, "target_item_id"].iloc[0]
        raise ValueError(
            f"target item '{example}' is not in the item statistics: the top-K file and the "
            f"statistics come from different datasets."
        )
    frame = frame.copy()
    targets = frame["target_item_id"]
    frame["target_is_head"] = stats.loc[targets, "is_head"].to_numpy()
    frame["target_count"] = stats.loc[targets, "train_count"].to_numpy()
    frame["target_decile"] = popularity_decile(item_stats, bins).loc[targets].to_numpy()
    return frame
