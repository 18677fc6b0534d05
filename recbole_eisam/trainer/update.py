r"""The EISAM update: one optimizer step, written as the formula of docs/EISAM.md.

    pass 1 at theta      g_w = grad (1/M) sum_j w_j l_j ;  .grad += grad sum_j (1 - lambda w_j) l_j
    norm and skip        ||g_w|| in float32; 0: e = 0 and G = grad L; not finite: no step
    perturb              e = rho g_w / ||g_w||
    pass 2 at theta + e  .grad += grad sum_j lambda w_j l_j(theta + e), with pass 1's dropout masks
    apply                G = .grad / M = grad L - lambda grad L_w(theta) + lambda grad L_w(theta + e)

A scope says where e lives and how the two passes run: :class:`AllScope` perturbs every
trainable parameter (two forwards per micro-batch), :class:`HeadScope` only the head after
the backbone (one backbone forward and one backbone backward per micro-batch). The step is
the same skeleton for both: :func:`eisam_step`.
"""

from dataclasses import dataclass

import torch
from torch.nn.utils.clip_grad import clip_grad_norm_

from recbole_eisam.trainer.losses import per_sample_losses


def eisam_step(trainer, batches, scope, scaler):
    """One optimizer step on the micro-batches ``batches`` (M samples in all); returns its statistics."""
    lam = trainer.active_lambda
    trainer.optimizer.zero_grad(set_to_none=True)
    g_w = [torch.zeros_like(p) for p in scope.params] if lam > 0 else None
    passes = [scope.first_pass(batch, lam, g_w, scaler) for batch in batches]  # pass 1 at theta
    m, loss_sum, lw_sum = trainer.reduce_step_sums(
        sum(p.size for p in passes), sum(p.loss_sum for p in passes), sum(p.lw_sum for p in passes)
    )
    trainer.check_finite(loss_sum / m)
    stats = {"loss": loss_sum / m, "lw": lw_sum / m, "samples": m}
    e = None
    if lam > 0:
        g_w, norm = global_mean(trainer, g_w, m)
        if not torch.isfinite(norm):
            trainer.logger.warning(f"EISAM: ||grad L_w|| = {norm.item()} is not finite; step skipped.")
            trainer.optimizer.zero_grad(set_to_none=True)
            return dict(stats, skipped=1)
        if norm > 0:
            e = [g * (trainer.rho / norm) for g in g_w]  # perturb
        else:
            trainer.logger.debug("EISAM: ||grad L_w|| = 0, so e = 0 and G = grad L.")
            stats["zero_norm"] = 1
    lw_e_sum = scope.second_pass(passes, e, lam, scaler)  # pass 2 at theta + e
    if e is not None:
        stats["sharpness"] = (float(lw_e_sum) - lw_sum) / m
    apply_update(trainer, scope.trainable, m, scaler)
    return stats


def global_mean(trainer, g_w, m):
    """``(g_w, ||g_w||)``: the summed g_w all-reduced over processes, divided by M and cast to
    the dtype e is computed in (float64 for float64 weights, else float32), and its norm."""
    g_w = [g.div_(m) for g in trainer.all_reduce(g_w)]
    dtype = torch.float64 if g_w[0].dtype == torch.float64 else torch.float32
    g_w = [g.to(dtype) for g in g_w]
    return g_w, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_w]))


def apply_update(trainer, params, m, scaler):
    """G = (summed .grad, all-reduced over processes) / M, then clipping and the optimizer step."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in trainer.all_reduce(grads):
        g.div_(m)
    scaler.unscale_(trainer.optimizer)
    if trainer.clip_grad_norm:
        clip_grad_norm_(params, **trainer.clip_grad_norm)
    scaler.step(trainer.optimizer)
    scaler.update()
    if trainer.scheduler is not None:
        trainer.scheduler.step()


# ---------------------------------------------------------------------------- the pieces
def torch_rng_state(device):
    """The states of the torch generators that dropout draws from on ``device``."""
    return torch.random.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_torch_rng_state(state, device):
    """Set the generators back to ``state``: the next forward draws the masks of the one after the snapshot."""
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def loss_vector(trainer, logits, target):
    """``(l_j, w_j)`` of every sample: the base loss (logit-adjusted or re-weighted where the
    method says so) and the target item's sharpness weight."""
    with trainer.autocast():
        loss = per_sample_losses(logits, target, trainer.log_prior, trainer.tau)
    return weighted(trainer, loss, target)


def weighted(trainer, loss, target):
    """``(l_j, w_j)``: the re-weighting's loss weight applied where the method has one, and the
    target item's sharpness weight."""
    if trainer.loss_weight is not None:
        loss = loss * trainer.loss_weight[target].to(loss.dtype)
    return loss, trainer.item_weight[target].to(loss.dtype)


