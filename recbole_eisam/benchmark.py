"""The benchmark grid: every model x method x seed through ``quick_start.run``, resumable.

    python -m recbole_eisam.benchmark --dataset=ml-100k --models=LLMRec,SASRec \\
        --methods=erm,sam,imbsam,reweight,logit_adjust,eisam --seeds=1,2,3 --out=runs/bench
    python -m recbole_eisam.benchmark --grid=properties/benchmark/default.yaml --out=runs/bench
    python -m recbole_eisam.benchmark ... --epochs=20        # --key=value: passed to every run

What happens, per (dataset, model):

1. the item statistics of the training split (frequency, popularity rank, head / tail) are
   written once to ``<out>/item_stats/<dataset>-<model>.tsv`` for the report;
2. every method with more than one candidate configuration in the tuning grid is tuned on
   the **validation** split of ``tune_seed``: each candidate is one full run (early stopping
   and model selection on ``valid_metric``), recorded in ``<out>/tuning.csv``; the candidate
   with the best ``best_valid_score`` wins (ties: the first listed). Test numbers never
   enter the choice. Every tuned method gets the same number of candidates (``budget``);
3. the chosen configuration runs for every seed (the tuning run of ``tune_seed`` is reused,
   not repeated) and one row per model x method x seed is appended to
   ``<out>/results.csv``: all test metrics (``test_<metric>``), all metrics of the best
   validation epoch (``valid_<metric>``), ``best_valid_score``, the hyper-parameters
   (``params``, JSON), the full overrides, the wall time and the run's top-K file;
4. reference models (Pop, GRU4Rec, BERT4Rec) run with ``erm`` only;
5. ``<out>/REPORT.md`` is rebuilt (:mod:`recbole_eisam.analysis.report`).

Resume: a run whose key (dataset, model, method, seed, signature) is already in
``results.csv`` (or, for tuning runs, ``tuning.csv``) is not run again; ``signature`` is a
hash of everything that defines the run except the seed: the full overrides (grid config,
model config, command-line ``--key=value``, method preset, hyper-parameters) and the
contents of the YAML files, the package's defaults for the model and dataset included.
Every row names the machine it ran on (CPU or GPU, cores, torch); a grid refuses to add
rows to a folder whose rows ran on another machine, because float32 kernels differ between
CPUs and the same run gives other numbers there (``--allow_mixed_machines`` overrides).
It also refuses a folder whose rows ran with other settings for the same model, method,
seed and hyper-parameters (a changed grid ``config``, ``--key=value`` override or package
default): resuming there would put two set-ups side by side in one report.
Stopping the grid (Ctrl-C, a crash) loses at most the run in progress. A run that raises
is logged to ``<out>/failures.log`` and the grid goes on; it is retried on the next
invocation.

Runs are executed in this process one after another: ``quick_start.run`` rebuilds config,
data, model and trainer from scratch and re-seeds every RNG, so runs do not leak state into
each other, and the imports (torch, transformers) are paid once. ``--isolate`` runs each in
a fresh Python process instead (for long LLM grids where memory fragmentation or a native
crash would otherwise end the whole grid).
"""

import csv
import datetime
import gc
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import yaml

from recbole_eisam.utils.machine import machine_description

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_DIR = os.path.join(PACKAGE_ROOT, "properties", "benchmark")
DEFAULT_GRID = os.path.join(GRID_DIR, "default.yaml")
RESULTS_FILE = "results.csv"
TUNING_FILE = "tuning.csv"
FAILURES_FILE = "failures.log"

#: keys that change where things are written or how much is printed, not the run itself:
#: they are left out of the signature
VOLATILE_KEYS = ("checkpoint_dir", "show_progress", "state", "log_wandb", "gpu_id", "use_gpu", "device")
#: keys the benchmark owns: a preset or the seed list sets them
RESERVED_KEYS = ("seed", "train_method")


class GridError(ValueError):
    """A grid file or command-line choice that cannot be run (one sentence, exit code 2)."""


# --------------------------------------------------------------------------- method presets
def _inherit_noweight(chosen):
    """EISAM without the frequency weighting: uniform w, EISAM's tuned rho and lambda."""
    return {k: chosen[k] for k in ("eisam_rho", "eisam_lambda") if k in chosen}


