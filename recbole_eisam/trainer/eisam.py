r"""EISAM: Efficient Item-wise Sharpness-Aware Minimization, as one RecBole trainer.

docs/EISAM.md holds the method: the objective and the update, the special cases (ERM,
SAM, ImbSAM), the weightings and their normalisations, the base losses, the head scope,
the schedules, and the cost of each method in passes. The update itself is
:func:`recbole_eisam.trainer.update.eisam_step`; this module is RecBole's side: the hooks,
the epoch loop, the logging and the evaluation. Interruption and resume live in
:mod:`~recbole_eisam.trainer.resume`, several processes in
:mod:`~recbole_eisam.trainer.distributed`, checkpoints in :mod:`~recbole_eisam.trainer.checkpoint`.
"""

import math
from time import time

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from recbole_eisam.errors import NonFiniteLossError
from recbole_eisam.trainer import checkpoint as ckpt
from recbole_eisam.trainer.checkpoint import CheckpointMixin
from recbole_eisam.trainer.distributed import DistributedMixin
from recbole_eisam.trainer.losses import get_head_split, get_losses_fn, head_split_reason, unsupported_reason
from recbole_eisam.trainer.resume import ResumeMixin
from recbole_eisam.trainer.settings import resolve_settings
from recbole_eisam.trainer.update import AllScope, HeadScope, eisam_step
from recbole_eisam.trainer.weighting import item_weights, log_prior, reweight_weights
from recbole_eisam.utils.longtail import item_counts


class EISAMTrainer(ResumeMixin, DistributedMixin, CheckpointMixin, Trainer):
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
        self.saved_model_file = self.same_on_every_process(ckpt.run_path(self.saved_model_file))
        self._signal = None  # SIGINT / SIGTERM received during fit (set by the handler only)
        self._stop_vote = False  # the stop flag as all processes agreed on it in the last step
        self._resume = None  # training state of an interruption checkpoint, until it is used
        self._epoch_idx, self._epoch_step, self._epoch_generator = None, 0, None
        self.settings = s = resolve_settings(config)
        self.train_method, self.rho = s["train_method"], s["eisam_rho"]
        self.eisam_lambda = s["eisam_lambda"]
        self.tau, self.posthoc_tau = s["tau"], s["posthoc_tau"]
        if hasattr(model, "posthoc_tau"):  # a model that decodes applies the post-hoc adjustment itself
            model.posthoc_tau = self.posthoc_tau
        self.accumulation = s["gradient_accumulation_steps"]
        self.train_sample_num = s["train_sample_num"]
        self._sampling_logged = False  # the log says once per trainer that epochs are sampled
        self.amp_dtype = getattr(torch, s["amp_dtype"])
        self.losses_fn = get_losses_fn(self.model)  # (interaction, log_prior, tau) -> (l_j, target, extra)
        reason = unsupported_reason(self.model)
        if s["per_sample"] and reason is not None:
            raise ValueError(f"train_method={self.train_method} needs per-sample losses, but {reason}.")
        # eisam_scope: head -> HeadScope whenever there is a perturbation (lambda > 0)
        self.head_split = None
        if s["eisam_scope"] == "head" and self.losses_fn is not None:
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
        self.valid_curve = []  # [epoch, valid score] of every validation (training_summary)
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
        if self.losses_fn is not None and verbose:
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

    def _step(self, batches, scaler):
        """One optimizer step of the update, in ``eisam_scope`` (head: only when there is a perturbation)."""
        head = self.head_split is not None and self.active_lambda > 0
        return eisam_step(self, batches, HeadScope(self) if head else AllScope(self), scaler)

    def autocast(self):
        """The autocast context of the forward passes (``enable_amp``, ``amp_dtype``)."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.enable_amp)

    def _check_nan(self, loss):
        """RecBole's loop calls this once per batch, before ``backward``."""
        self._epoch_step += 1
        self.check_finite(float(loss.detach()))

    def check_finite(self, loss):
        """Stop training on a nan / inf loss, before the optimizer step that would spread it."""
        if math.isfinite(loss):
            return
        raise NonFiniteLossError(
            f"Training stopped: the loss is {loss} at epoch {self._epoch_idx}, step {self._epoch_step}; "
            f"{self._kept_checkpoint()} (a smaller learning_rate or clip_grad_norm may help)."
        )

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

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        resume = self._begin_epoch(train_data, epoch_idx)
        if self.losses_fn is None or loss_func is not None:  # plain ERM: RecBole's own loop
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        if self.item_weight is None:
            self.setup_item_weights(train_data.dataset)
        self.model.train()
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        batches, total = self._epoch_batches(train_data, epoch_idx)
        batches = iter(batches)  # the data order is drawn here, from the epoch's generator state
        totals = {"loss": 0.0, "lw": 0.0, "sharpness": 0.0, "samples": 0, "skipped": 0, "zero_norm": 0}
        steps, perturbed, done = 0, 0, 0
        if resume is not None and resume["step"] > 0:  # continue after the step of the interruption
            done, steps, perturbed = self._skip_taken_steps(batches, total, resume, totals)
        if show_progress:
            batches = tqdm(batches, total=total, initial=done, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
        scaler = torch.amp.GradScaler("cuda", enabled=self.enable_scaler)
        start = time()
        for group in self._micro_batch_groups(batches):
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

    def _valid_epoch(self, valid_data, show_progress=False):
        """RecBole's validation, remembered in :attr:`valid_curve` as ``[epoch, valid score]``."""
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.valid_curve.append([self._epoch_idx, float(score)])
        return score, result

    def training_summary(self):
        """``{"valid_curve": [[epoch, score], ...], "best_epoch": ..., "epochs_trained": ...}``: when
        validation peaked (the last of equal bests, the checkpoint RecBole's early stopping
        keeps) and how long training ran, so a report can tell a converged run from one cut off
        by ``epochs``."""
        curve = self.valid_curve
        best = max(reversed(curve), key=lambda point: point[1])[0] if curve else None
        trained = (self._epoch_idx + 1) if self._epoch_idx is not None else 0
        return {"valid_curve": [list(point) for point in curve], "best_epoch": best, "epochs_trained": trained,
                "max_epochs": self.epochs}

    def _micro_batch_groups(self, batches):
        """The micro-batches of each optimizer step (``gradient_accumulation_steps`` of them, on
        the device; the last group may be smaller)."""
        group = []
        for interaction in batches:
            group.append(interaction.to(self.device))
            if len(group) == self.accumulation:
                yield group
                group = []
        if group:
            yield group

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

    def _full_sort_batch_eval(self, batched_data):
        """RecBole's full-sort scoring, plus ``eval_mask_history``: the items of each user's
        input sequence are ranked last, as RecBole already does for general models (Pop,
        BPR...) with their training items. Right for data without repeat consumption
        (MovieLens ratings); set it to False where users consume an item again."""
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if not hasattr(self.model, "posthoc_tau"):  # else the model adjusts as it decodes (LLMRecGen)
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
        try:
            return self._evaluate(eval_data, show_progress)
        finally:
            if self.is_main_process() and hasattr(self.model, "flush_caches"):
                self.model.flush_caches()  # e.g. LLMRec's frozen prompt states of the new users

    def _evaluate(self, eval_data, show_progress):
        if self.config["single_spec"]:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        collector = self.eval_collector
        get_data_struct = collector.get_data_struct
        collector.get_data_struct = lambda: self._gather_rows(get_data_struct(), eval_data)
        try:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        finally:
            del collector.get_data_struct  # back to the class's method
