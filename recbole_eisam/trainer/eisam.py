r"""EISAM: Efficient Item-wise Sharpness-Aware Minimization, as one RecBole trainer.

docs/EISAM.md holds the method: the objective and the update, the special cases (ERM,
SAM, ImbSAM), the weightings and their normalisations, the base losses, the head scope,
the schedules, and the cost of each method in passes. In one line::

    G = grad L(theta) - lambda grad L_w(theta) + lambda grad L_w(theta + e),   e = rho grad L_w / ||grad L_w||

``train_method`` (:data:`recbole_eisam.methods.TRAIN_METHODS`) picks a setting of this one
update; ``eisam_scope`` says where e lives (:meth:`EISAMTrainer._eisam_step`,
:meth:`EISAMTrainer._eisam_head_step`). Reliability: a nan or inf loss stops training
before the step (:class:`~recbole_eisam.errors.NonFiniteLossError`) and keeps the last good
checkpoint; SIGINT / SIGTERM write a checkpoint to resume from bit-identically
(:meth:`EISAMTrainer._interrupt`, :meth:`EISAMTrainer.resume_checkpoint`); in RecBole's
distributed mode e and G come from the global batch and the metrics from every process's rows.
"""

import contextlib
import itertools
import json
import math
import os
import signal
import threading
from time import time

import torch
import torch.distributed as dist
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_eisam.errors import NonFiniteLossError, TrainingInterrupted
from recbole_eisam.trainer import checkpoint as ckpt
from recbole_eisam.trainer.losses import (
    get_head_split,
    get_logits_fn,
    head_split_reason,
    per_sample_losses,
    unsupported_reason,
)
from recbole_eisam.methods import BASE_LOSSES, TRAIN_METHODS
from recbole_eisam.trainer.weighting import (
    WEIGHT_FAMILIES,
    WEIGHT_NORMS,
    item_weights,
    log_prior,
    reweight_weights,
)
from recbole_eisam.utils.longtail import item_counts

DEFAULTS = {  # used when a key is absent from the config (properties/eisam.yaml has them all)
    "train_method": "erm",
    "base_loss": None,
    "eisam_rho": 0.05,
    "eisam_lambda": 1.0,
    "eisam_weight": "log",
    "eisam_weight_norm": "max",
    "eisam_alpha": 0.5,
    "eisam_c": 1.0,
    "eisam_gamma": 1.0,
    "eisam_scope": "all",
    "eisam_start_epoch": 0,
    "imbsam_split": "eta",
    "imbsam_eta": 20,
    "reweight_beta": 1.0,
    "reweight_eisam_weight": False,
    "logit_adjust_tau": 1.0,
    "train_sample_num": 0,
    "gradient_accumulation_steps": 1,
    "amp_dtype": "bfloat16",
    "head_ratio": 0.2,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
}
LR_SCHEDULERS = ("constant", "linear", "cosine")
IMBSAM_SPLITS = ("eta", "head_ratio")


def _choice(s, key, choices):
    s[key] = str(s[key]).lower()
    if s[key] not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {s[key]!r}.")
    return s[key]


def _base_loss(s, method):
    """The base loss of ``method``: its own, or the ``base_loss`` key where the method composes."""
    spec = TRAIN_METHODS[method]
    chosen = s["base_loss"]
    if chosen is None:
        return spec.base_loss
    chosen = _choice(s, "base_loss", BASE_LOSSES)
    if chosen != spec.base_loss and not spec.composes:
        own = f"the {spec.base_loss} loss" + (" with post-hoc logit adjustment" if spec.posthoc else "")
        raise ValueError(
            f"train_method={method} trains on {own}, so base_loss={chosen} contradicts it; "
            f"choose a method of that base loss (logit_adjust, reweight, eisam_la, eisam_rw) or "
            f"set base_loss on sam, imbsam or eisam."
        )
    return chosen