def _inherit_reweight_only(chosen):
    """Frequency re-weighting without the sharpness term: EISAM's tuned w(n) as loss weights.

    The preset sets ``reweight_eisam_weight: True``, so the loss weights are EISAM's own
    weighting function; this passes on its tuned family and parameters.
    """
    return {k: chosen[k] for k in ("eisam_weight", "eisam_alpha", "eisam_c", "eisam_gamma") if k in chosen}


@dataclass(frozen=True)
class Preset:
    """A named method: config overrides, optionally derived from another method's tuning."""

    overrides: dict
    description: str
    #: method whose validation-chosen hyper-parameters this one reuses (ablations: no tuning)
    inherit_from: str = None
    inherit: object = None


#: The one place that defines what a method name means (name -> config overrides).
#: ``eisam_rho`` is the perturbation radius of every SAM-style method.
METHODS = {
    "erm": Preset({"train_method": "erm"}, "plain training (lambda = 0)"),
    "sam": Preset({"train_method": "sam"}, "SAM: uniform weights (lambda = 1 is SAM as published)"),
    "imbsam": Preset({"train_method": "imbsam"}, "ImbSAM: sharpness of the items with < imbsam_eta samples only"),
    "reweight": Preset({"train_method": "reweight"}, "loss weights ~ n_i^-beta, no sharpness term"),
    "logit_adjust": Preset({"train_method": "logit_adjust"}, "logit-adjusted loss: training logits + tau * log prior"),
    "logit_adjust_posthoc": Preset(
        {"train_method": "logit_adjust_posthoc"}, "plain training, predictions minus tau * log prior"
    ),
    "eisam": Preset({"train_method": "eisam"}, "EISAM: item-wise sharpness weighted by w(n_i)"),
    "eisam_la": Preset({"train_method": "eisam_la"}, "EISAM on the logit-adjusted loss"),
    "eisam_rw": Preset({"train_method": "eisam_rw"}, "EISAM on the re-weighted loss"),
    "eisam_noweight": Preset(
        {"train_method": "eisam", "eisam_weight": "uniform"},
        "ablation: EISAM with uniform w (SAM with lambda), EISAM's tuned rho and lambda",
        inherit_from="eisam",
        inherit=_inherit_noweight,
    ),
    "eisam_head": Preset(
        {"train_method": "eisam", "eisam_scope": "head"},
        "EISAM with e on the head only (one backbone pass per step), EISAM's tuned values",
        inherit_from="eisam",
        inherit=lambda chosen: dict(chosen),
    ),
    "reweight_only": Preset(
        {"train_method": "reweight", "reweight_eisam_weight": True},
        "ablation: EISAM's frequency weighting as loss weights, no sharpness term",
        inherit_from="eisam",
        inherit=_inherit_reweight_only,
    ),
}
REFERENCE_METHOD = "erm"


