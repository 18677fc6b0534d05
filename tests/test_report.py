"""The report builder on a hand-made results.csv and hand-made top-K files (no training)."""

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from recbole_eisam.analysis import report
from recbole_eisam.analysis import stats as numbers
from recbole_eisam.analysis.topk import read_topk

N_ITEMS, N_USERS, HEAD = 20, 40, 4  # head_ratio 0.2 of 20 items
METRICS = {  # (method, seed) -> test_ndcg@10, test_tailndcg@10
    ("erm", 1): (0.10, 0.020),
    ("erm", 2): (0.12, 0.030),
    ("erm", 3): (0.11, 0.025),
    ("eisam", 1): (0.11, 0.030),
    ("eisam", 2): (0.10, 0.040),
    ("eisam", 3): (0.12, 0.032),
    ("same", 1): (0.10, 0.020),
    ("same", 2): (0.12, 0.030),
    ("same", 3): (0.11, 0.025),
}


def _item_stats(path):
    counts = np.arange(N_ITEMS, 0, -1) * 3  # i1 most frequent
    frame = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
        "train_count": counts,
        "popularity_rank": np.arange(1, N_ITEMS + 1),
        "is_head": (np.arange(1, N_ITEMS + 1) <= HEAD).astype(int),
    })
    frame.to_csv(path, sep="\t", index=False)


def _topk(path, targets, rng):
    rows = []
    for u, target in enumerate(targets):
        items = [f"i{i}" for i in rng.permutation(N_ITEMS)[:12] + 1]
        rows.append((f"u{u}", target, " ".join(items)))
    pd.DataFrame(rows, columns=["user_id", "target_item_id", "topk_item_ids"]).to_csv(path, sep="\t", index=False)


def _ndcg(path):
    """Per-user NDCG@10 computed independently of the package."""
    frame = pd.read_csv(path, sep="\t", dtype=str)
    values = []
    for target, items in zip(frame["target_item_id"], frame["topk_item_ids"]):
        listed = items.split()[:10]
        values.append(1 / math.log2(listed.index(target) + 2) if target in listed else 0.0)
    return np.array(values)


@pytest.fixture
def bench(tmp_path):
    out = tmp_path / "bench"
    (out / "runs").mkdir(parents=True)
    _item_stats(out / "items.tsv")
    rng = np.random.default_rng(0)
    targets = [f"i{i}" for i in rng.integers(1, N_ITEMS + 1, size=N_USERS)]
    rows = []
    for (method, seed), (ndcg, tail) in METRICS.items():
        topk = f"runs/{method}-{seed}.tsv"
        if method == "same":  # identical rankings to ERM: every difference is zero
            (out / topk).write_text((out / f"runs/erm-{seed}.tsv").read_text())
        else:
            _topk(out / topk, targets, rng)
        rows.append({
            "dataset": "toy", "model": "M", "method": method, "seed": seed, "signature": "x",
            "params": json.dumps({"eisam_rho": 0.05} if method == "eisam" else {}),
            "test_ndcg@10": ndcg, "test_hit@10": 2 * ndcg, "test_headndcg@10": 3 * ndcg,
            "test_tailndcg@10": tail, "test_tailhit@10": 2 * tail, "test_tailcoverage@10": 0.5,
            "test_giniindex@10": 0.9, "wall_seconds": 1.0,
            "topk_file": topk, "item_stats_file": "items.tsv",
            "machine": "CPU A, 2 cores, torch 2.13.0",
        })
    # a reference model with ERM only, and no top-K file
    rows.append({"dataset": "toy", "model": "Pop", "method": "erm", "seed": 1, "signature": "y",
                 "params": "{}", "test_ndcg@10": 0.05, "test_tailndcg@10": 0.0})
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    return str(out), targets