def resolve_settings(config):
    """Validate the keys and apply the ``train_method`` (:data:`TRAIN_METHODS`); returns a dict.

    Besides the keys, it holds ``method`` (the :class:`TrainMethod`), ``base_loss``, the
    sharpness weighting actually used (``eisam_weight``, ``weight_norm``, ``weight_eta``),
    ``tau`` (training logit adjustment), ``posthoc_tau`` (prediction), ``reweight_family``
    and ``per_sample`` (whether the step needs per-sample losses).
    """

    def get(key):
        value = config[key] if key in config else None
        return DEFAULTS[key] if value is None else value

    s = {key: get(key) for key in DEFAULTS}
    method = _choice(s, "train_method", tuple(TRAIN_METHODS))
    spec = s["method"] = TRAIN_METHODS[method]
    _choice(s, "eisam_weight", WEIGHT_FAMILIES)
    _choice(s, "eisam_weight_norm", WEIGHT_NORMS)
    _choice(s, "imbsam_split", IMBSAM_SPLITS)
    _choice(s, "eisam_scope", ("all", "head"))
    for key in ("eisam_rho", "eisam_lambda", "eisam_alpha", "eisam_c", "eisam_gamma", "reweight_beta",
                "logit_adjust_tau"):
        s[key] = float(s[key])
        if not math.isfinite(s[key]):
            raise ValueError(f"{key} must be a finite number, got {s[key]}.")
    if s["eisam_rho"] <= 0:
        raise ValueError(f"eisam_rho must be > 0 (the perturbation radius), got {s['eisam_rho']}.")
    for key in ("eisam_lambda", "reweight_beta", "logit_adjust_tau"):
        if s[key] < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {s[key]}.")
    if not isinstance(s["reweight_eisam_weight"], bool):
        raise ValueError(f"reweight_eisam_weight must be True or False, got {s['reweight_eisam_weight']!r}.")
    for key, low in (("train_sample_num", 0), ("gradient_accumulation_steps", 1), ("lr_warmup_steps", 0),
                     ("eisam_start_epoch", 0), ("imbsam_eta", 1)):
        if isinstance(s[key], bool) or int(s[key]) != s[key] or int(s[key]) < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {s[key]}.")
        s[key] = int(s[key])
    _choice(s, "lr_scheduler", LR_SCHEDULERS)
    if str(s["amp_dtype"]) not in ("bfloat16", "float16"):
        raise ValueError(f"amp_dtype must be bfloat16 or float16, got {s['amp_dtype']!r}.")

    # the base loss l_j, and its knob
    base = s["base_loss"] = _base_loss(s, method)
    s["reweight_family"] = None
    if s["reweight_eisam_weight"]:
        if base != "reweight":
            raise ValueError(
                f"reweight_eisam_weight=True sets the re-weighted loss's weights, but train_method={method} "
                f"trains on the {base} loss; use train_method=reweight (or base_loss: reweight)."
            )
        s["reweight_family"] = s["eisam_weight"]  # the user's family, before a preset replaces it
    if base == "reweight" and s["reweight_family"] is None and s["reweight_beta"] == 0:
        raise ValueError(f"train_method={method} re-weights the loss by n^-reweight_beta, so it needs reweight_beta > 0.")
    if (base == "logit_adjust" or spec.posthoc) and s["logit_adjust_tau"] == 0:
        raise ValueError(f"train_method={method} adjusts the logits by tau log prior, so it needs logit_adjust_tau > 0.")
    s["tau"] = s["logit_adjust_tau"] if base == "logit_adjust" else 0.0
    s["posthoc_tau"] = s["logit_adjust_tau"] if spec.posthoc else 0.0
    if base != "reweight" or s["reweight_family"] is not None:
        s["reweight_beta"] = 0.0

    # the sharpness term: its weighting w and lambda
    s["weight_norm"], s["weight_eta"] = s["eisam_weight_norm"], None
    if spec.sharpness is None:
        s["eisam_lambda"] = 0.0
    elif spec.sharpness == "uniform":
        s["eisam_weight"], s["weight_norm"] = "uniform", "max"
    elif spec.sharpness == "imbsam":  # w = 1 on tail items, 0 elsewhere: lambda w_j in {0, lambda}
        s["eisam_weight"], s["weight_norm"] = "tail", "max"
        s["weight_eta"] = s["imbsam_eta"] if s["imbsam_split"] == "eta" else None
    s["per_sample"] = spec.sharpness is not None or base != "ce"
    return s


