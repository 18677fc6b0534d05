"""The benchmark grid: tuning on validation, equal budgets, ablation presets, resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from recbole_eisam.bench import benchmark
from recbole_eisam.bench import grid as grid_module
from recbole_eisam.bench.benchmark import Benchmark, Grid, GridError
from recbole_eisam.bench.runs import append_row, make_row, release_claim, try_claim


def _grid(**changes):
    grid = Grid(
        dataset="toy",
        models=["A"],
        reference_models=["R"],
        methods=["erm", "sam", "eisam", "eisam_noweight", "reweight_only"],
        seeds=[1, 2],
        budget=2,
        tuning={
            "sam": [{"eisam_rho": 0.01}, {"eisam_rho": 0.05}],
            "eisam": [
                {"eisam_weight": "power", "eisam_alpha": 0.5, "eisam_lambda": 2.0, "eisam_rho": 0.02},
                {"eisam_weight": "power", "eisam_alpha": 1.0, "eisam_lambda": 0.5, "eisam_rho": 0.1},
            ],
        },
        config={"epochs": 3},
    )
    for key, value in changes.items():
        setattr(grid, key, value)
    return grid


class FakeRuns:
    """Stands in for quick_start.run: counts calls, optionally interrupts after ``stop_after``."""

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, spec, topk_path, result_path, isolate=False):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((spec.model, spec.method, spec.seed, json.dumps(spec.params, sort_keys=True), spec.stage))
        os.makedirs(os.path.dirname(topk_path), exist_ok=True)
        with open(topk_path, "w") as f:
            f.write("user_id\ttarget_item_id\ttopk_item_ids\nu1\ti1\t" + " ".join(f"i{i}" for i in range(1, 11)) + "\n")
        # validation prefers larger rho, then larger alpha: the tuning choice is predictable
        score = spec.overrides.get("eisam_rho", 0.0) + 0.001 * spec.overrides.get("eisam_alpha", 0.0)
        return {
            "best_valid_score": score,
            "best_valid_result": {"ndcg@10": score},
            "test_result": {"ndcg@10": 0.1 + score, "tailndcg@10": 0.01, "giniindex@10": None},
        }


@pytest.fixture
def fake(monkeypatch):
    def stats(model, dataset, config_files, overrides):
        return pd.DataFrame({"item_id": [f"i{i}" for i in range(1, 11)], "train_count": range(10, 0, -1),
                             "popularity_rank": range(1, 11), "is_head": [1, 1] + [0] * 8})

    monkeypatch.setattr(benchmark, "compute_item_stats", stats)
    runs = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", runs)
    return runs


# tuning: sam 2 + eisam 2; finals: erm 2, sam 1 (seed 1 reused), eisam 1, eisam_noweight 2,
# reweight_only 2; reference R: erm 2
EXPECTED_RUNS = 2 + 2 + 2 + 1 + 1 + 2 + 2 + 2


def test_grid_tunes_on_validation_and_derives_ablations(tmp_path, fake):
    out = str(tmp_path / "out")
    assert Benchmark(_grid(), out, log=lambda *_: None).run() == []
    assert len(fake.calls) == EXPECTED_RUNS
    results = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(results) == 2 * 5 + 2  # one row per model x method x seed
    params = {m: json.loads(p) for m, p in zip(results["method"], results["params"])}
    assert params["sam"] == {"eisam_rho": 0.05}
    assert params["eisam"]["eisam_rho"] == 0.1 and params["eisam"]["eisam_alpha"] == 1.0
    # ablations: EISAM's tuned rho / lambda with uniform w; EISAM's w without sharpness
    assert params["eisam_noweight"] == {"eisam_rho": 0.1, "eisam_lambda": 0.5}
    assert params["reweight_only"] == {"eisam_weight": "power", "eisam_alpha": 1.0}
    overrides = {m: json.loads(o) for m, o in zip(results["method"], results["overrides"])}
    assert overrides["eisam_noweight"]["eisam_weight"] == "uniform"
    assert overrides["eisam_noweight"]["train_method"] == "eisam"
    assert overrides["reweight_only"]["train_method"] == "reweight"
    assert overrides["reweight_only"]["reweight_eisam_weight"] is True
    assert set(results.loc[results["model"] == "R", "method"]) == {"erm"}
    assert results["machine"].str.contains(" cores, torch ").all()  # rows from two CPUs must be told apart
    tuning = pd.read_csv(os.path.join(out, "tuning.csv"))
    assert len(tuning) == 4 and set(tuning["seed"]) == {1}
    assert os.path.isfile(os.path.join(out, "REPORT.md")) is False  # the CLI builds it, not run()


def test_budget_of_one_runs_its_candidate_without_tuning(tmp_path, fake):
    """A one-candidate budget (a configuration carried from another dataset's validation)
    runs that configuration on every seed, with no tuning run, and the plan says so."""
    grid = _grid(methods=["erm", "sam"], reference_models=[], budget=1, tuning={"sam": [{"eisam_rho": 0.01}]})
    bench = Benchmark(grid, str(tmp_path / "out"), log=lambda *_: None)
    assert "fixed: eisam_rho=0.01" in bench.describe() and "at most 4 runs" in bench.describe()
    assert bench.run() == []
    assert sorted((m, s, st) for _, m, s, _, st in fake.calls) == [
        ("erm", 1, "final"), ("erm", 2, "final"), ("sam", 1, "final"), ("sam", 2, "final")]
    results = pd.read_csv(os.path.join(str(tmp_path / "out"), "results.csv"))
    assert {json.loads(p)["eisam_rho"] for p in results.loc[results["method"] == "sam", "params"]} == {0.01}
    assert not os.path.isfile(os.path.join(str(tmp_path / "out"), "tuning.csv"))


def test_resume_does_not_repeat_finished_runs(tmp_path, fake, monkeypatch):
    out = str(tmp_path / "out")
    first = FakeRuns(stop_after=5)
    monkeypatch.setattr(benchmark, "execute_run", first)
    with pytest.raises(KeyboardInterrupt):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    assert len(first.calls) == 5
    second = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", second)
    Benchmark(_grid(), out, log=lambda *_: None).run()
    assert len(second.calls) == EXPECTED_RUNS - 5
    assert not set(first.calls) & set(second.calls)
    third = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", third)
    Benchmark(_grid(), out, log=lambda *_: None).run()
    assert third.calls == []
    assert len(pd.read_csv(os.path.join(out, "results.csv"))) == 12
    # another global override is another signature: not resumed, and not mixed into this folder
    fourth = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", fourth)
    with pytest.raises(GridError, match="other settings"):
        Benchmark(_grid(), out, overrides={"epochs": 1}, log=lambda *_: None).run()
    Benchmark(_grid(), str(tmp_path / "epochs1"), overrides={"epochs": 1}, log=lambda *_: None).run()
    assert len(fourth.calls) == EXPECTED_RUNS


def test_failed_run_is_logged_and_retried(tmp_path, fake, monkeypatch):
    out = str(tmp_path / "out")
    calls = []

    def flaky(spec, topk_path, result_path, isolate=False):
        calls.append(spec.method)
        if spec.method == "erm" and spec.model == "A" and spec.seed == 2:
            raise RuntimeError("boom")
        return fake(spec, topk_path, result_path)

    monkeypatch.setattr(benchmark, "execute_run", flaky)
    failures = Benchmark(_grid(), out, log=lambda *_: None).run()
    assert len(failures) == 1 and "boom" in open(os.path.join(out, "failures.log")).read()
    monkeypatch.setattr(benchmark, "execute_run", fake)
    before = len(fake.calls)
    assert Benchmark(_grid(), out, log=lambda *_: None).run() == []
    assert len(fake.calls) - before == 1


def test_grid_checks(tmp_path):
    with pytest.raises(GridError, match="Equal tuning budget"):
        Benchmark(_grid(budget=3), str(tmp_path))
    with pytest.raises(GridError, match="Unknown method"):
        Benchmark(_grid(methods=["erm", "focal_loss"]), str(tmp_path))
    with pytest.raises(GridError, match="set by the benchmark"):
        Benchmark(_grid(), str(tmp_path), overrides={"seed": 3})
    with pytest.raises(GridError, match="from 'eisam'"):
        Benchmark(_grid(tuning={"eisam_noweight": [{"eisam_rho": 1}]}, budget=None), str(tmp_path))


def test_shipped_grid_files_are_valid():
    grid = Grid.from_file(grid_module.DEFAULT_GRID).validate()
    assert grid.budget == 6
    for method in ("sam", "imbsam", "reweight", "logit_adjust", "logit_adjust_posthoc", "eisam", "eisam_la",
                   "eisam_rw"):
        candidates = grid.candidates("SASRec", method)
        assert len(candidates) == 6
        if method in ("sam", "imbsam", "eisam", "eisam_la", "eisam_rw"):  # lambda is tuned like rho
            assert len({c["eisam_lambda"] for c in candidates}) > 1, method
    assert grid.candidates("SASRec", "erm") == [{}]
    grid_files = [name for name in sorted(os.listdir(grid_module.GRID_DIR))
                  if name.endswith(".yaml") and not name.startswith(("tuning", "protocol"))]
    assert "classic-ml-1m-sas.yaml" in grid_files and "smoke.yaml" in grid_files
    # every shipped grid loads its tuning and config files and passes the checks
    grids = {name: Grid.from_file(os.path.join(grid_module.GRID_DIR, name)).validate() for name in grid_files}
    classic = [name for name in grid_files if name.startswith("classic-")]
    assert len(classic) == 3
    for name in classic:
        carried = grids[name]
        assert carried.budget == 1 and carried.candidates("GRU4Rec", "eisam")[0]["eisam_rho"] == 0.05, name
        # a classic grid trains on its LLMRec grid's split and windows, so their rows pair user by user
        llm = grids[name.replace("classic-", "llmrec-frozen-")]
        assert carried.dataset == llm.dataset, name
        assert carried.config.get("train_windows_per_user") == llm.config.get("train_windows_per_user"), name
    # the LoRA grids train the LLM (no fast path) on a dataset the fast path also covers
    lora = [name for name in grid_files if name.startswith("llmrec-lora-")]
    assert lora
    for name in lora:
        settings = grids[name].model_config["LLMRec"]
        assert not settings.get("llm_frozen") and settings.get("item_id_tokens", True), name
        assert grids[name].dataset == grids[name.replace("llmrec-lora-", "llmrec-frozen-")].dataset, name


def test_real_tiny_grid_end_to_end(tmp_path, tiny_config_dict, monkeypatch):
    """Two real SASRec runs (ERM, EISAM) on the tiny dataset, then the report."""
    monkeypatch.chdir(tmp_path)  # RecBole writes ./log
    config = dict(tiny_config_dict, epochs=1)
    del config["seed"]  # the grid sets it
    grid = Grid(dataset="tiny", models=["SASRec"], reference_models=[], methods=["erm", "eisam"],
                seeds=[1], config=config)
    out = str(tmp_path / "bench")
    assert benchmark.main(["--out=" + out, "--grid=" + _write_grid(tmp_path, grid)]) == 0
    results = pd.read_csv(os.path.join(out, "results.csv"))
    assert list(results["method"]) == ["erm", "eisam"]
    assert {"test_ndcg@10", "test_tailndcg@10", "valid_ndcg@10", "wall_seconds"} <= set(results.columns)
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## SASRec on tiny" in report
    # the top-K file reproduces the run's own NDCG@10
    from recbole_eisam.analysis.topk import read_topk

    frame = read_topk(os.path.join(out, results["topk_file"][0]))
    assert frame["ndcg"].mean() == pytest.approx(results["test_ndcg@10"][0], abs=1e-4)
    assert benchmark.main(["--out=" + out, "--grid=" + _write_grid(tmp_path, grid), "--no_report"]) == 0
    assert len(pd.read_csv(os.path.join(out, "results.csv"))) == 2  # resumed: nothing new


def test_an_interrupted_grid_run_resumes_where_it_stopped(tmp_path, tiny_config_dict, monkeypatch, capsys):
    """SIGTERM in the middle of a real EISAM run stops the grid with a checkpoint (exit 143, one
    line); the same command continues that run, and its row equals an uninterrupted grid's."""
    from recbole_eisam.bench.runs import RESUME_SUFFIX, read_resume_pointer
    from recbole_eisam.cli import main_guard
    from recbole_eisam.trainer import EISAMTrainer

    monkeypatch.chdir(tmp_path)  # RecBole writes ./log
    config = dict(tiny_config_dict, epochs=3, stopping_step=10)
    del config["seed"], config["checkpoint_dir"]  # the grid sets them (each folder its own saved/)
    grid = Grid(dataset="tiny", models=["SASRec"], reference_models=[], methods=["eisam"], seeds=[1], config=config)
    grid_file = _write_grid(tmp_path, grid)
    columns = ["test_ndcg@10", "test_tailndcg@10", "test_hit@10", "valid_ndcg@10", "best_epoch", "epochs_trained",
               "valid_curve"]

    step, steps = EISAMTrainer._step, []

    def counted_step(self, batches, scaler):
        stats = step(self, batches, scaler)
        steps.append(1)
        if len(steps) == stop_at:  # in the second epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(EISAMTrainer, "_step", counted_step)
    stop_at, uninterrupted = None, str(tmp_path / "a")
    assert benchmark.main(["--out=" + uninterrupted, "--grid=" + grid_file, "--no_report"]) == 0
    expected = pd.read_csv(os.path.join(uninterrupted, "results.csv"))[columns]
    total_steps = len(steps)

    stop_at, out = 8, str(tmp_path / "b")
    steps.clear()
    capsys.readouterr()
    command = ["--out=" + out, "--grid=" + grid_file, "--no_report"]
    assert main_guard(benchmark.main, command) == 128 + signal.SIGTERM  # as `python -m ...benchmark`
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: SASRec eisam seed 1 was interrupted after a checkpoint: the same grid command "
                       "resumes it there."), err
    assert not os.path.exists(os.path.join(out, "results.csv"))
    (pointer,) = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names
                  if name.endswith(RESUME_SUFFIX)]
    state = read_resume_pointer(pointer)
    assert state["interruptions"] == 1 and os.path.isfile(state["checkpoint"]) and state["seconds"] > 0

    stop_at = None
    steps.clear()
    assert main_guard(benchmark.main, command) == 0
    assert len(steps) == total_steps - 8  # it went on from the checkpoint, not from the start
    resumed = pd.read_csv(os.path.join(out, "results.csv"))
    pd.testing.assert_frame_equal(resumed[columns], expected)
    with open(pointer[: -len(RESUME_SUFFIX)] + ".json") as f:
        assert json.load(f)["attempt_seconds"] == state["seconds"]
    assert resumed["wall_seconds"][0] >= state["seconds"]  # the first attempt's time counts
    assert not os.path.exists(pointer) and not os.path.exists(state["checkpoint"])
    assert "Resuming from " + state["checkpoint"] in open(pointer[: -len(RESUME_SUFFIX)] + ".log").read()


