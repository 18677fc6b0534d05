"""The one definition of item frequency and of the head / tail split.

Every part of the package (metrics, weights, reports) asks these two functions, so the
split is the same everywhere:

* ``n_i`` is the number of interactions with item ``i`` in the *training* split (no
  valid/test leakage), every one of them. RecBole's augmented sequential training set
  holds one row per target, so its ``item_counter`` leaves out each user's first
  interaction (never a target); :func:`item_counts` adds it back from the rows whose
  history has length 1, as RecBole's own ``SequentialDataset.inter_matrix`` does.
* the head is the ``ceil(head_ratio * |I|)`` items with the largest ``n_i``, ``|I|`` the
  number of real items (internal id 0, RecBole's padding, excluded), ties broken by the
  smaller internal item id; the tail is every other real item, including items never
  seen in training.
"""

import math

import torch

#: attribute of a training set whose rows were capped (utils/windows.py): the full split's counts
TRAINING_COUNTS = "training_item_counts"


def item_counts(dataset, num_items=None):
    """Training frequency of every item as a ``LongTensor`` indexed by internal item id.

    Args:
        dataset: the training split (a RecBole ``Dataset``; for sequential models the
            augmented one, whose first-interaction rows are counted back in; a set capped by
            ``train_windows_per_user`` carries the whole split's counts).
        num_items (int, optional): length of the result; defaults to ``dataset.item_num``.
    """
    num_items = dataset.item_num if num_items is None else num_items
    full = getattr(dataset, TRAINING_COUNTS, None)
    if full is not None:  # a capped training set: its split's every interaction was counted
        counts = torch.zeros(num_items, dtype=torch.long)
        n = min(num_items, full.numel())
        counts[:n] = full[:n]
        return counts
    counts = torch.zeros(num_items, dtype=torch.long)
    for item, n in dataset.item_counter.items():
        counts[int(item)] = int(n)
    first = first_interactions(dataset)
    if first is not None:
        counts += torch.bincount(first, minlength=num_items)[:num_items]
    counts[0] = 0
    return counts


def first_interactions(dataset):
    """Each user's first training item in an augmented sequential dataset, else ``None``.

    Every user's first augmented row has the history ``[i_1]`` (length 1) and the target
    ``i_2``; ``i_1`` is in the training split but is no row's target.
    """
    length_field = getattr(dataset, "item_list_length_field", None)
    if length_field is None:  # not a sequential dataset: every interaction is a row
        return None
    list_field = getattr(dataset, f"{dataset.iid_field}_list_field", None)
    feat = dataset.inter_feat
    if list_field is None or length_field not in feat or list_field not in feat:
        return None
    first_rows = feat[length_field] == 1
    return feat[list_field][first_rows][:, 0].long()


def num_head_items(num_real, head_ratio):
    """Size of the head: ``ceil(head_ratio * |I|)`` of the ``num_real`` real items."""
    return math.ceil(float(head_ratio) * num_real)


def head_item_mask(counts, head_ratio):
    """Boolean mask over internal item ids, ``True`` for head items (padding id 0 is never head).

    Args:
        counts (torch.Tensor): training frequency per internal item id (see :func:`item_counts`).
        head_ratio (float): share of real items that form the head, in ``(0, 1)``.
    """
    if not 0.0 < float(head_ratio) < 1.0:
        raise ValueError(f"head_ratio must be in (0, 1), got {head_ratio}.")
    counts = torch.as_tensor(counts).long().cpu()
    num_real = counts.numel() - 1
    num_head = num_head_items(num_real, head_ratio)
    ids = torch.arange(1, counts.numel())
    # sort by count descending, then id ascending: a stable sort on -count keeps id order
    order = torch.sort(-counts[1:], stable=True).indices
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    mask[ids[order[:num_head]]] = True
    return mask