# --------------------------------------------------------------------------- grid files
class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-3`` as a float (PyYAML's YAML 1.1 would give a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path):
    if not os.path.isfile(path):
        raise GridError(f"Grid file '{path}' does not exist.")
    with open(path) as f:
        data = yaml.load(f, Loader=_Loader) or {}
    if not isinstance(data, dict):
        raise GridError(f"Grid file '{path}' must hold a mapping of keys.")
    return data


@dataclass
class Grid:
    dataset: str = "ml-100k"
    models: list = field(default_factory=lambda: ["LLMRec", "SASRec"])
    reference_models: list = field(default_factory=lambda: ["Pop", "GRU4Rec", "BERT4Rec"])
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    tune_seed: int = None
    #: number of candidates every tuned method gets (None: not checked)
    budget: int = None
    #: method -> list of candidate overrides
    tuning: dict = field(default_factory=dict)
    #: model -> method -> list of candidates (replaces ``tuning[method]`` for that model)
    model_tuning: dict = field(default_factory=dict)
    #: overrides of every run
    config: dict = field(default_factory=dict)
    #: model -> overrides of that model's runs
    model_config: dict = field(default_factory=dict)
    config_files: list = field(default_factory=list)

    KEYS = ("dataset", "models", "reference_models", "methods", "seeds", "tune_seed", "budget",
            "tuning", "tuning_file", "model_tuning", "config", "model_config", "config_files")

    @classmethod
    def from_file(cls, path):
        data = load_yaml(path)
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise GridError(
                f"Grid file '{path}' has unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.KEYS)}."
            )
        tuning_file = data.pop("tuning_file", None)
        if tuning_file:
            tuning_path = tuning_file if os.path.isabs(tuning_file) else os.path.join(os.path.dirname(path), tuning_file)
            tuning = load_yaml(tuning_path)
            data.setdefault("budget", tuning.pop("budget", None))
            data.setdefault("model_tuning", tuning.pop("model_tuning", {}))
            merged = dict(tuning)
            merged.update(data.get("tuning") or {})
            data["tuning"] = merged
        base = os.path.dirname(os.path.abspath(path))
        data["config_files"] = [
            f if os.path.isabs(f) or os.path.isfile(f) else os.path.join(base, f) for f in data.get("config_files") or []
        ]
        grid = cls(**{k: v for k, v in data.items() if v is not None or k in ("tune_seed", "budget")})
        return grid

    def candidates(self, model, method):
        """Candidate hyper-parameter dicts of ``method`` for ``model`` ([{}] when untuned)."""
        table = (self.model_tuning or {}).get(model, {})
        values = table.get(method, (self.tuning or {}).get(method))
        if values is None:
            return [{}]
        if not isinstance(values, list) or not all(isinstance(v, dict) for v in values) or not values:
            raise GridError(f"The tuning grid of '{method}' must be a non-empty list of mappings.")
        return [dict(v) for v in values]

    def validate(self):
        if not self.models and not self.reference_models:
            raise GridError("The grid has no model: give --models or models: in the grid file.")
        if not self.seeds:
            raise GridError("The grid has no seed: give --seeds=1,2,3 or seeds: in the grid file.")
        for method in self.methods:
            if method not in METHODS:
                raise GridError(f"Unknown method '{method}'; known: {', '.join(METHODS)}.")
        if self.tune_seed is None:
            self.tune_seed = self.seeds[0]
        for key in RESERVED_KEYS:
            for where, table in [("config", self.config)] + [
                (f"model_config of {m}", c) for m, c in (self.model_config or {}).items()
            ]:
                if key in (table or {}):
                    raise GridError(f"'{key}' is set by the benchmark itself; remove it from {where}.")
        for model in self.models:
            for method in self.methods:
                preset = METHODS[method]
                if preset.inherit_from:
                    if (self.model_tuning or {}).get(model, {}).get(method) or (self.tuning or {}).get(method):
                        raise GridError(
                            f"'{method}' takes its hyper-parameters from '{preset.inherit_from}'; "
                            f"remove its tuning grid."
                        )
                    continue
                n = len(self.candidates(model, method))
                if method == REFERENCE_METHOD:
                    if n != 1:
                        raise GridError("'erm' has nothing to tune: give it no tuning grid.")
                elif self.budget is not None and n != self.budget:
                    raise GridError(
                        f"Equal tuning budget: '{method}' has {n} candidate(s) for {model}, "
                        f"the grid's budget is {self.budget}."
                    )
        return self


# --------------------------------------------------------------------------- runs and storage
def _file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def signature(overrides, config_files=()):
    """Hash of what defines a run, seed and volatile keys excluded."""
    payload = {
        "overrides": {k: v for k, v in overrides.items() if k not in VOLATILE_KEYS and k != "seed"},
        "config_files": [_file_digest(p) for p in config_files],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class RunSpec:
    dataset: str
    model: str
    method: str
    seed: int
    params: dict
    overrides: dict
    config_files: list
    stage: str  # "tune" or "final"
    tuned_on: int = None

    @property
    def signature(self):
        """Includes the package's own YAML layers of this model and dataset: a changed
        default (say properties/model/LLMRec.yaml) is a different run, never resumed."""
        from recbole_eisam.quick_start import default_config_files

        return signature(self.overrides, default_config_files(self.model, self.dataset) + list(self.config_files))

    @property
    def key(self):
        return (self.dataset, self.model, self.method, int(self.seed), self.signature)

    def label(self):
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.model} {self.method} seed {self.seed}" + (f" [{params}]" if params else "")

    def file_stem(self):
        return os.path.join("runs", _safe(self.dataset), _safe(self.model), _safe(self.method),
                            f"seed{self.seed}-{self.signature}")


def _safe(text):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))


def row_key(row):
    return (str(row["dataset"]), str(row["model"]), str(row["method"]), int(row["seed"]), str(row["signature"]))


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path, row):
    """Append ``row`` to a CSV file, widening the header when the row brings new columns."""
    rows = read_rows(path)
    header = list(rows[0].keys()) if rows else []
    for key in row:
        if key not in header:
            header.append(key)
    rows.append(row)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
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