def test_a_resume_pointer_without_its_checkpoint_starts_the_run_over(tmp_path):
    from recbole_eisam.bench.runs import read_resume_pointer

    pointer = tmp_path / "seed1-abc.resume.json"
    pointer.write_text(json.dumps({"checkpoint": str(tmp_path / "gone-resume.safetensors"), "seconds": 5.0,
                                   "interruptions": 1}))
    assert read_resume_pointer(str(pointer)) is None and not pointer.exists()
    assert read_resume_pointer(str(pointer)) is None  # no pointer: a fresh run


def _write_grid(tmp_path, grid):
    import yaml

    path = tmp_path / "grid.yaml"
    data = {k: getattr(grid, k) for k in ("dataset", "models", "reference_models", "methods", "seeds", "config")}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_signature_follows_the_packages_default_yaml(tmp_path, monkeypatch):
    """A changed package default (e.g. properties/model/LLMRec.yaml) makes a new run, not a resumed one."""
    from recbole_eisam import defaults
    from recbole_eisam.bench.grid import RunSpec

    layer = tmp_path / "LLMRec.yaml"
    layer.write_text("epochs: 5\n")
    monkeypatch.setattr(defaults, "default_config_files", lambda model, dataset: [str(layer)])
    def spec():
        return RunSpec("ml-100k", "LLMRec", "erm", 1, {}, {"train_method": "erm"}, [], "final")

    running = spec()
    before = running.signature
    assert spec().signature == before  # stable
    layer.write_text("epochs: 10\n")
    assert spec().signature != before  # the next grid sees the new default
    assert running.signature == before  # a run under way keeps one name


