"""Benchmark report: ``<out>/results.csv`` -> ``<out>/REPORT.md`` and PNG plots.

    python -m recbole_eisam.analysis.report --out=DIR

What the report computes (stated again at the top of REPORT.md):

* **mean +- std over seeds** of each test metric, ``std`` the *sample* standard deviation
  (``ddof=1``; empty with a single seed);
* **relative change vs ERM**: ``(mean_method - mean_ERM) / mean_ERM`` of the same model and
  dataset, from the means over the seeds both ran;
* **paired significance vs ERM**: two-sided Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, ``zero_method="wilcox"``: users with equal NDCG drop out) on
  per-user NDCG@10 read from the runs' top-K files, the method against ERM of the same
  model **and the same seed**; the pairs of all seeds are pooled (users x seeds) into one
  test. ``p_tail`` uses only the users whose test target is a tail item of the training
  split, ``p_all`` every user. When every difference is zero the p-value is 1. P-values of
  each seed alone are listed in an appendix;
* **EISAM against each long-tail baseline and ablation**: the same test with EISAM as the
  reference (same model, same seeds), so that "EISAM ahead of baseline X on the tail" comes
  with its paired difference and p-value rather than a difference of means alone;
* **plots**: head vs tail NDCG@10 per method (bars, mean +- std over seeds) and NDCG@10 by
  popularity decile of the target item (deciles of the items ranked by training frequency,
  10 equal-size item groups, 1 = most popular; per-user values pooled over seeds).

The columns of ``results.csv`` it reads: ``dataset, model, method, seed, params,
test_<metric>``, and for the tests and the decile plot ``topk_file`` and
``item_stats_file`` (paths relative to the output folder). ``tuning.csv`` (written by the
benchmark) adds the hyper-parameter search to the report.
"""

import argparse
import datetime
import json
import math
import os

import pandas as pd

from recbole_eisam.analysis.plots import plot_deciles, plot_head_tail
from recbole_eisam.analysis.stats import (
    ABLATIONS,
    BASELINE,
    BOOTSTRAP,
    LONGTAIL_BASELINES,
    METRICS,
    K,
    _Cache,
    decile_curves,
    load_results,
    method_sort_key,
    minimum_detectable_difference,
    paired_tests,
    seed_noise,
    summarize,
)
from recbole_eisam.cli import main_guard
from recbole_eisam.methods import METHODS