def make_row(spec, result, wall_seconds, topk_file, item_stats_file, valid_metric):
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
        "wall_seconds": round(wall_seconds, 2),
        "topk_file": topk_file,
        "item_stats_file": item_stats_file,
        "overrides": json.dumps(spec.overrides, sort_keys=True, default=str),
        "config_files": " ".join(spec.config_files),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
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
        try:  # RecBole colours its messages; its own file handler strips the codes
            from recbole.utils.logger import RemoveColorFilter

            self.file.addFilter(RemoveColorFilter())
        except ImportError:
            pass
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
    from recbole_eisam.quick_start import run

    try:
        with _RunLog(log_path):
            return run(**kwargs)
    finally:
        gc.collect()


def compute_item_stats(model, dataset, config_files, overrides):
    """Item statistics of the training split the runs of ``model`` see (a pandas DataFrame)."""
    from recbole.data import data_preparation

    from recbole_eisam.analysis.topk import item_stats_from_dataset
    from recbole_eisam.quick_start import build_dataset, load_config

    config = load_config(model, dataset, list(config_files) or None, overrides)
    data = build_dataset(config)
    train_data, _, _ = data_preparation(config, data)
    return item_stats_from_dataset(train_data._dataset, config["head_ratio"])


# --------------------------------------------------------------------------- the grid
class Benchmark:
    """Runs a :class:`Grid` into an output folder; see the module docstring."""

    def __init__(self, grid, out, overrides=None, isolate=False, log=print, allow_mixed_machines=False):
        self.grid = grid.validate()
        self.out = out
        self.cli_overrides = dict(overrides or {})
        for key in RESERVED_KEYS:
            if key in self.cli_overrides:
                raise GridError(f"'--{key}' is set by the benchmark itself (use --seeds / --methods).")
        self.isolate = isolate
        self.allow_mixed_machines = allow_mixed_machines
        self.log = log
        self.results_path = os.path.join(out, RESULTS_FILE)
        self.tuning_path = os.path.join(out, TUNING_FILE)
        self.failures = []
        self.executed = 0
        self.chosen = {}  # (model, method) -> params

    # ---- overrides
    def base_overrides(self, model):
        overrides = {"show_progress": False, "checkpoint_dir": os.path.join(self.out, "saved")}
        overrides.update(self.grid.config or {})
        overrides.update((self.grid.model_config or {}).get(model, {}) or {})
        overrides.update(self.cli_overrides)
        return overrides

    def spec(self, model, method, seed, params, stage, tuned_on=None):
        overrides = self.base_overrides(model)
        overrides.update(METHODS[method].overrides)
        overrides.update(params)
        return RunSpec(self.grid.dataset, model, method, int(seed), dict(params), overrides,
                       list(self.grid.config_files), stage, tuned_on)

    # ---- bookkeeping
    def _done(self, path):
        return {row_key(r): r for r in read_rows(path)}

    def item_stats_file(self, model):
        rel = os.path.join("item_stats", f"{_safe(self.grid.dataset)}-{_safe(model)}.tsv")
        path = os.path.join(self.out, rel)
        if not os.path.isfile(path):
            from recbole_eisam.analysis.topk import write_item_stats

            overrides = self.base_overrides(model)
            overrides.update(METHODS[REFERENCE_METHOD].overrides)
            overrides["seed"] = self.grid.tune_seed
            with _RunLog(os.path.splitext(path)[0] + ".log"):
                frame = compute_item_stats(model, self.grid.dataset, self.grid.config_files, overrides)
            write_item_stats(frame, path)
        return rel

    def _valid_metric(self, spec):
        return str(spec.overrides.get("valid_metric", "NDCG@10"))

    def run_spec(self, spec, store_path, item_stats):
        """Run ``spec`` unless done; returns its row (None when the run failed)."""
        done = self._done(store_path)
        if spec.key in done:
            return done[spec.key]
        if spec.stage == "final" and spec.seed == spec.tuned_on:
            tuned = self._done(self.tuning_path).get(spec.key)
            if tuned is not None:  # the validation run of the chosen config: reuse it
                row = dict(tuned, stage="final", tuned_on_seed=spec.tuned_on)
                append_row(store_path, row)
                self.log(f"  = {spec.label()}: reused from the tuning run")
                return row
        stem = spec.file_stem()
        topk_rel, result_rel = stem + ".topk.tsv", stem + ".json"
        self.executed += 1
        self.log(f"[run {self.executed}] {spec.stage}: {spec.label()} ...")
        start = time.time()
        try:
            result = execute_run(spec, os.path.join(self.out, topk_rel), os.path.join(self.out, result_rel), self.isolate)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one failing configuration must not end a grid of hours
            message = f"{spec.label()} (signature {spec.signature}) failed: {type(err).__name__}: {err}"
            self.failures.append(message)
            self.log("  ! " + message)
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, FAILURES_FILE), "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
            return None
        wall = time.time() - start
        row = make_row(spec, result, wall, topk_rel, item_stats, self._valid_metric(spec))
        append_row(store_path, row)
        test = result.get("test_result") or {}
        self.log(
            f"  done in {wall:.1f} s: valid score {result.get('best_valid_score')}, "
            f"test ndcg@10 {test.get('ndcg@10')}, tailndcg@10 {test.get('tailndcg@10')}"
        )
        return row

    def choose(self, model, method, item_stats):
        """Hyper-parameters of ``method`` for ``model``, chosen on validation (cached)."""
        if (model, method) in self.chosen:
            return self.chosen[(model, method)]
        preset = METHODS[method]
        if preset.inherit_from:
            source = self.choose(model, preset.inherit_from, item_stats)
            params = None if source is None else preset.inherit(source)
        else:
            candidates = self.grid.candidates(model, method)
            if len(candidates) == 1:
                params = candidates[0]
            else:
                best, best_score = None, None
                for candidate in candidates:
                    spec = self.spec(model, method, self.grid.tune_seed, candidate, "tune")
                    row = self.run_spec(spec, self.tuning_path, item_stats)
                    if row is None:
                        continue
                    try:
                        score = float(row["best_valid_score"])
                    except (TypeError, ValueError):
                        continue
                    if score == score and (best_score is None or score > best_score):
                        best, best_score = candidate, score
                params = best
                if best is None:
                    self.log(f"  ! no candidate of {method} for {model} finished: its rows are skipped")
                else:
                    self.log(f"  chosen for {model} {method} on validation: {best} (score {best_score})")
        self.chosen[(model, method)] = params
        return params

    def plan(self):
        """(model, [methods]) in run order: main models, then the reference models (erm)."""
        order = []
        for model in self.grid.models:
            order.append((model, list(self.grid.methods)))
        for model in self.grid.reference_models:
            if model not in self.grid.models:
                order.append((model, [REFERENCE_METHOD]))
        return order

    def check_machine(self):
        """Refuse to add rows to a folder whose rows ran on another machine: float32 kernels
        differ between CPUs (and torch builds), so such a folder would compare methods across
        machines. Rows that name no machine (older folders) are not checked."""
        if self.allow_mixed_machines:
            return
        here = machine_description()
        for path in (self.results_path, self.tuning_path):
            for row in read_rows(path):
                there = str(row.get("machine") or "").strip()
                if there and there != here:
                    raise GridError(
                        f"{path} holds rows run on '{there}' but this machine is '{here}': runs "
                        f"differ between machines, so pass --out=<a folder for this machine> "
                        f"(or --allow_mixed_machines to add this machine's rows anyway)."
                    )

    def check_settings(self):
        """Refuse to add rows to a folder whose rows ran with other settings: a stored row
        of a model and method of this grid whose seed and hyper-parameters this grid would
        run under another signature. Rows of other datasets, models or methods are not checked."""
        models = set(self.grid.models) | set(self.grid.reference_models)
        for path in (self.results_path, self.tuning_path):
            for row in read_rows(path):
                if row.get("dataset") != self.grid.dataset or row.get("model") not in models:
                    continue
                if row.get("method") not in METHODS:
                    continue
                try:
                    params = json.loads(row.get("params") or "{}")
                    seed = int(row["seed"])
                except (TypeError, ValueError, KeyError):
                    continue
                spec = self.spec(row["model"], row["method"], seed, params, row.get("stage") or "final")
                if spec.signature != row.get("signature"):
                    raise GridError(
                        f"{path} holds {spec.label()} run with other settings (signature "
                        f"{row.get('signature')}, this grid gives {spec.signature}): the grid's "
                        f"config, a --key=value override or a package default under properties/ "
                        f"changed since, so pass --out=<a new folder> or run the revision that "
                        f"made this one."
                    )

    def run(self):
        self.check_machine()
        self.check_settings()
        os.makedirs(self.out, exist_ok=True)
        for model, methods in self.plan():
            item_stats = self.item_stats_file(model)
            for method in methods:
                params = self.choose(model, method, item_stats)
                if params is None:
                    continue
                tuned = METHODS[method].inherit_from or method
                n_candidates = len(self.grid.candidates(model, tuned))
                for seed in self.grid.seeds:
                    spec = self.spec(model, method, seed, params, "final",
                                     self.grid.tune_seed if n_candidates > 1 else None)
                    self.run_spec(spec, self.results_path, item_stats)
        return self.failures

    def describe(self):
        lines = [f"benchmark of {self.grid.dataset} into {self.out}"]
        total = 0
        for model, methods in self.plan():
            for method in methods:
                preset = METHODS[method]
                n = 0 if preset.inherit_from else len(self.grid.candidates(model, method))
                tuning = n if n > 1 else 0
                finals = len(self.grid.seeds) - (1 if tuning and self.grid.tune_seed in self.grid.seeds else 0)
                total += tuning + finals
                how = (f"params from {preset.inherit_from}'s tuning" if preset.inherit_from
                       else f"{n} candidates on validation (seed {self.grid.tune_seed})" if tuning else "no tuning")
                lines.append(f"  {model:10s} {method:15s} {how}; seeds {self.grid.seeds}")
        lines.append(f"  at most {total} runs (fewer when resuming)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def _split(text, cast=str):
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip() and t.strip().lower() != "none"]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise GridError(f"Cannot read '{text}' as a comma-separated list of {cast.__name__}.") from None