def test_grid_refuses_a_folder_of_another_machine(tmp_path, fake, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setattr(benchmark, "machine_description", lambda: "CPU A, 2 cores, torch 2.13.0")
    first = FakeRuns(stop_after=3)
    monkeypatch.setattr(benchmark, "execute_run", first)
    with pytest.raises(KeyboardInterrupt):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    # the same machine resumes (two more runs, then stopped again)
    again = FakeRuns(stop_after=2)
    monkeypatch.setattr(benchmark, "execute_run", again)
    with pytest.raises(KeyboardInterrupt):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    assert len(again.calls) == 2 and not set(first.calls) & set(again.calls)
    # another machine is told which folder and machines, and runs nothing
    monkeypatch.setattr(benchmark, "machine_description", lambda: "CPU B, 2 cores, torch 2.13.0")
    second = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", second)
    with pytest.raises(GridError, match=r"results\.csv holds rows run on 'CPU A.*this machine is 'CPU B"):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    assert second.calls == []
    Benchmark(_grid(), out, log=lambda *_: None, allow_mixed_machines=True).run()
    assert len(second.calls) == EXPECTED_RUNS - 5
    machines = pd.concat([pd.read_csv(os.path.join(out, f)) for f in ("tuning.csv", "results.csv")])["machine"]
    assert set(machines) == {"CPU A, 2 cores, torch 2.13.0", "CPU B, 2 cores, torch 2.13.0"}


def test_grid_refuses_a_folder_made_with_other_settings(tmp_path, fake, monkeypatch):
    """Resuming after a change of the grid's config or of a package default would put two
    set-ups in one report: refused before any run, with the folder and the run named."""
    from recbole_eisam import defaults

    out = str(tmp_path / "out")
    layer = tmp_path / "A.yaml"
    layer.write_text("epochs: 5\n")
    monkeypatch.setattr(defaults, "default_config_files", lambda model, dataset: [str(layer)])
    first = FakeRuns(stop_after=3)
    monkeypatch.setattr(benchmark, "execute_run", first)
    with pytest.raises(KeyboardInterrupt):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    stored = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(stored) + len(pd.read_csv(os.path.join(out, "tuning.csv"))) == 3

    later = FakeRuns()
    monkeypatch.setattr(benchmark, "execute_run", later)
    with pytest.raises(GridError, match=r"results\.csv holds A erm seed 1 run with other settings"):
        Benchmark(_grid(config={"epochs": 4}), out, log=lambda *_: None).run()
    layer.write_text("epochs: 6\n")  # a package default changed
    with pytest.raises(GridError, match=r"package default under properties/"):
        Benchmark(_grid(), out, log=lambda *_: None).run()
    assert later.calls == []
    # the settings the folder was made with resume it; another folder takes the new ones
    layer.write_text("epochs: 5\n")
    Benchmark(_grid(), out, log=lambda *_: None).run()
    assert len(later.calls) == EXPECTED_RUNS - 3
    layer.write_text("epochs: 6\n")
    Benchmark(_grid(), str(tmp_path / "new"), log=lambda *_: None).run()
    assert len(later.calls) == 2 * EXPECTED_RUNS - 3


def _append_many(path, start, count):
    from recbole_eisam.bench.runs import append_row

    for i in range(start, start + count):
        append_row(path, {"dataset": "toy", "model": "A", "method": "erm", "seed": i, "signature": "s"})


def test_parallel_appends_keep_every_row(tmp_path):
    """Two grids split by --methods into one folder append to one results.csv at once."""
    import multiprocessing

    from recbole_eisam.bench.runs import read_rows

    path = str(tmp_path / "results.csv")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, start, 60)) for start in (0, 1000)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    seeds = sorted(int(row["seed"]) for row in read_rows(path))
    assert seeds == list(range(0, 60)) + list(range(1000, 1060))


