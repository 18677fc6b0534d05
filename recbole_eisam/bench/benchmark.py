"""The benchmark grid: every model x method x seed through ``quick_start.run``, resumable.

    python -m recbole_eisam.bench.benchmark --dataset=ml-100k --models=LLMRec,SASRec \\
        --methods=erm,sam,imbsam,reweight,logit_adjust,eisam --seeds=1,2,3 --out=runs/bench
    python -m recbole_eisam.bench.benchmark --grid=properties/benchmark/default.yaml --out=runs/bench
    python -m recbole_eisam.bench.benchmark ... --epochs=20        # --key=value: passed to every run

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
Stopping the grid with Ctrl-C or SIGTERM stops the run in progress after its current step
with a checkpoint, and the same command continues that run from it, exactly as it would have gone on (``<run>.resume.json``,
:mod:`recbole_eisam.bench.runs`); a crash or SIGKILL loses at most the run in progress. A run that raises
is logged to ``<out>/failures.log`` and the grid goes on; it is retried on the next
invocation.

Runs are executed in this process one after another: ``quick_start.run`` rebuilds config,
data, model and trainer from scratch and re-seeds every RNG, so runs do not leak state into
each other, and the imports (torch, transformers) are paid once. ``--isolate`` runs each in
a fresh Python process instead (for long LLM grids where memory fragmentation or a native
crash would otherwise end the whole grid).

Parallel grids: several processes may run into one folder at once (say one thread each on a
small CPU). Rows are appended under a lock, and each run holds ``<run>.claim`` while it
trains: a process that meets another's claim leaves that final run to it, and waits for a
validation run (the choice needs its score). A claim whose process has ended is taken over.
"""

import datetime
import json
import os
import sys
import time
import warnings

from recbole_eisam.analysis.report import build_report
from recbole_eisam.analysis.topk import write_item_stats
from recbole_eisam.bench.grid import DEFAULT_GRID, RESERVED_KEYS, Grid, GridError, RunSpec, _safe
from recbole_eisam.bench.runs import (
    FAILURES_FILE,
    RESULTS_FILE,
    TUNING_FILE,
    _RunLog,
    append_row,
    compute_item_stats,
    execute_run,
    make_row,
    read_rows,
    release_claim,
    row_key,
    try_claim,
)
from recbole_eisam.cli import build_parser, main_guard, parse_overrides
from recbole_eisam.errors import TrainingInterrupted
from recbole_eisam.methods import METHODS, REFERENCE_METHOD
from recbole_eisam.methods import overrides as method_overrides
from recbole_eisam.utils.machine import machine_description


# --------------------------------------------------------------------------- the grid
class Benchmark:
    """Runs a :class:`Grid` into an output folder; see the module docstring."""

    #: how often a process waits on a validation run that another process holds
    CLAIM_POLL_SECONDS = 30

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
        overrides.update(method_overrides(method))
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
            overrides = self.base_overrides(model)
            overrides.update(method_overrides(REFERENCE_METHOD))
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
        claim = os.path.join(self.out, stem + ".claim")
        while not try_claim(claim):  # another grid process is running it
            if spec.stage == "final":
                self.log(f"  - {spec.label()}: running in another process, left to it")
                return None
            time.sleep(self.CLAIM_POLL_SECONDS)  # a validation run: the choice needs its score
        try:
            row = self._done(store_path).get(spec.key)  # finished while this process looked
            return row if row is not None else self._execute(spec, stem, store_path, item_stats)
        finally:
            release_claim(claim)

    def _execute(self, spec, stem, store_path, item_stats):
        topk_rel, result_rel = stem + ".topk.tsv", stem + ".json"
        self.executed += 1
        self.log(f"[run {self.executed}] {spec.stage}: {spec.label()} ...")
        start = time.time()
        try:
            result = execute_run(spec, os.path.join(self.out, topk_rel), os.path.join(self.out, result_rel), self.isolate)
        except TrainingInterrupted as err:
            raise TrainingInterrupted(
                f"{spec.label()} was interrupted after a checkpoint: the same grid command resumes it there.",
                exit_code=err.exit_code, checkpoint=err.checkpoint,
            ) from err
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
        wall = time.time() - start + float(result.get("attempt_seconds") or 0.0)  # earlier attempts too
        row = make_row(spec, result, wall, topk_rel, item_stats, self._valid_metric(spec), machine_description())
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
            params = None if source is None else preset.inherited(source)
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
                candidates = [] if preset.inherit_from else self.grid.candidates(model, method)
                tuning = len(candidates) if len(candidates) > 1 else 0
                finals = len(self.grid.seeds) - (1 if tuning and self.grid.tune_seed in self.grid.seeds else 0)
                total += tuning + finals
                fixed = ", ".join(f"{k}={v}" for k, v in sorted(candidates[0].items())) if len(candidates) == 1 else ""
                how = (f"params from {preset.inherit_from}'s tuning" if preset.inherit_from
                       else f"{tuning} candidates on validation (seed {self.grid.tune_seed})" if tuning
                       else f"fixed: {fixed}" if fixed else "no tuning")
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
        print(f"report written to {build_report(out)}")
    if failures:
        print(f"{len(failures)} run(s) failed (see {os.path.join(out, FAILURES_FILE)}); "
              f"run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
