"""The benchmark's grid: which models, methods, seeds and candidates it runs, and what one run is.

A grid comes from flags or a YAML file (``properties/benchmark/*.yaml``); :class:`RunSpec`
is one run of it, named by a ``signature``: a hash of everything that defines the run except
the seed (the full overrides and the contents of every YAML layer, the package's defaults
included), so a changed setting makes a new run, never a resumed one.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property

import yaml

from recbole_eisam import defaults
from recbole_eisam.defaults import YamlLoader
from recbole_eisam.methods import METHODS, REFERENCE_METHOD

GRID_DIR = os.path.join(defaults.PROPERTIES_DIR, "benchmark")
DEFAULT_GRID = os.path.join(GRID_DIR, "default.yaml")

#: keys that change where things are written or how much is printed, not the run itself:
#: they are left out of the signature
VOLATILE_KEYS = ("checkpoint_dir", "llm_cache_dir", "show_progress", "state", "log_wandb", "gpu_id", "use_gpu", "device")
#: keys the benchmark owns: a preset or the seed list sets them
RESERVED_KEYS = ("seed", "train_method")


class GridError(ValueError):
    """A grid file or command-line choice that cannot be run (one sentence, exit code 2)."""


# --------------------------------------------------------------------------- grid files
def load_yaml(path):
    if not os.path.isfile(path):
        raise GridError(f"Grid file '{path}' does not exist.")
    with open(path) as f:
        data = yaml.load(f, Loader=YamlLoader) or {}
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



# --------------------------------------------------------------------------- one run
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

    @cached_property
    def signature(self):
        """Includes the package's own YAML layers of this model and dataset: a changed
        default (say properties/model/LLMRec.yaml) is a different run, never resumed.
        Computed once: a file edited while the grid runs cannot give one run two names
        (its files under one signature, its results row under another)."""
        return signature(self.overrides, defaults.default_config_files(self.model, self.dataset) + list(self.config_files))

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