def test_claimed_runs_are_left_to_the_process_running_them(tmp_path, fake):
    """Two grid processes in one folder: a final run another live process has claimed is left
    to it, a validation run is waited for (its row then decides the choice), and a claim left
    by a process that has ended is taken over."""
    out = str(tmp_path / "out")
    bench = Benchmark(_grid(methods=["erm", "sam"], reference_models=[]), out, log=lambda *_: None)
    bench.CLAIM_POLL_SECONDS = 0.05
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()

    def claim(spec, pid):
        path = os.path.join(out, spec.file_stem() + ".claim")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{socket.gethostname()} {pid}\n")
        return path

    held_final = claim(bench.spec("A", "erm", 2, {}, "final"), other.pid)
    claim(bench.spec("A", "erm", 1, {}, "final"), ended.pid)
    tune = bench.spec("A", "sam", 1, {"eisam_rho": 0.01}, "tune")
    held_tune = claim(tune, other.pid)

    def the_other_process_finishes_its_validation_run():
        time.sleep(0.3)
        result = {"best_valid_score": 0.5, "best_valid_result": {"ndcg@10": 0.5}, "test_result": {"ndcg@10": 0.6}}
        append_row(bench.tuning_path, make_row(tune, result, 1.0, "x.topk.tsv", "item_stats/x.tsv", "NDCG@10", "m"))
        os.remove(held_tune)

    finisher = threading.Thread(target=the_other_process_finishes_its_validation_run)
    finisher.start()
    try:
        assert bench.run() == []
    finally:
        finisher.join()
        other.kill()
        other.wait()
    calls = {(method, seed, params, stage) for _, method, seed, params, stage in fake.calls}
    assert ("erm", 2, "{}", "final") not in calls  # left to the live process
    assert ("erm", 1, "{}", "final") in calls  # the ended process's claim taken over
    assert ("sam", 1, '{"eisam_rho": 0.01}', "tune") not in calls  # waited for, not repeated
    # the waited-for row (validation 0.5) beats the other candidate (0.05): the choice used it
    assert ("sam", 2, '{"eisam_rho": 0.01}', "final") in calls
    claims = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if n.endswith(".claim")]
    assert claims == [held_final]  # this process released its own, never another's


def test_a_broken_claim_is_held_briefly_then_stale(tmp_path):
    """A claim file without its owner line is being written (held), unless it is old: a
    process that died between creating and writing it must not block the run for ever."""
    path = str(tmp_path / "runs" / "x.claim")
    os.makedirs(os.path.dirname(path))
    open(path, "w").close()
    assert not try_claim(path)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert try_claim(path)
    with open(path) as f:
        assert f.read().split() == [socket.gethostname(), str(os.getpid())]
    release_claim(path)
    assert not os.path.exists(path)
