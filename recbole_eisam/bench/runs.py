"""One run of the benchmark: executing it (in this process or a fresh one), its log, its row.

Rows are appended to ``results.csv`` (final runs) or ``tuning.csv`` (validation candidates),
one per run, written atomically: a stopped grid loses at most the run in progress. Parallel
grid processes may share one folder: appends hold a lock, and a run in progress holds a claim
file (:func:`try_claim`), so a second process never starts the same run.
"""

import csv
import datetime
import fcntl
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

from recbole.utils.logger import RemoveColorFilter

from recbole_eisam.analysis.topk import item_stats_from_dataset
from recbole_eisam.quick_start import build_dataset, load_config, run
from recbole_eisam.utils.windows import prepare_data

RESULTS_FILE = "results.csv"
TUNING_FILE = "tuning.csv"
FAILURES_FILE = "failures.log"
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

    The run's log is written next to ``result_path`` (``.log``).
    """
    log_path = os.path.splitext(result_path)[0] + ".log"
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
            "from recbole_eisam.quick_start import run\n"
            "run(**json.load(open(sys.argv[1])))\n"
        )
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        try:
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, "-c", code, args_file], stdout=log, stderr=subprocess.STDOUT)
        finally:
            os.unlink(args_file)
        if proc.returncode != 0:
            raise RuntimeError(f"the isolated run exited with code {proc.returncode} (log: {log_path}).")
        with open(result_path) as f:
            return json.load(f)

    try:
        with _RunLog(log_path):
            return run(**kwargs)
    finally:
        gc.collect()


def compute_item_stats(model, dataset, config_files, overrides):
    """Item statistics of the training split the runs of ``model`` see (a pandas DataFrame)."""
    config = load_config(model, dataset, list(config_files) or None, overrides)
    data = build_dataset(config)
    train_data, _, _ = prepare_data(config, data)
    return item_stats_from_dataset(train_data._dataset, config["head_ratio"])