def test_summary_means_stds_and_relative_change(bench):
    out, _ = bench
    summary = numbers.summarize(numbers.load_results(out))
    for method in ("erm", "eisam"):
        values = np.array([METRICS[(method, s)][1] for s in (1, 2, 3)])
        row = summary.loc[("toy", "M", method)]
        assert row["tailndcg@10_mean"] == pytest.approx(values.mean())
        assert row["tailndcg@10_std"] == pytest.approx(values.std(ddof=1))  # sample std
        assert row["n_seeds"] == 3
    erm = np.mean([METRICS[("erm", s)][1] for s in (1, 2, 3)])
    eisam = np.mean([METRICS[("eisam", s)][1] for s in (1, 2, 3)])
    assert summary.loc[("toy", "M", "eisam"), "tailndcg@10_rel"] == pytest.approx((eisam - erm) / erm)
    assert summary.loc[("toy", "M", "erm"), "ndcg@10_rel"] == pytest.approx(0.0)
    # a method run on fewer seeds than ERM is set against ERM on its own seeds only
    fewer = numbers.summarize(numbers.load_results(out).query("not (method == 'eisam' and seed == 1)"))
    erm23 = np.mean([METRICS[("erm", s)][1] for s in (2, 3)])
    eisam23 = np.mean([METRICS[("eisam", s)][1] for s in (2, 3)])
    assert fewer.loc[("toy", "M", "eisam"), "tailndcg@10_rel"] == pytest.approx((eisam23 - erm23) / erm23)
    # one seed: no std; no ERM of its own model is needed for a reference row's mean
    assert math.isnan(summary.loc[("toy", "Pop", "erm"), "ndcg@10_std"])
    assert summary.loc[("toy", "Pop", "erm"), "ndcg@10_mean"] == pytest.approx(0.05)


def test_per_user_ndcg_matches_independent_computation(bench):
    out, _ = bench
    path = os.path.join(out, "runs/eisam-1.tsv")
    np.testing.assert_allclose(read_topk(path)["ndcg"].to_numpy(), _ndcg(path))