def add_gradient(g_w, value, params):
    """``g_w += grad value`` w.r.t. ``params`` (the graph is kept for the backward that follows)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    for g, d in zip(g_w, grads):
        if d is not None:
            g.add_(d)


@dataclass
class FirstPass:
    """What pass 1 leaves for pass 2, per micro-batch."""

    batch: object  # the interaction (AllScope) or None
    mask: tuple  # the random state the micro-batch's dropout masks came from
    loss: torch.Tensor  # l_j (detached in AllScope; with its head graph in HeadScope)
    w: torch.Tensor  # w_j
    extra: torch.Tensor = None  # a regulariser of L (never weighted, never perturbed)
    hidden: torch.Tensor = None  # HeadScope: the backbone output, with the backbone's graph
    h: torch.Tensor = None  # HeadScope: hidden detached, the head's input
    target: torch.Tensor = None  # HeadScope: the targets

    @property
    def size(self):
        return self.loss.numel()

    @property
    def loss_sum(self):  # sum of l_j, plus M_b * the regulariser
        total = self.loss.detach().sum()
        return total if self.extra is None else total + self.loss.numel() * self.extra.detach()

    @property
    def lw_sum(self):
        return (self.w * self.loss).detach().sum()


class AllScope:
    """e on every trainable parameter: pass 2 runs the whole model again at theta + e."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.params = self.trainable = [p for p in trainer.model.parameters() if p.requires_grad]

    def losses(self, batch):
        with self.trainer.autocast():
            loss, target, extra = self.trainer.losses_fn(batch, self.trainer.log_prior, self.trainer.tau)
        loss, w = weighted(self.trainer, loss, target)
        return loss, w, extra

    def first_pass(self, batch, lam, g_w, scaler):
        mask = torch_rng_state(self.trainer.device)
        loss, w, extra = self.losses(batch)
        if g_w is not None:
            add_gradient(g_w, (w * loss).sum(), self.params)
        objective = ((1 - lam * w) * loss).sum()
        if extra is not None:  # a regulariser of L: mean over samples => M_b * extra in the sum
            objective = objective + loss.numel() * extra
        scaler.scale(objective).backward()
        return FirstPass(batch, mask, loss.detach(), w, None if extra is None else extra.detach())

    def second_pass(self, passes, e, lam, scaler):
        if e is None:
            return None
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, e):
                p.add_(d)  # theta + e
        lw_e_sum = 0.0
        for first in passes:
            set_torch_rng_state(first.mask, self.trainer.device)
            loss, w, _ = self.losses(first.batch)
            scaler.scale(lam * (w * loss).sum()).backward()
            lw_e_sum = lw_e_sum + (w * loss).detach().sum()
        with torch.no_grad():
            for p, value in zip(self.params, saved):
                p.copy_(value)  # exact restore, not theta + e - e
        return lw_e_sum


class HeadScope:
    """e on the head only (docs/EISAM.md, "Where the perturbation lives").

    The backbone output does not depend on the head, so for e on the head one backbone
    forward and one backbone backward of ``sum_j (1 - lambda w_j) l_j(head) + lambda w_j
    l_j(head + e)`` give G exactly: pass 1 keeps each micro-batch's backbone graph, the head
    at head + e is evaluated functionally (the parameters are never changed in place), and
    ``h``'s gradient flows through the backbone once. With gradient accumulation every
    micro-batch's graph lives until pass 2, as one large batch's would.
    """

    def __init__(self, trainer):
        self.trainer, self.split = trainer, trainer.head_split
        named = dict(trainer.model.named_parameters())
        self.params = [named[name] for name in self.split.head_names]
        self.trainable = [p for p in trainer.model.parameters() if p.requires_grad]

    def losses(self, h, target, head=None):
        with self.trainer.autocast():
            logits = self.split.score(h) if head is None else self.split.score_with(h, head)
        return loss_vector(self.trainer, logits, target)

    def first_pass(self, batch, lam, g_w, scaler):
        with self.trainer.autocast():
            hidden, target, extra = self.split.encode(batch)
        h = hidden.detach().requires_grad_(hidden.requires_grad)
        mask = torch_rng_state(self.trainer.device)  # the head's masks, drawn again in pass 2
        loss, w = self.losses(h, target)
        if g_w is not None:
            add_gradient(g_w, (w * loss).sum(), self.params)
        return FirstPass(None, mask, loss, w, extra, hidden, h, target)

    def second_pass(self, passes, e, lam, scaler):
        head = None
        if e is not None:  # the head tensors p + e: new tensors, p untouched
            head = {name: p + d.to(p.dtype) for name, p, d in zip(self.split.head_names, self.params, e)}
        lw_e_sum = 0.0
        for first in passes:
            loss_e = first.loss
            if head is not None:
                set_torch_rng_state(first.mask, self.trainer.device)
                loss_e = self.losses(first.h, first.target, head)[0]
            objective = ((1 - lam * first.w) * first.loss).sum() + lam * (first.w * loss_e).sum()
            if first.extra is not None:
                objective = objective + first.loss.numel() * first.extra
            scaler.scale(objective).backward()  # h.grad, the head's .grad (and the regulariser's)
            if first.h.grad is not None:
                first.hidden.backward(first.h.grad)  # the backbone, once
            lw_e_sum = lw_e_sum + (first.w * loss_e).detach().sum()
        passes.clear()
        return lw_e_sum
