"""Several processes (RecBole's distributed mode): sums over processes, one evaluation of all rows.

Every process computes its shard's sums; one all-reduce gives the global batch size, loss
and ``L_w`` sums (and the vote to stop), the all-reduced gradients give e and G of the
global batch; rank 0 alone writes checkpoints; evaluation gathers every process's rows and
computes the metrics once (exact, not an average of per-process metrics).
"""

import torch
import torch.distributed as dist


class DistributedMixin:
    """The multi-process half of :class:`~recbole_eisam.trainer.EISAMTrainer`."""

    #: per-row resources of RecBole's collector, gathered over processes by :meth:`evaluate`
    ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", "rec.gt_items", "rec.target_rank")

    def same_on_every_process(self, text, size=4096):
        """Rank 0's ``text`` on every process: RecBole names the checkpoint after the clock, and
        processes that built their trainers in different seconds would look for different files."""
        if self.config["single_spec"]:
            return text
        data = torch.zeros(size, dtype=torch.uint8, device=self.device)
        if dist.get_rank() == 0:
            encoded = text.encode("utf-8")[:size]
            data[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=0)
        return bytes(data.cpu().tolist()).rstrip(b"\0").decode("utf-8")

    def is_main_process(self):
        return self.config["single_spec"] or dist.get_rank() == 0

    def all_reduce(self, tensors):
        """Sum ``tensors`` in place over processes (DDP): e and G then use the global batch."""
        if self.config["single_spec"] or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return tensors

    def reduce_step_sums(self, m, loss_sum, lw_sum):
        """Global (M, sum of losses, sum of w_j l_j) of a step: one all-reduce in distributed
        mode, which also carries the vote to stop (:attr:`_stop_vote`), so that every
        process stops after the same step."""
        sums = torch.tensor(
            [float(m), float(loss_sum), float(lw_sum), float(self._signal is not None)],
            dtype=torch.float64, device=self.device,
        )
        m, loss_sum, lw_sum, votes = self.all_reduce([sums])[0].tolist()
        self._stop_vote = votes > 0
        return m, loss_sum, lw_sum

    def _gather_rows(self, struct, eval_data):
        """Every process's evaluation rows, in the order one process would have them.

        RecBole's DistributedSampler gives rank r the rows r, r + W, r + 2W ... of the N
        rows, padded by repeating the first ones to a multiple of W; the padding (at most
        one row per process, its last) is dropped, so the metrics are those of the N rows,
        computed once, exactly as in one process.
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        n_rows = eval_data.sample_size
        keep = len(range(rank, n_rows, world))
        counts = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([keep], dtype=torch.int64, device=self.device))
        counts = [int(c.item()) for c in counts]
        order = torch.cat([torch.arange(c) * world + r for r, c in enumerate(counts)])
        for key in self.ROW_KEYS:
            if key not in struct:
                continue
            local = struct[key][:keep]
            dtype = local.dtype
            local = local.to(torch.uint8) if dtype == torch.bool else local
            padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
            padded[:keep] = local
            padded = padded.to(self.device)
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded)
            rows = torch.cat([g[:c].cpu() for g, c in zip(gathered, counts)])
            ordered = torch.empty_like(rows)
            ordered[order] = rows
            struct[key] = ordered.to(dtype)
        return struct

    def _map_reduce(self, result, num_sample):
        """RecBole averages per-process metrics; :meth:`evaluate` computed them from all rows."""
        return result