def build_grid(args):
    grid = Grid.from_file(args.grid) if args.grid else Grid.from_file(DEFAULT_GRID)
    if args.dataset:
        grid.dataset = args.dataset
    models = _split(args.models) if args.models is not None else ([args.model] if args.model else None)
    if models is not None:
        grid.models = models
    if args.reference_models is not None:
        grid.reference_models = _split(args.reference_models)
    if args.methods is not None:
        grid.methods = _split(args.methods)
    if args.seeds is not None:
        grid.seeds = _split(args.seeds, int)
    if args.tune_seed is not None:
        grid.tune_seed = args.tune_seed
    if args.config_files:
        grid.config_files = list(grid.config_files) + args.config_files.split()
    if args.no_tuning:
        grid.tuning, grid.model_tuning, grid.budget = {}, {}, None
    return grid


def main(argv=None):
    from recbole_eisam.cli import build_parser, parse_overrides

    parser = build_parser(
        "Run a resumable benchmark grid (models x methods x seeds) and build <out>/REPORT.md. "
        "Extra --key=value pairs are passed to every run."
    )
    parser.set_defaults(model=None, dataset=None)
    parser.add_argument("--grid", default=None, help=f"grid YAML (default: {os.path.relpath(DEFAULT_GRID)})")
    parser.add_argument("--models", default=None, help="comma-separated models trained with every method")
    parser.add_argument("--reference_models", default=None, help="comma-separated models run with erm only ('none': no reference rows)")
    parser.add_argument("--methods", default=None, help=f"comma-separated methods among {', '.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("--tune_seed", type=int, default=None, help="seed of the validation runs that choose hyper-parameters (default: the first seed)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/benchmark-<dataset>)")
    parser.add_argument("--no_tuning", action="store_true", help="use the first candidate of every tuning grid (smoke tests)")
    parser.add_argument("--isolate", action="store_true", help="one Python process per run")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    parser.add_argument("--no_report", action="store_true", help="do not rebuild REPORT.md at the end")
    parser.add_argument("--allow_mixed_machines", action="store_true",
                        help="add rows to an output folder whose rows ran on another machine")
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)
    grid = build_grid(args)
    # RecBole 1.2.1's pandas calls warn on every dataset load: keep the grid's output readable
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    out = args.out or os.path.join("runs", f"benchmark-{_safe(grid.dataset)}")
    bench = Benchmark(grid, out, overrides, isolate=args.isolate, allow_mixed_machines=args.allow_mixed_machines)
    print(bench.describe())
    if args.dry_run:
        return 0
    failures = bench.run()
    if not args.no_report and os.path.isfile(bench.results_path):
        from recbole_eisam.analysis.report import build_report

        print(f"report written to {build_report(out)}")
    if failures:
        print(f"{len(failures)} run(s) failed (see {os.path.join(out, FAILURES_FILE)}); "
              f"run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from recbole_eisam.cli import main_guard

    raise SystemExit(main_guard(main))
