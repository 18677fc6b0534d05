"""One run of the benchmark: executing it (in this process or a fresh one), its log, its row.

Rows are appended to ``results.csv`` (final runs) or ``tuning.csv`` (validation candidates),
one per run, written atomically. Parallel grid processes may share one folder: appends hold a
lock, and a run in progress holds a claim file (:func:`try_claim`), so a second process never
starts the same run.

A run stopped by SIGINT / SIGTERM writes its trainer's checkpoint to resume from
(:mod:`recbole_eisam.trainer.resume`) and ``<run>.resume.json`` naming it; the next
execution of the same run (same folder, same signature) continues from there instead of
starting over, and its row counts the seconds of every attempt. A run killed outright
(SIGKILL, power loss) leaves no resume checkpoint and starts over.
"""

import csv
import datetime
import fcntl
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from recbole.utils.logger import RemoveColorFilter

from recbole_eisam.analysis.topk import item_stats_from_dataset
from recbole_eisam.errors import TrainingInterrupted
from recbole_eisam.quick_start import build_dataset, load_config, run
from recbole_eisam.utils.windows import prepare_data

RESULTS_FILE = "results.csv"
TUNING_FILE = "tuning.csv"
FAILURES_FILE = "failures.log"
RESUME_SUFFIX = ".resume.json"
#: a claim file still without its owner line after this long was left by a process that died writing it
BROKEN_CLAIM_SECONDS = 60


def try_claim(path):
    """Take ``path``, the claim of one run, for this process; False while another live process
    holds it. A claim names its host and process id; one left by a process that has ended (a
    killed grid) is stale and taken over. Release it with :func:`release_claim`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_alive(path):
                return False
            release_claim(path)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def release_claim(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _claim_alive(path):
    try:
        with open(path) as f:
            host, pid = f.read().split()
        pid = int(pid)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # being written this instant; left broken, stale after a minute
        try:
            return time.time() - os.path.getmtime(path) < BROKEN_CLAIM_SECONDS
        except OSError:
            return False
    if host != socket.gethostname():  # another machine's process: cannot be checked, so held
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def row_key(row):
    return (str(row["dataset"]), str(row["model"]), str(row["method"]), int(row["seed"]), str(row["signature"]))


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path, row):
    """Append ``row`` to a CSV file, widening the header when the row brings new columns.

    The read-modify-replace holds an exclusive lock on ``<path>.lock``, so two processes
    appending to one file at once both keep their rows.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(path)
        header = list(rows[0].keys()) if rows else []
        for key in row:
            if key not in header:
                header.append(key)
        rows.append(row)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def make_row(spec, result, wall_seconds, topk_file, item_stats_file, valid_metric, machine):
    row = {
        "dataset": spec.dataset,
        "model": spec.model,
        "method": spec.method,
        "seed": spec.seed,
        "signature": spec.signature,
        "stage": spec.stage,
        "train_method": spec.overrides.get("train_method", ""),
        "params": json.dumps(spec.params, sort_keys=True),
        "tuned_on_seed": "" if spec.tuned_on is None else spec.tuned_on,
        "valid_metric": valid_metric,
        "best_valid_score": _cell(result.get("best_valid_score")),
    }
    for key, value in (result.get("test_result") or {}).items():
        row[f"test_{key}"] = _cell(value)
    for key, value in (result.get("best_valid_result") or {}).items():
        row[f"valid_{key}"] = _cell(value)
    row.update({
        "best_epoch": _cell(result.get("best_epoch")),
        "epochs_trained": _cell(result.get("epochs_trained")),
        "max_epochs": _cell(result.get("max_epochs")),
        "valid_curve": json.dumps(result.get("valid_curve") or []),
        "wall_seconds": round(wall_seconds, 2),
        "topk_file": topk_file,
        "item_stats_file": item_stats_file,
        "overrides": json.dumps(spec.overrides, sort_keys=True, default=str),
        "config_files": " ".join(spec.config_files),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
    })
    return row


