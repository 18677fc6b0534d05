"""Each user's most recent training windows only (``train_windows_per_user``).

RecBole's sequential training set holds one row (a *window*: history and target) per
training interaction, so a user with 300 interactions brings 300 rows. On a large dataset
an LLM recommender pays for every row (the frozen-LLM fast path encodes each window once),
and the long histories dominate an epoch. ``train_windows_per_user: N`` keeps each user's
``N`` latest windows (those nearest to the validation and test targets); ``0`` keeps all.

Only which rows train changes: item frequencies, the head / tail split and every weight
still count *every* interaction of the training split (:func:`recbole_eisam.utils.longtail.item_counts`
reads them from the capped set, where they are attached), so a cap never moves an item
between head and tail.
"""

import numpy as np
import torch
from recbole.data import data_preparation

from recbole_eisam.errors import EISAMError
from recbole_eisam.utils.longtail import TRAINING_COUNTS, item_counts


def windows_per_user(config):
    """``train_windows_per_user`` as an int >= 0 (0: every window), or one sentence."""
    value = config["train_windows_per_user"]
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise EISAMError(
            f"train_windows_per_user must be an integer >= 0 (each user's latest training windows; "
            f"0 keeps all), got {value!r}."
        )
    return int(value)


def keep_recent_windows(train_dataset, n):
    """A copy of the augmented ``train_dataset`` with each user's last ``n`` rows.

    RecBole builds a user's rows in time order, so the last ``n`` rows of a user are the
    ``n`` latest targets. The copy carries the full split's item counts.
    """
    counts = item_counts(train_dataset)
    users = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    order = np.argsort(users, kind="stable")  # each user's rows together, in their time order
    sorted_users = users[order]
    group_end = np.r_[np.flatnonzero(sorted_users[1:] != sorted_users[:-1]), len(users) - 1]
    ends = np.repeat(group_end, np.diff(np.r_[-1, group_end]))  # last position of each row's user
    from_end = ends - np.arange(len(users))  # 0 for a user's latest row
    keep = np.sort(order[from_end < n])
    capped = train_dataset.copy(train_dataset.inter_feat[torch.from_numpy(keep)])
    setattr(capped, TRAINING_COUNTS, counts)
    return capped


def prepare_data(config, dataset):
    """RecBole's ``data_preparation``, with the training split capped by ``train_windows_per_user``."""
    n = windows_per_user(config)
    if n > 0:
        build = dataset.build

        def capped_build():
            train, valid, test = build()
            return [keep_recent_windows(train, n), valid, test]

        dataset.build = capped_build
    return data_preparation(config, dataset)