def test_wilcoxon_pvalues_pooled_over_seeds(bench):
    out, targets = bench
    tests = numbers.paired_tests(numbers.load_results(out), out)
    diffs = np.concatenate([
        _ndcg(os.path.join(out, f"runs/eisam-{s}.tsv")) - _ndcg(os.path.join(out, f"runs/erm-{s}.tsv"))
        for s in (1, 2, 3)
    ])
    tail_rows = np.tile([int(t[1:]) > HEAD for t in targets], 3)
    row = tests.loc[("toy", "M", "eisam")]
    assert row["p_all"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert row["p_tail"] == pytest.approx(stats.wilcoxon(diffs[tail_rows]).pvalue)
    assert row["n_all"] == 3 * N_USERS and row["n_tail"] == int(tail_rows.sum())
    assert row["mean_diff_all"] == pytest.approx(diffs.mean())
    seed1 = _ndcg(os.path.join(out, "runs/eisam-1.tsv")) - _ndcg(os.path.join(out, "runs/erm-1.tsv"))
    assert row["per_seed"][1][0] == pytest.approx(stats.wilcoxon(seed1).pvalue)
    # identical rankings: all differences zero -> p = 1, not an exception or nan
    same = tests.loc[("toy", "M", "same")]
    assert same["p_all"] == 1.0 and same["p_tail"] == 1.0 and same["nonzero_all"] == 0


def test_decile_curve(bench):
    out, targets = bench
    curves = numbers.decile_curves(numbers.load_results(out), out)
    curve = curves[("toy", "M")]
    # 20 items -> 2 items per decile; decile of item i = ceil(i / 2)
    deciles = np.array([(int(t[1:]) + 1) // 2 for t in targets])
    ndcg = np.concatenate([_ndcg(os.path.join(out, f"runs/erm-{s}.tsv")) for s in (1, 2, 3)])
    pooled = np.tile(deciles, 3)
    for d in range(1, 11):
        expected = ndcg[pooled == d].mean() if (pooled == d).any() else np.nan
        np.testing.assert_allclose(curve["methods"]["erm"][d - 1], expected)
    assert sum(curve["counts"]) == N_USERS



def test_decile_table_lists_every_method_and_decile(bench):
    out, _ = bench
    curve = numbers.decile_curves(numbers.load_results(out), out)[("toy", "M")]
    lines = report.decile_table_lines(curve)
    rows = {line.split(" | ")[0].strip("| *"): line for line in lines if line.startswith("| ")}
    assert set(rows) == {"method", "erm", "eisam", "same"}
    assert rows["method"].count("(n=") == 10
    for method in ("erm", "eisam"):
        cells = [c.strip() for c in rows[method].strip("|").split("|")[1:]]
        expected = [report._fmt(v) for v in curve["methods"][method]]
        assert cells == expected and len(cells) == 10
    assert "**eisam**" in rows["eisam"]
    # without plots the report still carries the numbers
    text = open(report.build_report(out, plots=False)).read()
    assert rows["erm"] in text and not os.path.exists(os.path.join(out, "plots"))

def test_report_file_and_plots(bench):
    out, _ = bench
    path = report.build_report(out)
    text = open(path).read()
    eisam = np.array([METRICS[("eisam", s)][1] for s in (1, 2, 3)])
    erm = np.mean([METRICS[("erm", s)][1] for s in (1, 2, 3)])
    cell = f"{eisam.mean():.4f} ± {eisam.std(ddof=1):.4f} ({(eisam.mean() - erm) / erm * 100:+.1f}%)"
    assert cell in text
    assert "## M on toy" in text and "Reference models" in text and "eisam_rho=0.05" in text
    assert "EISAM / ERM TailNDCG@10" in text
    # nine runs on CPU A, the Pop row records no machine: two machines, counted
    assert "**The rows come from 2 machines**" in text
    assert "- CPU A, 2 cores, torch 2.13.0: 9 runs" in text and "- not recorded: 1 run" in text
    assert os.path.getsize(os.path.join(out, "plots", "head_tail_toy_M.png")) > 1000
    assert os.path.getsize(os.path.join(out, "plots", "deciles_toy_M.png")) > 1000


def test_mismatched_topk_files_are_refused(bench):
    out, _ = bench
    path = os.path.join(out, "runs/eisam-1.tsv")
    frame = pd.read_csv(path, sep="\t", dtype=str).iloc[:-1]  # one user fewer
    frame.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="same test rows"):
        numbers.paired_tests(numbers.load_results(out), out)


def _tuning_csv(out, rows):
    pd.DataFrame([
        {"dataset": "toy", "model": "M", "method": method, "seed": 1, "stage": "tune",
         "params": json.dumps(params), "valid_metric": "NDCG@10", "best_valid_score": score}
        for method, params, score in rows
    ]).to_csv(os.path.join(out, "tuning.csv"), index=False)


def _method_lines(text, marker):
    return [line for line in text.splitlines() if line.startswith(marker)]


def test_report_marks_the_configuration_the_rows_ran(bench):
    out, _ = bench
    results = pd.read_csv(os.path.join(out, "results.csv"))
    results["tuned_on_seed"] = np.where(results["method"] == "eisam", 1, np.nan)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    _tuning_csv(out, [("eisam", {"eisam_rho": 0.05}, 0.08), ("eisam", {"eisam_rho": 0.1}, 0.07)])
    text = open(report.build_report(out)).read()
    assert _method_lines(text, "| eisam | eisam_rho=") == [
        "| eisam | eisam_rho=0.05 | 0.0800 | ✔ |", "| eisam | eisam_rho=0.1 | 0.0700 |  |"]
    assert "- eisam: eisam_rho=0.05 (chosen on validation, seed 1)" in text
    assert "- erm: (defaults)" in text
    assert "was not finished or was superseded" not in text


def test_report_says_an_ablation_reuses_the_choice_of_its_method(bench):
    """An ablation runs EISAM's validation choice and is never searched itself."""
    out, _ = bench
    results = pd.read_csv(os.path.join(out, "results.csv"))
    ablation = results["method"] == "same"
    results.loc[ablation, "method"] = "reweight_only"
    results.loc[ablation, "params"] = json.dumps({"eisam_alpha": 0.5})
    results["tuned_on_seed"] = np.where(results["method"].isin(["eisam", "reweight_only"]), 1, np.nan)
    results.to_csv(os.path.join(out, "results.csv"), index=False)
    text = open(report.build_report(out)).read()
    assert "- reweight_only: eisam_alpha=0.5 (eisam's values, chosen on validation, seed 1)" in text
    assert "- eisam: eisam_rho=0.05 (chosen on validation, seed 1)" in text


def test_report_does_not_mark_a_search_the_rows_did_not_use(bench):
    """A left-over search (here: a better candidate the final rows did not run) gets no ✔,
    and the rows' parameters are reported as given by the grid file."""
    out, _ = bench
    _tuning_csv(out, [("eisam", {"eisam_rho": 0.2}, 0.09)])
    text = open(report.build_report(out)).read()
    assert _method_lines(text, "| eisam | eisam_rho=") == ["| eisam | eisam_rho=0.2 | 0.0900 |  |"]
    assert "- eisam: eisam_rho=0.05 (given by the grid file, not searched on this model)" in text
    assert "No reported row of eisam ran a configuration from this search" in text


def test_report_names_a_single_machine():
    frame = pd.DataFrame({"machine": ["CPU A, 2 cores, torch 2.13.0"] * 3})
    assert report.machine_lines(frame) == ["Machine: CPU A, 2 cores, torch 2.13.0 (all 3 runs)."]
    assert report.machine_lines(pd.DataFrame({"seed": [1]})) == ["Machine: not recorded in results.csv."]


def test_eisam_against_each_baseline_is_paired_on_the_seeds_both_ran(bench):
    out, targets = bench
    results = pd.read_csv(os.path.join(out, "results.csv"))
    rng = np.random.default_rng(1)
    rows = []
    for seed in (1, 2):  # the baseline ran two of EISAM's three seeds
        topk = f"runs/sam-{seed}.tsv"
        _topk(os.path.join(out, topk), targets, rng)
        erm = (results["method"] == "erm") & (results["seed"] == seed) & (results["model"] == "M")
        row = results[erm].iloc[0].copy()
        row["method"], row["topk_file"] = "sam", topk
        rows.append(row)
    # an ablation that ran seed 3 only and ranked exactly as EISAM did: zero differences
    shutil.copyfile(os.path.join(out, "runs/eisam-3.tsv"), os.path.join(out, "runs/noweight-3.tsv"))
    row = results[(results["method"] == "eisam") & (results["seed"] == 3)].iloc[0].copy()
    row["method"], row["topk_file"] = "eisam_noweight", "runs/noweight-3.tsv"
    rows.append(row)
    pd.concat([results, pd.DataFrame(rows)]).to_csv(os.path.join(out, "results.csv"), index=False)

    diffs = np.concatenate([
        _ndcg(os.path.join(out, f"runs/eisam-{s}.tsv")) - _ndcg(os.path.join(out, f"runs/sam-{s}.tsv"))
        for s in (1, 2)
    ])
    tail_rows = np.tile([int(t[1:]) > HEAD for t in targets], 2)
    text = open(report.build_report(out, plots=False)).read()
    line = next(l for l in text.splitlines() if l.startswith("| sam | ") and l.count("|") == 8)
    cells = [c.strip() for c in line.strip("|").split("|")]

    def value_and_ci(cell):
        value, interval = cell.split(" [")
        lo, hi = interval.rstrip("]").split(", ")
        return float(value), float(lo), float(hi)

    mean_all, lo, hi = value_and_ci(cells[1])
    assert mean_all == pytest.approx(diffs.mean(), abs=5e-6)  # EISAM - baseline
    # the interval resamples the seeds and the users: here (random rankings, no seed effect)
    # about as wide as the normal interval of the pooled mean
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert lo < mean_all < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.35)
    assert float(cells[2]) == pytest.approx(stats.wilcoxon(diffs).pvalue, abs=5e-4)  # 3 decimals
    assert value_and_ci(cells[3])[0] == pytest.approx(diffs[tail_rows].mean(), abs=5e-6)
    assert float(cells[4]) == pytest.approx(stats.wilcoxon(diffs[tail_rows]).pvalue, abs=5e-4)
    assert cells[5] == ""  # these top-K files hold no full rank
    assert cells[6] == "1, 2"
    zero = "+0.00000 [+0.00000, +0.00000]"
    assert f"| eisam_noweight (ablation) | {zero} | 1.000 | {zero} | 1.000 |  | 3 |" in text
    # neither ERM nor an unknown method gets a head-to-head row
    assert not any(l.startswith(("| erm | ", "| same | ")) and l.count("|") == 8 for l in text.splitlines())


def test_resolution_from_two_erm_seeds(bench):
    """The minimum detectable difference: (z_0.975 + z_0.8) * SD(seed difference) / sqrt(S * users)."""
    out, targets = bench
    diff = _ndcg(os.path.join(out, "runs/erm-1.tsv")) - _ndcg(os.path.join(out, "runs/erm-2.tsv"))
    tail = np.array([int(t[1:]) > HEAD for t in targets])
    text = open(report.build_report(out, plots=False)).read()
    assert "Resolution, from ERM's seeds 1 and 2" in text
    row = next(l for l in text.splitlines() if l.startswith("| NDCG@10, all users |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(diff.std(ddof=1), abs=5e-5)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    header = next(l for l in text.splitlines() if l.startswith("| measure | mean"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    s3 = columns.index("S = 3")
    assert float(cells[s3]) == pytest.approx(z * diff.std(ddof=1) / np.sqrt(3 * len(diff)), abs=5e-5)
    tail_row = next(l for l in text.splitlines() if l.startswith("| NDCG@10, tail users |"))
    tail_cells = [c.strip() for c in tail_row.strip("|").split("|")]
    assert float(tail_cells[s3]) == pytest.approx(
        z * diff[tail].std(ddof=1) / np.sqrt(3 * tail.sum()), abs=5e-5)
    assert numbers.minimum_detectable_difference(1.0, 100) == pytest.approx(z / 10)


def test_bootstrap_interval_covers_the_mean_at_the_normal_width():
    rng = np.random.default_rng(3)
    values = rng.normal(0.2, 1.0, size=4000)
    lo, hi = numbers.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(len(values)), rel=0.1)
    assert numbers.bootstrap_ci(values) == (lo, hi)  # a fixed seed: the same interval every time


def test_convergence_marks_runs_cut_off_by_the_epoch_cap():
    frame = pd.DataFrame({
        "model": ["M", "M", "M"], "method": ["erm", "erm", "eisam"], "seed": [2, 1, 1],
        "best_epoch": [9, 3, 4], "epochs_trained": [10, 9, 10], "max_epochs": [10, 10, 50],
        "wall_seconds": [10.0, 20.0, 30.0],
    })
    lines = report.convergence_lines(frame)
    assert "| M | erm | 3/9, 9/10* | 15.0 | 2 |" in lines  # seed 2 peaked at its last allowed epoch
    assert "| M | eisam | 4/10 | 30.0 | 1 |" in lines  # stopped early: 5 epochs without a better score


def test_interval_over_seeds_and_users_holds_the_run_to_run_variation():
    rng = np.random.default_rng(4)
    users = rng.normal(0.0, 1.0, size=2000)
    shifted = [users + shift for shift in (-0.3, 0.0, 0.3, 0.6)]  # each seed moves every user
    lo, hi = numbers.seeds_and_users_ci(shifted)
    pooled_lo, pooled_hi = numbers.bootstrap_ci(np.concatenate(shifted))
    assert lo < np.mean(shifted) < hi
    assert hi - lo > 3 * (pooled_hi - pooled_lo)  # the seeds' spread, not only the users'
    assert numbers.seeds_and_users_ci([users]) == numbers.bootstrap_ci(users)  # one seed: users only


def test_tables_print_each_models_method_table_with_wall_time(bench, capsys):
    out, _ = bench
    assert report.main(["--out", out, "--tables"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("M on toy:") and "Pop on toy" not in printed  # reference models stay in REPORT.md
    header = next(line for line in printed.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[-2:] == ["s / run", "seeds |"]
    eisam = next(line for line in printed.splitlines() if line.startswith("| **eisam**"))
    assert eisam.split(" | ")[-2:] == ["1", "3 |"]  # mean wall time of the three runs
    assert not os.path.exists(os.path.join(out, "REPORT.md"))
