"""Interruption and resume: SIGINT / SIGTERM become a checkpoint to continue from, bit for bit.

While :meth:`EISAMTrainer.fit` runs, the signals only set a flag; the flag is looked at
after every optimizer step and at every epoch boundary (in distributed mode as a vote that
rides on the step's all-reduce, so every process stops after the same step), where
:meth:`ResumeMixin._interrupt` writes ``<checkpoint>-resume.safetensors`` and raises
:class:`~recbole_eisam.errors.TrainingInterrupted`. :meth:`ResumeMixin.resume_checkpoint`
continues from it exactly as an uninterrupted run would have gone on.
"""

import contextlib
import itertools
import json
import signal
import threading

import torch
import torch.distributed as dist

from recbole_eisam.errors import TrainingInterrupted
from recbole_eisam.trainer import checkpoint as ckpt


class ResumeMixin:
    """The interruption and resume half of :class:`~recbole_eisam.trainer.EISAMTrainer`."""

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
        return self.all_reduce([flag])[0].item() > 0

    def _stop_after_step(self):
        """After a step: stop if a signal came (in distributed mode: on any process, as voted
        in the step's all-reduce, so that all processes stop after the same step)."""
        if self.config["single_spec"]:
            return self._signal is not None
        return self._stop_vote

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

    def _skip_taken_steps(self, batches, total, resume, totals):
        """In an interrupted epoch: draw (and drop) the batches of the steps already taken, then
        set the random generators to their states at the interruption; ``totals`` gets the
        epoch's partial statistics. Returns ``(batches skipped, steps, perturbed steps)``."""
        done = min(resume["step"] * self.accumulation, total)
        for _ in itertools.islice(batches, done):
            pass
        ckpt.set_rng_state(resume["rng"])  # after skipping: collating may draw random numbers
        totals.update(resume["totals"])
        return done, resume["step"], resume["perturbed"]

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
            "valid_curve": self.valid_curve,
            "signal": name,
            "world_size": 1 if self.config["single_spec"] else dist.get_world_size(),
        }
        scheduler = getattr(self, "scheduler", None)  # none unless lr_scheduler / lr_warmup_steps ask for one
        if scheduler is not None:
            state["scheduler"] = json.loads(json.dumps(scheduler.state_dict(), default=lambda o: None))
        if self.is_main_process():
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
        self.valid_curve = [list(point) for point in state.get("valid_curve", [])]
        self.saved_model_file = ckpt.paths(state["best_model_file"])[0]
        self.start_epoch = self.epochs if state["finished"] else state["epoch"]
        where = "training had finished" if state["finished"] else f"epoch {state['epoch']}, after step {state['step']}"
        self.logger.info(f"Checkpoint loaded. Resume training at {where} (best checkpoint: {self.saved_model_file}).")
