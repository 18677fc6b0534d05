"""A RecBole ``Collector`` that also keeps the ground-truth item of every evaluation row.

RecBole's collector stores, per row, only a 0/1 hit vector (``rec.topk``) and the
recommended ids (``rec.items``), so a metric cannot tell whether the row's target is a
head or a tail item. :class:`TailCollector` adds the resources ``rec.gt_items`` (one
internal item id per row) and ``rec.target_rank`` (the target's rank among all items), and
fixes ``get_data_struct`` of RecBole 1.2.1, which calls
``.cpu()`` on non-tensor resources (``data.num_items``, ``data.count_items``) and so
crashes whenever ``ItemCoverage``, ``GiniIndex`` or ``AveragePopularity`` is requested.
``data.count_items`` counts every interaction of the training split
(:func:`recbole_eisam.utils.longtail.item_counts`), the one popularity that the head / tail
metrics, the weights and the reports share; RecBole's would leave out each user's first
interaction.

``recbole_eisam.registry`` installs it as the collector of RecBole's trainers.
"""

import copy
from collections import Counter

import torch
from recbole.evaluator.collector import Collector

from recbole_eisam.utils.longtail import item_counts

GT_ITEMS = "rec.gt_items"
#: per row, the target's rank among all items (1 = first; ties share their mean rank)
TARGET_RANK = "rec.target_rank"


def target_rank(scores, positive_u, positive_i):
    """The rank of each row's target among all items, ``1 + #higher + (#equal - 1) / 2``: the
    full ranking that a top-K cut hides (masked items score ``-inf`` and rank last)."""
    target = scores[positive_u, positive_i].unsqueeze(1)
    rows = scores[positive_u]
    higher = (rows > target).sum(dim=1).double()
    equal = (rows == target).sum(dim=1).double()
    return 1.0 + higher + (equal - 1.0) / 2.0


class TailCollector(Collector):
    """RecBole's collector plus the per-row ground-truth item (next-item evaluation)."""

    #: per-batch resources, reset after every evaluation
    batch_keys = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", GT_ITEMS, TARGET_RANK)

    def data_collect(self, train_data):
        super().data_collect(train_data)
        if self.register.need("data.count_items"):
            counts = item_counts(train_data.dataset)
            nonzero = torch.nonzero(counts).flatten().tolist()
            self.data_struct.set("data.count_items", Counter({i: int(counts[i]) for i in nonzero}))

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if self.register.need(GT_ITEMS):
            n_rows = scores_tensor.shape[0]
            per_row = torch.bincount(positive_u.to(torch.long).cpu(), minlength=n_rows)
            if not bool((per_row == 1).all()):
                raise ValueError(
                    "Head/Tail metrics need exactly one ground-truth item per evaluation row "
                    "(next-item evaluation, e.g. eval_args.split LS for sequential models); "
                    f"found rows with {int(per_row.min())} to {int(per_row.max())} positives."
                )
            gt = torch.empty(n_rows, dtype=torch.long)
            gt[positive_u.to(torch.long).cpu()] = positive_i.to(torch.long).cpu()
            self.data_struct.update_tensor(GT_ITEMS, gt)
        if self.register.need(TARGET_RANK):
            self.data_struct.update_tensor(TARGET_RANK, target_rank(scores_tensor, positive_u, positive_i).cpu())

    def get_data_struct(self):
        data = self.data_struct._data_dict
        for key, value in data.items():
            if isinstance(value, torch.Tensor):
                data[key] = value.cpu()
        returned_struct = copy.deepcopy(self.data_struct)
        for key in self.batch_keys:
            if key in self.data_struct:
                del self.data_struct[key]
        return returned_struct