def torch_rng_state(device):
    """The states of the torch generators that dropout draws from on ``device``."""
    return torch.random.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_torch_rng_state(state, device):
    """Set the generators back to ``state`` (:func:`torch_rng_state`): the next forward pass
    draws the same dropout masks as the one that followed the snapshot."""
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class EISAMTrainer(Trainer):
    r"""RecBole ``Trainer`` whose step is the EISAM update (ERM, SAM, ImbSAM, ... as settings).

    Models give per-sample losses through ``calculate_logits`` or an adapter
    (:mod:`recbole_eisam.trainer.losses`). With ``train_method: erm`` a model without them
    is trained by RecBole's own ``_train_epoch``; any other method raises ``ValueError``.
    Checkpoints are safetensors + JSON (:mod:`recbole_eisam.trainer.checkpoint`).
    """

    #: per-row resources of RecBole's collector, gathered over processes by :meth:`evaluate`
    ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", "rec.gt_items")

    def __init__(self, config, model):
        if not config["single_spec"] and config["device"].type != "cuda":
            # RecBole wraps the model with device_ids=[local_rank], which CPU modules refuse:
            # build the trainer as for one process, then wrap without device_ids (the
            # wrapper broadcasts rank 0's parameters; our step all-reduces by itself and
            # RecBole's plain loop goes through the wrapper)
            config["single_spec"] = True
            try:
                super().__init__(config, model)
            finally:
                config["single_spec"] = False
            self.distributed_model = DistributedDataParallel(self.model)
        else:
            super().__init__(config, model)
        self.saved_model_file = ckpt.paths(self.saved_model_file)[0]
        self._signal = None  # SIGINT / SIGTERM received during fit (set by the handler only)
        self._stop_vote = False  # the stop flag as all processes agreed on it in the last step
        self._resume = None  # training state of an interruption checkpoint, until it is used
        self._epoch_idx, self._epoch_step, self._epoch_generator = None, 0, None
        self.settings = s = resolve_settings(config)
        self.train_method, self.rho = s["train_method"], s["eisam_rho"]
        self.eisam_lambda = s["eisam_lambda"]
        self.tau, self.posthoc_tau = s["tau"], s["posthoc_tau"]
        self.accumulation = s["gradient_accumulation_steps"]
        self.train_sample_num = s["train_sample_num"]
        self._sampling_logged = False  # the log says once per trainer that epochs are sampled
        self.amp_dtype = getattr(torch, s["amp_dtype"])
        self.logits_fn = get_logits_fn(self.model)
        reason = unsupported_reason(self.model)
        if s["per_sample"] and reason is not None:
            raise ValueError(f"train_method={self.train_method} needs per-sample losses, but {reason}.")
        # eisam_scope: head -> _eisam_head_step whenever there is a perturbation (lambda > 0)
        self.head_split = None
        if s["eisam_scope"] == "head" and self.logits_fn is not None:
            split_reason = head_split_reason(self.model)
            if split_reason is None:
                self.head_split = get_head_split(self.model)
            elif self.eisam_lambda > 0:
                raise ValueError(f"eisam_scope=head needs a backbone/head split, but {split_reason}.")
        if self.enable_scaler and s["method"].sharpness is not None:
            raise ValueError(
                f"train_method={self.train_method} does not support enable_scaler (fp16 GradScaler); "
                "set enable_scaler: False and use enable_amp with amp_dtype: bfloat16."
            )
        if reason is not None and (self.accumulation > 1 or self.train_sample_num > 0):
            self.logger.warning(
                f"{reason}: trained by RecBole's plain loop, which ignores "
                "gradient_accumulation_steps and train_sample_num."
            )
        self.item_weight = self.loss_weight = self.log_prior = self.item_count = None
        self.epoch_stats = {}
        # learning-rate schedule over all optimizer steps of the run (known once fit() sees the data)
        self.total_steps = None
        self.scheduler = None
        if s["lr_scheduler"] != "constant" or s["lr_warmup_steps"] > 0:
            if reason is None:
                self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
            else:  # RecBole's plain loop never steps it: a warm-up would never end
                self.logger.warning(f"{reason}: trained by RecBole's plain loop at a constant learning rate "
                                    "(lr_scheduler and lr_warmup_steps are ignored).")

    def lr_factor(self, step):
        """The learning rate's factor after ``step`` optimizer steps: a linear warm-up over
        ``lr_warmup_steps``, then constant, or a linear / cosine decay to 0 at the last step."""
        s = self.settings
        warmup = s["lr_warmup_steps"]
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if s["lr_scheduler"] == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        if s["lr_scheduler"] == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def steps_per_epoch(self, train_data):
        """Optimizer steps in one epoch of ``train_data`` (this process's share of the sample)."""
        n = train_data.sample_size
        if 0 < self.train_sample_num < n:
            n = self.train_sample_num
        if not self.config["single_spec"]:
            n = len(range(self.config["local_rank"], n, self.config["world_size"]))
        batches = math.ceil(n / train_data.step)
        return math.ceil(batches / self.accumulation)

    # ------------------------------------------------------------------ weights from data
    def setup_item_weights(self, train_dataset):
        """Compute ``item_weight`` (and the re-weighting / logit-adjustment vectors) from the
        training split's item frequencies (every training interaction)."""
        s = self.settings
        counts = item_counts(train_dataset)
        params = dict(alpha=s["eisam_alpha"], c=s["eisam_c"], gamma=s["eisam_gamma"], head_ratio=s["head_ratio"])
        self.item_count = counts
        self.item_weight = item_weights(
            counts, s["eisam_weight"], s["weight_norm"], eta=s["weight_eta"], **params
        ).to(self.device)
        if s["reweight_family"] is not None:  # EISAM's own w(n) as loss weights
            self.loss_weight = item_weights(counts, s["reweight_family"], "mean", **params).to(self.device)
        elif s["reweight_beta"] > 0:
            self.loss_weight = reweight_weights(counts, s["reweight_beta"]).to(self.device)
        else:
            self.loss_weight = None
        adjusted = self.tau > 0 or self.posthoc_tau > 0
        self.log_prior = log_prior(counts).to(self.device) if adjusted else None
        return self.item_weight

    @property
    def active_lambda(self):
        """lambda in the current epoch: 0 before ``eisam_start_epoch`` (the step is then the
        base loss's plain step), ``eisam_lambda`` from that epoch on."""
        epoch = self._epoch_idx or 0
        return self.eisam_lambda if epoch >= self.settings["eisam_start_epoch"] else 0.0

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit`` with SIGINT / SIGTERM turned into a checkpoint to resume from.

        While it runs, SIGINT and SIGTERM only set a flag (the previous handlers are put
        back afterwards); the flag is looked at after every optimizer step and at every
        epoch boundary, where :meth:`_interrupt` saves and raises ``TrainingInterrupted``.
        """
        self.setup_item_weights(train_data.dataset)
        if self.scheduler is not None:
            self.total_steps = self.epochs * self.steps_per_epoch(train_data)
        if self.logits_fn is not None and verbose:
            self.logger.info(
                set_color("EISAM", "green") + f": train_method={self.train_method}, "
                f"base_loss={self.settings['base_loss']}, weight={self.settings['eisam_weight']} "
                f"({self.settings['weight_norm']}-normalised), lambda={self.eisam_lambda:.4g}, rho={self.rho}, "
                f"start epoch={self.settings['eisam_start_epoch']}, reweight_beta={self.settings['reweight_beta']}, "
                f"reweight_eisam_weight={self.settings['reweight_eisam_weight']}, logit_adjust_tau={self.tau}, "
                f"post-hoc tau={self.posthoc_tau}"
            )
        if self._resume is not None and self._resume["finished"]:
            saved = False  # training had ended: nothing to train, the best checkpoint stays as it is
        with self._signals_set_flag():
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
            if self._stop_requested():  # a signal during the last validation: training is complete
                self._interrupt(train_data, self.epochs, 0, finished=True)
        return result

    @contextlib.contextmanager
    def _signals_set_flag(self):
        """SIGINT and SIGTERM set ``self._signal`` (main thread only; elsewhere a no-op)."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is None:
                self._signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, signal.SIG_DFL if old is None else old)

    def _stop_requested(self):
        """Whether any process got a signal (one all-reduce in distributed mode)."""
        flag = torch.tensor([float(self._signal is not None)], device=self.device)
        return self._all_reduce([flag])[0].item() > 0

    # ------------------------------------------------------------------ the EISAM step
    def _losses(self, interaction):
        """Per-sample losses l_j, item weights w_j and the optional unweighted regulariser."""
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.enable_amp):
            out = self.logits_fn(interaction)
            logits, target = out[0], out[1]
            loss = per_sample_losses(logits, target, self.log_prior, self.tau)
        if self.loss_weight is not None:
            loss = loss * self.loss_weight[target].to(loss.dtype)
        extra = out[2] if len(out) > 2 else None
        return loss, self.item_weight[target].to(loss.dtype), extra

    def _eisam_step(self, batches, scaler):
        r"""One optimizer step on the micro-batches ``batches`` (M samples in all).

        pass 1 at theta:   p.grad <- grad sum_j (1 - lambda w_j) l_j ;  g_w <- grad (1/M) sum_j w_j l_j
        perturb:           e = rho * g_w / ||g_w||,  theta <- theta + e   (values of theta saved)
        pass 2 at theta+e: p.grad += grad sum_j lambda w_j l_j(theta + e);  theta <- saved values
        step:              G = p.grad / M = grad L - lambda grad L_w(theta) + lambda grad L_w(theta + e)
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        lam = self.active_lambda
        perturb = lam > 0
        self.optimizer.zero_grad(set_to_none=True)
        g_w = [torch.zeros_like(p) for p in params] if perturb else None
        m, loss_sum, lw_sum = 0, 0.0, 0.0  # sums of l_j (+ regulariser) and of w_j l_j, for the log
        masks = []  # per micro-batch: the random state its dropout masks were drawn from
        for interaction in batches:  # pass 1 at theta
            masks.append(torch_rng_state(self.device))
            loss, w, extra = self._losses(interaction)
            m += loss.numel()
            if perturb:
                grads = torch.autograd.grad((w * loss).sum(), params, retain_graph=True, allow_unused=True)
                for g, d in zip(g_w, grads):
                    if d is not None:
                        g.add_(d)
            objective = ((1 - lam * w) * loss).sum()
            if extra is not None:  # a regulariser of L: mean over samples => M_b * extra in the sum
                objective = objective + loss.numel() * extra
            scaler.scale(objective).backward()
            lw_batch = (w * loss).detach().sum()
            loss_sum, lw_sum = loss_sum + objective.detach() + lam * lw_batch, lw_sum + lw_batch
        m, loss_sum, lw_sum = self._reduce_step_sums(m, loss_sum, lw_sum)  # one host sync per step
        self._check_finite(loss_sum / m)
        stats = {"loss": loss_sum / m, "lw": lw_sum / m, "samples": m}
        if perturb:
            g_w, dtype, norm = self._global_grad_norm(g_w, m)
            if not torch.isfinite(norm):
                self.logger.warning(f"EISAM: ||grad L_w|| = {norm.item()} is not finite; step skipped.")
                self.optimizer.zero_grad(set_to_none=True)
                return dict(stats, skipped=1)
            if norm > 0:
                saved = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, g in zip(params, g_w):
                        p.add_(g.to(dtype) * (self.rho / norm))  # theta + e
                lw_e_sum = 0.0
                for interaction, mask in zip(batches, masks):  # pass 2 at theta + e, pass 1's masks
                    set_torch_rng_state(mask, self.device)
                    loss, w, _ = self._losses(interaction)
                    scaler.scale(lam * (w * loss).sum()).backward()
                    lw_e_sum = lw_e_sum + (w * loss).detach().sum()
                with torch.no_grad():
                    for p, value in zip(params, saved):
                        p.copy_(value)  # exact restore, not theta + e - e
                stats["sharpness"] = (float(lw_e_sum) - lw_sum) / m
            else:
                self.logger.debug("EISAM: ||grad L_w|| = 0, so e = 0 and G = grad L (perturbed pass skipped).")
                stats["zero_norm"] = 1
        self._apply_update(params, m, scaler)
        return stats

    def _global_grad_norm(self, g_w, m):
        """``(g_w, dtype, ||g_w||)``: the summed g_w all-reduced over processes and divided by M,
        the dtype e is computed in (float64 for float64 weights, else float32) and the norm."""
        g_w = [g.div_(m) for g in self._all_reduce(g_w)]
        dtype = torch.float64 if g_w[0].dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.to(dtype)) for g in g_w]))
        return g_w, dtype, norm

    def _apply_update(self, params, m, scaler):
        """G = (summed .grad, all-reduced over processes) / M, then clipping and the optimizer step."""
        grads = [p.grad for p in params if p.grad is not None]
        for g in self._all_reduce(grads):
            g.div_(m)
        scaler.unscale_(self.optimizer)
        if self.clip_grad_norm:
            clip_grad_norm_(params, **self.clip_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def _step(self, batches, scaler):
        """One optimizer step, dispatched on ``eisam_scope`` (head: only when there is a perturbation)."""
        if self.head_split is not None and self.active_lambda > 0:
            return self._eisam_head_step(batches, scaler)
        return self._eisam_step(batches, scaler)

    def _head_losses(self, hidden, target, head_tensors=None):
        """l_j and w_j from the head alone: ``score(hidden)``, or ``score`` evaluated with the head
        tensors ``head_tensors`` (name -> tensor) in place of the parameters, functionally."""
        split = self.head_split
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.enable_amp):
            if head_tensors is None:
                logits = split.score(hidden)
            else:
                logits = split.score_with(hidden, head_tensors)
            loss = per_sample_losses(logits, target, self.log_prior, self.tau)
        if self.loss_weight is not None:
            loss = loss * self.loss_weight[target].to(loss.dtype)
        return loss, self.item_weight[target].to(loss.dtype)

    def _eisam_head_step(self, batches, scaler):
        r"""One optimizer step with e restricted to the head (``eisam_scope: head``).

        The backbone output does not depend on the head, so for e on the head tensors only
        the update is the gradient of one scalar, e held constant (docs/EISAM.md, "Where the
        perturbation lives")::

            C = (1/M) sum_j [ (1 - lambda w_j) l_j(head) + lambda w_j l_j(head + e) ]

        pass 1:  hidden = encode(batch) (backbone graph kept), h = hidden.detach() (a leaf);
                 l_j = CE(score(h)) with the main step's pipeline (logit adjustment,
                 re-weighting, w_j; a regulariser goes into L only);
                 g_w += grad_head sum_j w_j l_j                     (head-only backward)
        perturb: e = rho g_w / ||g_w||, the norm over the head tensors only (fp32, or fp64)
        pass 2:  l^e_j = CE(score_{head + e}(h)): the head tensors p + e are new tensors
                 (``torch.func.functional_call``), nothing is changed in place;
                 backward of M*C -> h.grad and the head's .grad; then hidden.backward(h.grad):
                 the ONE backbone backward of the step
        step:    G = p.grad / M, clipping and the optimizer step as in :meth:`_eisam_step`.

        Costs one backbone forward and one backbone backward (as ERM) plus three head
        passes. Gradient accumulation: e comes from the whole accumulated batch, so pass 1
        keeps every micro-batch's hidden with its backbone graph alive until pass 2
        (activation memory grows with the number of micro-batches, as one large batch would;
        recomputing the backbone instead would cost the forward this scope saves).
        Tied item embeddings (RecBole's models): e perturbs the output use only, see
        :mod:`recbole_eisam.trainer.losses`. A zero ||g_w|| gives e = 0, l^e_j = l_j and the
        step G = grad L exactly; a non-finite one skips the step, as in :meth:`_eisam_step`.
        """
        split = self.head_split
        named = dict(self.model.named_parameters())
        head = [named[name] for name in split.head_names]
        params = [p for p in self.model.parameters() if p.requires_grad]
        lam = self.active_lambda
        self.optimizer.zero_grad(set_to_none=True)
        g_w = [torch.zeros_like(p) for p in head]
        kept = []  # per micro-batch: hidden (with its backbone graph), h, target, l_j, w_j, extra
        m, loss_sum, lw_sum = 0, 0.0, 0.0
        for interaction in batches:  # pass 1 at theta: backbone forward once, head-only g_w
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.enable_amp):
                hidden, target, extra = split.encode(interaction)
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            mask = torch_rng_state(self.device)  # the head's dropout masks, drawn again in pass 2
            loss, w = self._head_losses(h, target)
            grads = torch.autograd.grad((w * loss).sum(), head, retain_graph=True, allow_unused=True)
            for g, d in zip(g_w, grads):
                if d is not None:
                    g.add_(d)
            kept.append((hidden, h, target, loss, w, extra, mask))
            m += loss.numel()
            lw_batch = (w * loss).detach().sum()
            loss_batch = loss.detach().sum() + (0.0 if extra is None else loss.numel() * extra.detach())
            loss_sum, lw_sum = loss_sum + loss_batch, lw_sum + lw_batch
        m, loss_sum, lw_sum = self._reduce_step_sums(m, loss_sum, lw_sum)
        self._check_finite(loss_sum / m)
        stats = {"loss": loss_sum / m, "lw": lw_sum / m, "samples": m}
        g_w, dtype, norm = self._global_grad_norm(g_w, m)
        if not torch.isfinite(norm):
            self.logger.warning(f"EISAM: ||grad_head L_w|| = {norm.item()} is not finite; step skipped.")
            self.optimizer.zero_grad(set_to_none=True)
            return dict(stats, skipped=1)
        perturbed = None  # the head tensors p + e (e detached): new tensors, p untouched
        if norm > 0:
            perturbed = {
                name: p + (g.to(dtype) * (self.rho / norm)).to(p.dtype)
                for name, p, g in zip(split.head_names, head, g_w)
            }
        else:
            self.logger.debug("EISAM: ||grad_head L_w|| = 0, so e = 0 and G = grad L.")
            stats["zero_norm"] = 1
        lw_e_sum = 0.0
        for hidden, h, target, loss, w, extra, mask in kept:  # pass 2: head at theta + e, one backbone backward
            if perturbed is None:
                loss_e = loss
            else:
                set_torch_rng_state(mask, self.device)
                loss_e = self._head_losses(h, target, perturbed)[0]
            objective = ((1 - lam * w) * loss).sum() + lam * (w * loss_e).sum()
            if extra is not None:
                objective = objective + loss.numel() * extra
            scaler.scale(objective).backward()  # h.grad, the head's .grad (and the regulariser's)
            if h.grad is not None:
                hidden.backward(h.grad)  # the backbone, once
            lw_e_sum = lw_e_sum + (w * loss_e).detach().sum()
        kept.clear()
        if perturbed is not None:
            stats["sharpness"] = (float(lw_e_sum) - lw_sum) / m
        self._apply_update(params, m, scaler)
        return stats

    def _reduce_step_sums(self, m, loss_sum, lw_sum):
        """Global (M, sum of losses, sum of w_j l_j) of a step: one all-reduce in distributed
        mode, which also carries the vote to stop (:attr:`_stop_vote`), so that every
        process stops after the same step."""
        sums = torch.tensor(
            [float(m), float(loss_sum), float(lw_sum), float(self._signal is not None)],
            dtype=torch.float64, device=self.device,
        )
        m, loss_sum, lw_sum, votes = self._all_reduce([sums])[0].tolist()
        self._stop_vote = votes > 0
        return m, loss_sum, lw_sum

    def _check_nan(self, loss):
        """RecBole's loop calls this once per batch, before ``backward``."""
        self._epoch_step += 1
        self._check_finite(float(loss.detach()))

    def _check_finite(self, loss):
        """Stop training on a nan / inf loss, before the optimizer step that would spread it."""
        if math.isfinite(loss):
            return
        raise NonFiniteLossError(
            f"Training stopped: the loss is {loss} at epoch {self._epoch_idx}, step {self._epoch_step}; "
            f"{self._kept_checkpoint()} (a smaller learning_rate or clip_grad_norm may help)."
        )

    def _kept_checkpoint(self):
        if os.path.exists(self.saved_model_file):
            return f"the last good checkpoint {self.saved_model_file} is kept"
        return "no checkpoint had been saved yet"

    def _all_reduce(self, tensors):
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

    # ------------------------------------------------------------------ the epoch
    def _epoch_batches(self, train_data, epoch_idx):
        """The epoch's batches: all of ``train_data``, or a fresh sample of train_sample_num sequences."""
        size = train_data.sample_size
        n = self.train_sample_num
        if n <= 0 or n >= size:
            return train_data, len(train_data)
        if not self._sampling_logged:
            self.logger.info(
                f"train_sample_num={n}: every epoch trains on a fresh random sample of {n} of the "
                f"{size} training sequences."
            )
            self._sampling_logged = True
        generator = torch.Generator().manual_seed(int(self.config["seed"] or 0) * 1000003 + epoch_idx)
        index = torch.randperm(size, generator=generator)[:n]
        if not self.config["single_spec"]:
            index = index[self.config["local_rank"] :: self.config["world_size"]]
        step = train_data.step
        chunks = [index[i : i + step].tolist() for i in range(0, len(index), step)]
        return (train_data.collate_fn(chunk) for chunk in chunks), len(chunks)

    def _begin_epoch(self, train_data, epoch_idx):
        """Apply a pending resume state, remember the data order's generator, and stop here
        when a signal came since the last step (e.g. during validation).

        Returns the resume state when this epoch continues an interrupted one, else None.
        """
        self._epoch_idx, self._epoch_step = epoch_idx, 0
        resume, generator = self._resume, getattr(train_data, "generator", None)
        if resume is not None and resume["epoch"] == epoch_idx:
            self._resume = None
            if generator is not None and resume.get("generator") is not None:
                generator.set_state(resume["generator"])
            if resume["step"] == 0:
                ckpt.set_rng_state(resume["rng"])
        else:
            resume = None
        # the start-of-epoch state of the generator the data loader shuffles with
        self._epoch_generator = generator.get_state() if generator is not None else None
        if self._stop_requested():
            self._interrupt(train_data, epoch_idx, 0)
        return resume

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        resume = self._begin_epoch(train_data, epoch_idx)
        if self.logits_fn is None or loss_func is not None:  # plain ERM: RecBole's own loop
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        if self.item_weight is None:
            self.setup_item_weights(train_data.dataset)
        self.model.train()
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        batches, total = self._epoch_batches(train_data, epoch_idx)
        batches = iter(batches)  # the data order is drawn here, from the epoch's generator state
        totals = {"loss": 0.0, "lw": 0.0, "sharpness": 0.0, "samples": 0, "skipped": 0, "zero_norm": 0}
        steps, perturbed, group, done = 0, 0, [], 0
        if resume is not None and resume["step"] > 0:  # continue after the step of the interruption
            done = min(resume["step"] * self.accumulation, total)
            for _ in itertools.islice(batches, done):
                pass
            ckpt.set_rng_state(resume["rng"])  # after skipping: collating may draw random numbers
            totals.update(resume["totals"])
            steps, perturbed = resume["step"], resume["perturbed"]
        if show_progress:
            batches = tqdm(batches, total=total, initial=done, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
        scaler = torch.amp.GradScaler("cuda", enabled=self.enable_scaler)
        start = time()
        for interaction in batches:
            group.append(interaction.to(self.device))
            if len(group) < self.accumulation:
                continue
            self._epoch_step = steps + 1
            stats = self._step(group, scaler)
            group, steps, perturbed = [], steps + 1, perturbed + ("sharpness" in stats)
            for key, value in stats.items():
                totals[key] += value
            if self._stop_after_step():
                self._interrupt(train_data, epoch_idx, steps, totals, perturbed)
        if group:
            self._epoch_step = steps + 1
            stats = self._step(group, scaler)
            steps, perturbed = steps + 1, perturbed + ("sharpness" in stats)
            for key, value in stats.items():
                totals[key] += value
            if self._stop_after_step():
                self._interrupt(train_data, epoch_idx, steps, totals, perturbed)
        self.epoch_stats = {
            "train_loss": totals["loss"],
            "mean_L_w": totals["lw"] / max(steps, 1),
            "mean_sharpness": totals["sharpness"] / max(perturbed, 1),
            "samples": int(totals["samples"]),
            "steps": steps,
            "skipped_steps": totals["skipped"],
            "zero_norm_steps": totals["zero_norm"],
            "time": time() - start,
        }
        self._log_epoch_stats(epoch_idx)
        return totals["loss"]

    def _log_epoch_stats(self, epoch_idx):
        st = self.epoch_stats
        message = (
            set_color(f"epoch {epoch_idx} {self.train_method}", "green")
            + f" [samples: {st['samples']}, steps: {st['steps']}, mean L_w: {st['mean_L_w']:.4f}"
        )
        if self.active_lambda > 0:
            message += (
                f", mean sharpness L_w(theta+e)-L_w(theta): {st['mean_sharpness']:.6f}"
                f", zero-norm steps: {st['zero_norm_steps']}, skipped steps: {st['skipped_steps']}"
            )
        self.logger.info(message + "]")
        self._add_train_loss_to_tensorboard(epoch_idx, st["mean_L_w"], tag="Loss/Train_L_w")
        if self.active_lambda > 0:
            self._add_train_loss_to_tensorboard(epoch_idx, st["mean_sharpness"], tag="Loss/Train_sharpness")

    def _stop_after_step(self):
        """After a step: stop if a signal came (in distributed mode: on any process, as voted
        in the step's all-reduce, so that all processes stop after the same step)."""
        if self.config["single_spec"]:
            return self._signal is not None
        return self._stop_vote

    # ------------------------------------------------------------------ interruption
    def _is_main_process(self):
        return self.config["single_spec"] or dist.get_rank() == 0

    def _interrupt(self, train_data, epoch_idx, step, totals=None, perturbed=0, finished=False):
        """Write the checkpoint to resume from (rank 0), then raise ``TrainingInterrupted``.

        It holds the weights and optimizer state after ``step`` optimizer steps of epoch
        ``epoch_idx``, the early-stopping state (best valid score and result, the
        counter, the best checkpoint's path), the epoch's partial statistics, the data
        loader's generator state at the start of the epoch, the random generators'
        states now (every process's, in distributed mode), and the state of ``self.scheduler``
        when there is a learning-rate scheduler (``lr_scheduler``).
        """
        path = ckpt.resume_path(self.saved_model_file)
        rng = ckpt.rng_state()
        if self.config["single_spec"]:
            states = {f"rank0.{key}": value for key, value in rng.items()}
        else:  # every process's generators (they differ: seeded with seed + rank)
            states = {}
            for key, value in sorted(rng.items()):
                value = value.to(self.device)
                gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, value)
                states.update({f"rank{r}.{key}": t.cpu() for r, t in enumerate(gathered)})
        if self._epoch_generator is not None and not finished:
            states["generator"] = self._epoch_generator
        name = signal.Signals(self._signal).name if self._signal else "a signal to another process"
        state = {
            "epoch": epoch_idx,
            "step": step,
            "finished": finished,
            "best_valid_result": None if self.best_valid_result is None else {
                key: float(value) for key, value in self.best_valid_result.items()
            },
            "best_model_file": self.saved_model_file,
            "totals": totals or {},
            "perturbed": perturbed,
            "signal": name,
            "world_size": 1 if self.config["single_spec"] else dist.get_world_size(),
        }
        scheduler = getattr(self, "scheduler", None)  # none unless lr_scheduler / lr_warmup_steps ask for one
        if scheduler is not None:
            state["scheduler"] = json.loads(json.dumps(scheduler.state_dict(), default=lambda o: None))
        if self._is_main_process():
            tensors, other_json = self._checkpoint_tensors()
            meta = self._checkpoint_meta(epoch_idx - 1, other_json)
            meta["training_state"] = state
            ckpt.save_checkpoint(path, tensors, meta, self.optimizer, state_tensors=states)
        if not self.config["single_spec"]:
            dist.barrier()  # no process exits (and gets the others killed) before the file is complete
        where = "after its last epoch" if finished else f"at epoch {epoch_idx}, step {step}"
        self.logger.warning(f"Interrupted by {name} {where}: checkpoint {path} written.")
        raise TrainingInterrupted(
            f"Training interrupted by {name} {where}; its state is saved in {path}: continue with "
            f"--resume={path} and the same other options.",
            exit_code=128 + int(self._signal or signal.SIGTERM),
            checkpoint=path,
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_tensors(self):
        model = self.model
        if hasattr(model, "checkpoint_state_dict"):
            tensors = dict(model.checkpoint_state_dict())
        else:
            tensors = dict(model.state_dict())
        other, other_json = model.other_parameter() or {}, {}
        for key, value in other.items():
            if torch.is_tensor(value):
                tensors[f"__other__.{key}"] = value
            else:
                other_json[key] = value
        return tensors, other_json

    def _checkpoint_meta(self, epoch, other_json):
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "train_method": self.train_method,
            "partial_state_dict": hasattr(self.model, "checkpoint_state_dict"),
            "other_parameter": other_json,
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """Rank 0 writes the checkpoint; weights that are not finite are never written (every
        process checks, their weights are the same, so all of them stop together)."""
        tensors, other_json = self._checkpoint_tensors()
        bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteLossError(
                f"Training stopped: the weights ({bad[0]}) are not finite after epoch {epoch}; "
                f"{self._kept_checkpoint()} (a smaller learning_rate or clip_grad_norm may help)."
            )
        if not self._is_main_process():
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        meta = self._checkpoint_meta(epoch, other_json)
        saved_model_file = ckpt.save_checkpoint(saved_model_file, tensors, meta, self.optimizer)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _load_weights(self, model_file):
        """Load model tensors (and RecBole's other_parameter) from our checkpoint; returns its meta."""
        tensors, meta, opt_state = ckpt.load_checkpoint(
            model_file, self.device, expect_model=self.config["model"], expect_dataset=self.config["dataset"]
        )
        other = {k[len("__other__.") :]: v for k, v in tensors.items() if k.startswith("__other__.")}
        state = {k: v for k, v in tensors.items() if not k.startswith("__other__.")}
        self.model.load_state_dict(state, strict=not hasattr(self.model, "checkpoint_state_dict"))
        other.update(meta.get("other_parameter") or {})
        if other:
            self.model.load_other_parameter(other)
        return meta, opt_state

    def resume_checkpoint(self, resume_file):
        """Continue training from a checkpoint (safetensors + JSON, nothing unpickled).

        From an interruption checkpoint (``...-resume.safetensors``, see :meth:`_interrupt`)
        the continued run is bit-identical to an uninterrupted one with the same seed
        (a test checks the final weights and metrics): weights, optimizer state and the
        early-stopping state are restored here; then, in the interrupted epoch, the data
        loader's generator is set back to its state at the start of that epoch, so that
        the epoch's batch order is drawn again identically, the batches of the steps
        already taken are skipped (drawn and collated, not trained on), and only then the
        random generators (python, numpy, torch CPU and CUDA) are set to their states at
        the interruption, so dropout and any random draw continue where they stopped.
        In distributed mode every process gets its own generators back (same world size).

        From any other checkpoint of this trainer (a best-model checkpoint), training goes
        on at the epoch after the saved one, RecBole's semantics, without the random states:
        that run is not identical to an uninterrupted one.
        """
        meta, opt_state = self._load_weights(resume_file)  # refuses pickles, foreign checkpoints
        resume_file = ckpt.paths(resume_file)[0]
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        self.cur_step = meta["cur_step"]
        self.best_valid_score = meta["best_valid_score"]
        state = meta.get("training_state")
        if state is None:
            self.saved_model_file = resume_file
            self.start_epoch = meta["epoch"] + 1
            self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")
            return
        tensors = ckpt.load_state_tensors(resume_file)
        rank = 0 if self.config["single_spec"] else dist.get_rank()
        if f"rank{rank}.torch" not in tensors:
            self.logger.warning(
                f"{resume_file} has no random state for process {rank} (written with world size "
                f"{state['world_size']}); using process 0's: the run is not identical to an uninterrupted one."
            )
            rank = 0
        prefix = f"rank{rank}."
        rng = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        self._resume = dict(state, rng=rng, generator=tensors.get("generator"))
        if state.get("scheduler") is not None and getattr(self, "scheduler", None) is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.best_valid_result = state["best_valid_result"]
        self.saved_model_file = ckpt.paths(state["best_model_file"])[0]
        self.start_epoch = self.epochs if state["finished"] else state["epoch"]
        where = "training had finished" if state["finished"] else f"epoch {state['epoch']}, after step {state['step']}"
        self.logger.info(f"Checkpoint loaded. Resume training at {where} (best checkpoint: {self.saved_model_file}).")

    def _full_sort_batch_eval(self, batched_data):
        """RecBole's full-sort scoring, plus ``eval_mask_history``: the items of each user's
        input sequence are ranked last, as RecBole already does for general models (Pop,
        BPR...) with their training items. Right for data without repeat consumption
        (MovieLens ratings); set it to False where users consume an item again."""
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        scores = self._adjust_posthoc(scores)
        seq_field = self.config["ITEM_ID_FIELD"] + self.config["LIST_SUFFIX"]
        if self.config["eval_mask_history"] and seq_field in interaction:
            seq = interaction[seq_field].to(scores.device)
            scores.scatter_(1, seq, -math.inf)  # padding id 0 is already -inf
        return interaction, scores, positive_u, positive_i

    def _neg_sample_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._neg_sample_batch_eval(batched_data)
        if scores.dim() == 2:  # ranking: a [users, items] matrix, -inf outside the candidates
            scores = self._adjust_posthoc(scores)
        return interaction, scores, positive_u, positive_i

    def _adjust_posthoc(self, scores):
        """``logit_adjust_posthoc``: rank by ``scores - tau * log prior`` (Menon et al. 2021), so
        validation, test metrics and ``--save_topk`` all see the adjusted ranking."""
        if not self.posthoc_tau:
            return scores
        if self.log_prior is None:
            raise RuntimeError("post-hoc logit adjustment needs the training split's prior: call fit() first.")
        if scores.size(-1) != self.log_prior.numel():
            raise ValueError(
                f"logit adjustment: the model gives {scores.size(-1)} scores per user but "
                f"the training split has {self.log_prior.numel()} items."
            )
        return scores - self.posthoc_tau * self.log_prior.to(device=scores.device, dtype=scores.dtype)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            self._load_weights(checkpoint_file)
            self.logger.info(f"Loading model parameters from {ckpt.paths(checkpoint_file)[0]}")
        if self.config["single_spec"]:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        collector = self.eval_collector
        get_data_struct = collector.get_data_struct
        collector.get_data_struct = lambda: self._gather_rows(get_data_struct(), eval_data)
        try:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        finally:
            del collector.get_data_struct  # back to the class's method

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