def _reset_recbole_logging():
    """Close the root handlers RecBole's ``init_logger`` installs (``logging.basicConfig``).

    ``basicConfig`` is a no-op once the root logger has handlers: without this every later
    run would write into the first run's log file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) in (logging.FileHandler, logging.StreamHandler):
            root.removeHandler(handler)
            handler.close()


class _RunLog:
    """Route one in-process run's logging to ``path``; only warnings reach the terminal.

    Installed before ``quick_start.run``, these handlers make RecBole's ``basicConfig`` a
    no-op, so the run's full INFO log lands next to its results.
    """

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        _reset_recbole_logging()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        root = logging.getLogger()
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s"))
        self.file.setLevel(logging.INFO)
        self.file.addFilter(RemoveColorFilter())  # RecBole colours its messages
        self.console = logging.StreamHandler()
        self.console.setLevel(logging.WARNING)
        self.console.setFormatter(logging.Formatter("  %(levelname)s  %(message)s"))
        root.addHandler(self.file)
        root.addHandler(self.console)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        for handler in (self.file, self.console):
            root.removeHandler(handler)
            handler.close()
        return False


def execute_run(spec, topk_path, result_path, isolate=False):
    """Run one configuration through ``quick_start.run``; returns its result dict.

    The run's log is written next to ``result_path`` (``.log``, appended to when the run
    resumes). An interrupted earlier attempt of the run (``<run>.resume.json``) is continued;
    ``result["attempt_seconds"]`` holds the seconds the earlier attempts trained.
    """
    stem = os.path.splitext(result_path)[0]
    log_path, pointer = stem + ".log", stem + RESUME_SUFFIX
    kwargs = {
        "model": spec.model,
        "dataset": spec.dataset,
        "config_file_list": list(spec.config_files) or None,
        "config_dict": dict(spec.overrides, seed=spec.seed),
        "saved": True,
        "result_file": result_path,
        "save_topk": topk_path,
    }
    if isolate:
        fd, args_file = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(kwargs, f)
        code = (
            "import json, sys\n"
            "from recbole_eisam.bench.runs import run_resumable\n"
            "from recbole_eisam.errors import TrainingInterrupted\n"
            "try:\n"
            "    run_resumable(json.load(open(sys.argv[1])), sys.argv[2])\n"
            "except TrainingInterrupted as err:\n"
            "    sys.exit(err.exit_code)\n"
        )
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        try:
            with open(log_path, "a") as log:
                proc = subprocess.Popen([sys.executable, "-c", code, args_file, pointer], stdout=log, stderr=subprocess.STDOUT)
                try:
                    proc.wait()
                except KeyboardInterrupt:  # let the child write its checkpoint (it stops after its step)
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
        finally:
            os.unlink(args_file)
        if proc.returncode != 0:
            if proc.returncode > 128 and os.path.isfile(pointer):  # stopped by a signal, checkpoint written
                raise TrainingInterrupted(f"the isolated run was interrupted (resumes from {pointer}).",
                                          exit_code=proc.returncode)
            raise RuntimeError(f"the isolated run exited with code {proc.returncode} (log: {log_path}).")
        with open(result_path) as f:
            return json.load(f)

    try:
        with _RunLog(log_path):
            return run_resumable(kwargs, pointer)
    finally:
        gc.collect()


def read_resume_pointer(pointer):
    """The interrupted attempt ``pointer`` records (``checkpoint``, ``seconds``, ``interruptions``),
    or None when there is none or its checkpoint is gone (the run then starts over)."""
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        state = json.load(f)
    if not os.path.isfile(state.get("checkpoint") or ""):
        logging.getLogger().warning(f"{pointer} names a missing checkpoint: the run starts over.")
        os.unlink(pointer)
        return None
    return state


def run_resumable(kwargs, pointer):
    """``quick_start.run(**kwargs)``, continuing the attempt recorded in ``pointer`` if any; an
    interruption records the new checkpoint there (and is raised again), a finished run
    removes the pointer and its resume checkpoint."""
    previous = read_resume_pointer(pointer)
    prior_seconds = float(previous["seconds"]) if previous else 0.0
    if previous:
        kwargs = dict(kwargs, resume=previous["checkpoint"])
        logging.getLogger().info(f"Resuming from {previous['checkpoint']} ({prior_seconds:.0f} s trained before).")
    start = time.time()
    try:
        result = run(**kwargs)
    except TrainingInterrupted as err:
        if err.checkpoint:
            state = {
                "checkpoint": os.path.abspath(err.checkpoint),
                "seconds": round(prior_seconds + time.time() - start, 2),
                "interruptions": (previous or {}).get("interruptions", 0) + 1,
            }
            tmp = pointer + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, pointer)
        raise
    result["attempt_seconds"] = round(prior_seconds, 2)
    if previous:
        if os.path.isfile(previous["checkpoint"]):
            os.unlink(previous["checkpoint"])
        os.unlink(pointer)
        if kwargs.get("result_file"):  # the file the isolated parent reads carries the seconds too
            with open(kwargs["result_file"], "w") as f:
                json.dump(result, f, indent=2)
    return result


def compute_item_stats(model, dataset, config_files, overrides):
    """Item statistics of the training split the runs of ``model`` see (a pandas DataFrame)."""
    config = load_config(model, dataset, list(config_files) or None, overrides)
    data = build_dataset(config)
    train_data, _, _ = prepare_data(config, data)
    return item_stats_from_dataset(train_data._dataset, config["head_ratio"])