# --------------------------------------------------------------------------- formatting
def _fmt(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _fmt_p(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _fmt_rel(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f" ({value * 100:+.1f}%)"


def _cell(row, key, with_rel):
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    text = _fmt(mean)
    if not math.isnan(std):
        text += f" ± {_fmt(std)}"
    if with_rel:
        text += _fmt_rel(row[f"{key}_rel"])
    return text


def _params_text(results, dataset, model, method):
    """The hyper-parameters a method's rows ran with, and where they came from.

    A row with ``tuned_on_seed`` took them from a validation search (its own, or, for an
    ablation, the search of the method it derives from); a row without it ran what the grid
    file gave, searched on no validation split of this model.
    """
    sub = results[(results["dataset"] == dataset) & (results["model"] == model) & (results["method"] == method)]
    if "params" not in sub:
        return ""
    out = []
    for text, rows in sub.groupby(sub["params"].fillna("{}").astype(str), sort=True):
        try:
            params = json.loads(text)
        except json.JSONDecodeError:
            params = None
        shown = text if params is None else ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        if not shown:
            out.append("(defaults)")
            continue
        seeds = pd.to_numeric(rows["tuned_on_seed"], errors="coerce").dropna() if "tuned_on_seed" in rows else []
        if len(seeds):
            origin = "chosen on validation, seed " + ", ".join(str(int(s)) for s in sorted(set(seeds)))
            source = _inherits_from(method)
            if source:  # an ablation is never searched itself
                origin = f"{source}'s values, {origin}"
        else:
            origin = "given by the grid file, not searched on this model"
        out.append(f"{shown} ({origin})")
    return "; ".join(out)


def _inherits_from(method):
    """The method whose validation choice ``method`` reuses (an ablation), else None."""
    preset = METHODS.get(method)
    return preset.inherit_from if preset is not None else None


def _used_params(results, dataset, model, method):
    """The parameter sets (as dicts) the final rows of a method ran with."""
    sub = results[(results["dataset"] == dataset) & (results["model"] == model) & (results["method"] == method)]
    used = []
    for text in sub.get("params", pd.Series(dtype=str)).dropna().astype(str).unique():
        try:
            used.append(json.loads(text))
        except json.JSONDecodeError:
            pass
    return used


def decile_table_lines(curve, k=K):
    """The decile curve as a Markdown table: one row per method, one column per decile."""
    counts = curve["counts"]
    header = ["method"] + [f"{d} (n={c})" for d, c in enumerate(counts, start=1)]
    lines = [
        f"NDCG@{k} by training-popularity decile of the test target (1 = most frequent items; "
        "n = test users per seed; users pooled over seeds):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method in sorted(curve["methods"], key=method_sort_key):
        cells = [f"**{method}**" if method == "eisam" else method]
        cells += [_fmt(value) for value in curve["methods"][method]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ci(value, ci, digits=4):
    """``+0.0012 [-0.0003, +0.0027]``: a difference and its 95% interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    lo, hi = ci if isinstance(ci, (tuple, list)) else (float("nan"), float("nan"))
    return f"{value:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def model_table(summary, tests, dataset, model, metrics=METRICS, results=None):
    """Markdown table of one model: metrics (mean ± std (Δ vs ERM)), the differences to ERM
    with their 95% intervals, p-values, the mean wall time of a run (with ``results``), seeds."""
    part = summary.xs((dataset, model), level=("dataset", "model"))
    methods = sorted(part.index, key=method_sort_key)
    seconds = {}
    if results is not None and "wall_seconds" in results:
        rows = results[(results["dataset"] == dataset) & (results["model"] == model)]
        seconds = pd.to_numeric(rows["wall_seconds"], errors="coerce").groupby(rows["method"]).mean().to_dict()
    header = ["method"] + [name for _, name in metrics] + [
        "Δ NDCG@10 vs ERM [95% CI]", "Δ TailNDCG@10 [95% CI]", "Δ TailMRR [95% CI]", "p (all)", "p (tail)"] + (
        ["s / run"] if seconds else []) + ["seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = part.loc[method]
        cells = [f"**{method}**" if method == "eisam" else method]
        cells += [_cell(row, key, method != BASELINE) for key, _ in metrics]
        if method != BASELINE and (dataset, model, method) in tests.index:
            test = tests.loc[(dataset, model, method)]
            cells += [_ci(test["mean_diff_all"], test["ci_all"]), _ci(test["mean_diff_tail"], test["ci_tail"]),
                      _ci(test.get("mean_diff_tail_rr"), test.get("ci_tail_rr")),
                      _fmt_p(test["p_all"]), _fmt_p(test["p_tail"])]
        else:
            cells += [""] * 5
        if seconds:
            cells.append(_fmt(seconds.get(method, float("nan")), 0))
        cells.append(str(row["n_seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolution_lines(entry, seed_counts, source):
    """What differences can be told from seed noise (``entry``: :func:`stats.noise_between`),
    at 80% power and a two-sided 5% level, for differences averaged over each of
    ``seed_counts`` seeds per user."""
    counts = sorted(set(seed_counts))
    lines = [
        f"Resolution, from {source} (per-user differences between two seeds are pure seed noise; "
        f"{entry['users']['all']} users, {entry['users']['tail']} of them with a tail target): the smallest "
        "true difference a paired test finds with 80% power at a two-sided 5% level, for differences "
        "averaged over S seeds per user (a lower bound: it leaves out how much the effect itself "
        "varies between users).",
        "",
        "| measure | mean | per-user SD of a seed difference | " + " | ".join(f"S = {n}" for n in counts) + " |",
        "|" + "---|" * (3 + len(counts)),
    ]
    for key, name, users in (("ndcg_all", "NDCG@10, all users", "all"), ("ndcg_tail", "NDCG@10, tail users", "tail"),
                             ("rr_tail", "MRR, tail users", "tail")):
        sd, n = entry["sd"][key], entry["users"][users]
        cells = [minimum_detectable_difference(sd / math.sqrt(s), n) for s in counts]
        lines.append(f"| {name} | {_fmt(entry['mean'][key])} | {_fmt(sd)} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


def bar_lines(summary, dataset, model):
    """The acceptance bar (EISAM / ERM TailNDCG@10 >= 1.15x, NDCG@10 >= 0.98x), as sentences; empty without ERM and EISAM."""
    try:
        part = summary.xs((dataset, model), level=("dataset", "model"))
    except KeyError:
        return []
    if BASELINE not in part.index or "eisam" not in part.index:
        return []
    erm, eisam = part.loc[BASELINE], part.loc["eisam"]

    def ratio(key):
        if erm[f"{key}_mean"] and not math.isnan(erm[f"{key}_mean"]):
            return eisam[f"{key}_mean"] / erm[f"{key}_mean"]
        return float("nan")

    def verdict(name, key, bar):
        value = ratio(key)
        if math.isnan(value):
            return (f"- EISAM / ERM {name}: undefined (ERM's {name} is "
                    f"{_fmt(erm[f'{key}_mean'])}; EISAM's {_fmt(eisam[f'{key}_mean'])}) (bar: >= {bar}x): NOT met.")
        return f"- EISAM / ERM {name} = {_fmt(value, 3)}x (bar: >= {bar}x): {'met' if value >= bar else 'NOT met'}."

    lines = [verdict("TailNDCG@10", "tailndcg@10", 1.15), verdict("NDCG@10", "ndcg@10", 0.98)]
    baselines = [m for m in LONGTAIL_BASELINES if m in part.index]
    if baselines:
        behind = [m for m in baselines if not eisam["tailndcg@10_mean"] > part.loc[m, "tailndcg@10_mean"]]
        best = max(baselines, key=lambda m: part.loc[m, "tailndcg@10_mean"])
        lines.append(
            f"- EISAM ahead of every long-tail baseline on TailNDCG@10 "
            f"({', '.join(baselines)}; best of them: {best} {_fmt(part.loc[best, 'tailndcg@10_mean'])}): "
            + ("met." if not behind else f"NOT met (not ahead of {', '.join(behind)}).")
        )
    return lines


def head_to_head_lines(against_eisam, dataset, model, k=K):
    """EISAM against each long-tail baseline, each EISAM variant and each ablation, on the
    same users and seeds, as a table.

    ``against_eisam`` is :func:`paired_tests` with ``reference="eisam"``: its differences are
    other - EISAM, shown here as EISAM - other (positive: EISAM ahead), with the intervals
    turned the same way. Empty when no other method has a seed in common with EISAM.
    """
    lines = []
    for method in LONGTAIL_BASELINES + tuple(m for m in METHODS if METHODS[m].role == "eisam") + ABLATIONS:
        key = (dataset, model, method)
        if key not in against_eisam.index or not against_eisam.loc[key, "per_seed"]:
            continue
        test = against_eisam.loc[key]

        def flipped(name):
            lo, hi = test[f"ci_{name}"]
            return _ci(0.0 - test[f"mean_diff_{name}"], (0.0 - hi, 0.0 - lo), 5)

        rr = _ci(0.0 - test["mean_diff_tail_rr"], tuple(0.0 - x for x in reversed(test["ci_tail_rr"])), 5)
        lines.append(
            f"| {method}{' (ablation)' if method in ABLATIONS else ''} | "
            f"{flipped('all')} | {_fmt_p(test['p_all'])} | {flipped('tail')} | {_fmt_p(test['p_tail'])} | "
            f"{rr} | {', '.join(str(s) for s in sorted(test['per_seed']))} |"
        )
    if not lines:
        return []
    return [
        "EISAM against each other method, paired on the same users and seed (EISAM - other "
        f"method, per-user NDCG@{k} and the tail's reciprocal rank; 95% paired bootstrap "
        "intervals over seeds and users; Wilcoxon on users x seeds pooled):",
        "",
        f"| method | Δ NDCG@{k} (all) [95% CI] | p (all) | Δ NDCG@{k} (tail users) [95% CI] | p (tail) | "
        "Δ MRR (tail users) [95% CI] | seeds |",
        "|---|---|---|---|---|---|---|",
    ] + lines


def tuning_section(out, dataset, model, results=None):
    """The validation search as a table; ✔ marks the candidate the reported rows ran with.

    Without ``results`` the best valid score is marked. A search whose choice no reported
    row used (an unfinished or superseded search) is listed without a mark, and says so.
    """
    path = os.path.join(out, "tuning.csv")
    if not os.path.isfile(path):
        return []
    tuning = pd.read_csv(path, dtype={"dataset": str, "model": str, "method": str})
    tuning = tuning[(tuning["dataset"] == dataset) & (tuning["model"] == model)]
    if tuning.empty:
        return []
    lines = [
        "| method | config tried | valid " + str(tuning["valid_metric"].iloc[0]) + " | chosen |",
        "|---|---|---|---|",
    ]
    unused = []
    for method in sorted(tuning["method"].unique(), key=method_sort_key):
        sub = tuning[tuning["method"] == method]
        scores = pd.to_numeric(sub["best_valid_score"], errors="coerce")
        tried = {idx: json.loads(row["params"]) if isinstance(row["params"], str) else {} for idx, row in sub.iterrows()}
        if results is None:
            chosen = {scores.idxmax()} if scores.notna().any() else set()
        else:
            used = _used_params(results, dataset, model, method)
            chosen = {idx for idx, params in tried.items() if params in used}
            if not chosen:
                unused.append(method)
        for idx, params in tried.items():
            text = ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "(defaults)"
            lines.append(f"| {method} | {text} | {_fmt(scores[idx])} | {'✔' if idx in chosen else ''} |")
    seeds = sorted(tuning["seed"].unique())
    lines = [f"Validation search (seed {', '.join(map(str, seeds))}; test numbers never used):", ""] + lines
    if unused:
        lines += ["", f"No reported row of {', '.join(unused)} ran a configuration from this search "
                  "(the search was not finished or was superseded): its rows above ran what is listed "
                  "under 'Hyper-parameters used'."]
    return lines


# --------------------------------------------------------------------------- plots
def machine_lines(results):
    """Which machines the rows ran on: float32 kernels differ between CPUs, so rows of two
    machines are not comparable run against run, and the report says so."""
    if "machine" not in results.columns:
        return ["Machine: not recorded in results.csv."]
    counts = results["machine"].fillna("").astype(str).replace("", "not recorded").value_counts(sort=False)
    if len(counts) == 1:
        return [f"Machine: {counts.index[0]} (all {int(counts.iloc[0])} runs)."]
    lines = [f"**The rows come from {len(counts)} machines**; a CPU change moves float32 runs, "
             "so compare methods within one machine:"]
    lines += [f"- {name}: {int(n)} run{'' if n == 1 else 's'}" for name, n in counts.items()]
    return lines


def convergence_lines(results):
    """Per model and method: the epoch where validation peaked and how long each run trained
    (seeds in order), and the mean wall time; a run whose validation peaked at the last epoch
    it was allowed is marked: it was cut off, not converged."""
    has_epochs = "best_epoch" in results.columns
    lines = ["## Convergence and wall time", "",
             "Best validation epoch / epochs trained per seed (0-based; * = peaked at the last allowed "
             "epoch: cut off before it converged):" if has_epochs else "Epochs were not recorded in results.csv.",
             "", "| model | method | best epoch / trained | mean s / run | runs |", "|---|---|---|---|---|"]
    for (model, method), sub in results.groupby(["model", "method"], sort=False):
        secs = pd.to_numeric(sub["wall_seconds"], errors="coerce")
        epochs = ""
        if has_epochs:
            cells = []
            for _, row in sub.sort_values("seed").iterrows():
                best, trained, cap = (pd.to_numeric(row.get(k), errors="coerce") for k in
                                      ("best_epoch", "epochs_trained", "max_epochs"))
                if pd.isna(best) or pd.isna(trained):
                    continue
                cut = not pd.isna(cap) and cap > 1 and best == trained - 1 and trained >= cap  # 1: one pass (Pop)
                cells.append(f"{int(best)}/{int(trained)}{'*' if cut else ''}")
            epochs = ", ".join(cells)
        lines.append(f"| {model} | {method} | {epochs} | {_fmt(secs.mean(), 1)} | {len(sub)} |")
    return lines + [""]


# --------------------------------------------------------------------------- report
def _slug(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


def method_tables(out, k=K):
    """Each model's method table of ``<out>`` (as in REPORT.md), one after the other."""
    results = load_results(out)
    cache = _Cache(out, k)
    summary = summarize(results)
    tests = paired_tests(results, out, k, cache)
    blocks = []
    for dataset, model in summary.index.droplevel("method").unique():
        if list(summary.xs((dataset, model), level=("dataset", "model")).index) == [BASELINE]:
            continue
        blocks.append(f"{model} on {dataset}:\n\n" + model_table(summary, tests, dataset, model, results=results))
    return "\n\n".join(blocks)


def build_report(out, k=K, plots=True):
    """Write ``<out>/REPORT.md`` (and ``<out>/plots/*.png``); returns the report's path."""
    results = load_results(out)
    cache = _Cache(out, k)
    summary = summarize(results)
    tests = paired_tests(results, out, k, cache)
    against_eisam = paired_tests(results, out, k, cache, reference="eisam")
    curves = decile_curves(results, out, k, cache)
    noise = seed_noise(results, out, k, cache)
    plot_dir = os.path.join(out, "plots")
    if plots:
        os.makedirs(plot_dir, exist_ok=True)

    lines = [
        "# Benchmark report",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from `results.csv` "
        f"({len(results)} runs).",
        "",
        *machine_lines(results),
        "",
        "How to read the tables:",
        "- cells: test metric, mean ± sample std over seeds (ddof=1; no ± with one seed), and in "
        "parentheses the relative change of the mean vs ERM of the same model on the same seeds;",
        "- Gini@10 is the Gini index of the recommended items (lower = more even exposure); "
        "TailCov@10 the share of tail items recommended at least once;",
        f"- p (all) / p (tail): two-sided Wilcoxon signed-rank test on per-user NDCG@{k} vs ERM "
        "of the same model and seed, pairs pooled over seeds (users × seeds), zero differences "
        "dropped; 'tail' = test users whose target is a tail item of the training split. "
        "Per-seed p-values are in the appendix. Pooling counts each user once per seed, so "
        "pairs are not fully independent: read the p-values as indicative;",
        "- Δ ... [95% CI]: the mean per-user difference to ERM of the same model and seeds, with a "
        "paired bootstrap 95% interval that resamples the seeds both ran and, within each, the users "
        f"({BOOTSTRAP} resamples), so it holds the run-to-run variation of training as well as the choice "
        "of users (with one seed: users only); TailMRR is the tail users' mean reciprocal rank of "
        "the target among all items (no cut-off), so it sees movement below rank 10;",
        "- head / tail: the ceil(head_ratio × |I|) most frequent training items are the head.",
        "",
    ]
    appendix = []
    main_models = []
    reference_rows = []
    for (dataset, model), part in summary.groupby(level=["dataset", "model"], sort=False):
        methods = part.index.get_level_values("method")
        if list(methods) == [BASELINE]:
            reference_rows.append((dataset, model))
        else:
            main_models.append((dataset, model))

    for dataset, model in main_models:
        lines += [f"## {model} on {dataset}", "", model_table(summary, tests, dataset, model, results=results), ""]
        seeds = sorted(results[(results["dataset"] == dataset) & (results["model"] == model)]["seed"].unique())
        if (dataset, model) in noise:
            entry = noise[(dataset, model)]
            source = f"ERM's seeds {entry['seeds'][0]} and {entry['seeds'][1]}"
            lines += resolution_lines(entry, [1, 3, 5, 10, len(seeds)], source) + [""]
        bars = bar_lines(summary, dataset, model)
        if bars:
            lines += ["Against the acceptance bar:", ""] + bars + [""]
            head_to_head = head_to_head_lines(against_eisam, dataset, model, k)
            if head_to_head:
                lines += head_to_head + [""]
        lines += ["Hyper-parameters used, and where they came from:", ""]
        part = summary.xs((dataset, model), level=("dataset", "model"))
        for method in sorted(part.index, key=method_sort_key):
            lines.append(f"- {method}: {_params_text(results, dataset, model, method)}")
        lines.append("")
        tuning = tuning_section(out, dataset, model, results)
        if tuning:
            lines += tuning + [""]
        if plots:
            name = f"head_tail_{_slug(dataset)}_{_slug(model)}.png"
            plot_head_tail(summary, dataset, model, os.path.join(plot_dir, name))
            lines += [f"![head vs tail NDCG@10, {model}](plots/{name})", ""]
            if (dataset, model) in curves:
                name = f"deciles_{_slug(dataset)}_{_slug(model)}.png"
                plot_deciles(curves[(dataset, model)], dataset, model, os.path.join(plot_dir, name))
                lines += [f"![NDCG@10 by popularity decile, {model}](plots/{name})", ""]
        if (dataset, model) in curves:
            lines += decile_table_lines(curves[(dataset, model)], k) + [""]
        for method in sorted(part.index, key=method_sort_key):
            if (dataset, model, method) in tests.index:
                test = tests.loc[(dataset, model, method)]
                seeds = ", ".join(
                    f"seed {s}: all {_fmt_p(pa)}, tail {_fmt_p(pt)}" for s, (pa, pt) in sorted(test["per_seed"].items())
                )
                appendix.append(
                    f"- {dataset} / {model} / {method}: pooled n={test['n_all']} "
                    f"(tail n={test['n_tail']}), mean ΔNDCG all {_fmt(test['mean_diff_all'], 5)}, "
                    f"tail {_fmt(test['mean_diff_tail'], 5)}; {seeds or 'no top-K files'}"
                )

    if reference_rows:
        lines += ["## Reference models (ERM only)", ""]
        header = ["dataset", "model"] + [name for _, name in METRICS] + ["seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for dataset, model in reference_rows + [m for m in main_models]:
            if (dataset, model, BASELINE) not in summary.index:
                continue
            row = summary.loc[(dataset, model, BASELINE)]
            cells = [dataset, model] + [_cell(row, key, False) for key, _ in METRICS] + [str(row["n_seeds"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if appendix:
        lines += ["## Appendix: paired tests per seed", ""] + appendix + [""]
    if "wall_seconds" in results:
        lines += convergence_lines(results)

    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build <out>/REPORT.md and plots from <out>/results.csv.", allow_abbrev=False
    )
    parser.add_argument("--out", required=True, help="benchmark output folder (holds results.csv)")
    parser.add_argument("--k", type=int, default=K, help="cut-off of the per-user NDCG of the tests (default 10)")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    parser.add_argument("--tables", action="store_true",
                        help="print only each model's method table (the one docs/RESULTS.md shows), write nothing")
    args = parser.parse_args(argv)
    if args.tables:
        print(method_tables(args.out, k=args.k))
        return 0
    path = build_report(args.out, k=args.k, plots=not args.no_plots)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
