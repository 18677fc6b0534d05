"""Benchmark report: ``<out>/results.csv`` -> ``<out>/REPORT.md`` and PNG plots.

    python -m recbole_eisam.analysis.report --out=DIR

What the report computes (stated again at the top of REPORT.md):

* **mean +- std over seeds** of each test metric, ``std`` the *sample* standard deviation
  (``ddof=1``; empty with a single seed);
* **relative change vs ERM**: ``(mean_method - mean_ERM) / mean_ERM`` of the same model and
  dataset, from the means over seeds;
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

import numpy as np
import pandas as pd
from scipy import stats

from recbole_eisam.analysis.topk import annotate_targets, paired_rows, read_item_stats, read_topk

#: (results.csv column suffix, header in the tables)
METRICS = (
    ("ndcg@10", "NDCG@10"),
    ("hit@10", "Hit@10"),
    ("headndcg@10", "HeadNDCG@10"),
    ("tailndcg@10", "TailNDCG@10"),
    ("tailhit@10", "TailHit@10"),
    ("tailcoverage@10", "TailCov@10"),
    ("giniindex@10", "Gini@10"),
)
BASELINE = "erm"
DDOF = 1
K = 10
#: the methods the paper's bar compares EISAM with
LONGTAIL_BASELINES = ("sam", "imbsam", "reweight", "logit_adjust", "logit_adjust_posthoc")
#: EISAM on another base loss (methods of their own, beside eisam)
EISAM_VARIANTS = ("eisam_la", "eisam_rw")
#: EISAM with one part changed (the grid's ablations)
ABLATIONS = ("eisam_head", "eisam_noweight", "reweight_only")
METHOD_ORDER = ("erm",) + LONGTAIL_BASELINES + ("eisam",) + EISAM_VARIANTS + ABLATIONS
WILCOXON_ARGS = {"zero_method": "wilcox", "alternative": "two-sided"}


# --------------------------------------------------------------------------- numbers
def load_results(out):
    path = os.path.join(out, "results.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No results file '{path}': run the benchmark into --out first.")
    frame = pd.read_csv(path, dtype={"seed": int, "dataset": str, "model": str, "method": str})
    for column in ("dataset", "model", "method", "seed"):
        if column not in frame.columns:
            raise ValueError(f"'{path}' lacks the column '{column}'.")
    return frame


def method_sort_key(method):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def relative_change(value, reference):
    """``(value - reference) / reference``; nan when either is missing or the reference is 0."""
    if value is None or reference is None:
        return float("nan")
    value, reference = float(value), float(reference)
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return float("nan")
    return (value - reference) / reference


def summarize(results, metrics=METRICS):
    """Mean, std (ddof=1) and relative change vs ERM per (dataset, model, method).

    Returns a DataFrame indexed by (dataset, model, method) with ``n_seeds``, ``seeds`` and
    for every metric ``<m>_mean``, ``<m>_std`` and ``<m>_rel`` (nan where no ERM row exists).
    """
    rows = []
    for (dataset, model, method), group in results.groupby(["dataset", "model", "method"], sort=False):
        row = {
            "dataset": dataset,
            "model": model,
            "method": method,
            "n_seeds": int(group["seed"].nunique()),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].unique())),
        }
        for key, _ in metrics:
            column = f"test_{key}"
            values = pd.to_numeric(group[column], errors="coerce") if column in group else pd.Series(dtype=float)
            values = values.dropna().to_numpy(dtype=np.float64)
            row[f"{key}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{key}_std"] = float(values.std(ddof=DDOF)) if len(values) > DDOF else float("nan")
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    summary = summary.set_index(["dataset", "model", "method"])
    for key, _ in metrics:
        rel = []
        for dataset, model, method in summary.index:
            ref = summary[f"{key}_mean"].get((dataset, model, BASELINE), float("nan"))
            rel.append(relative_change(summary.loc[(dataset, model, method), f"{key}_mean"], ref))
        summary[f"{key}_rel"] = rel
    return summary


def wilcoxon_p(differences):
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when all are zero.

    Returns ``(p, n_nonzero)``; zero differences are dropped (``zero_method="wilcox"``).
    """
    diff = np.asarray(differences, dtype=np.float64)
    diff = diff[~np.isnan(diff)]
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        return 1.0, 0
    return float(stats.wilcoxon(diff, **WILCOXON_ARGS).pvalue), nonzero


def _resolve(out, path):
    if not isinstance(path, str) or not path:
        return None
    return path if os.path.isabs(path) else os.path.join(out, path)


class _Cache:
    """Top-K frames and item statistics read once per report."""

    def __init__(self, out, k):
        self.out, self.k = out, k
        self._topk, self._stats = {}, {}

    def stats(self, path):
        path = _resolve(self.out, path)
        if path is None or not os.path.isfile(path):
            return None
        if path not in self._stats:
            self._stats[path] = read_item_stats(path)
        return self._stats[path]

    def topk(self, row):
        path = _resolve(self.out, row.get("topk_file"))
        if path is None or not os.path.isfile(path):
            return None
        if path not in self._topk:
            frame = read_topk(path, self.k)
            item_stats = self.stats(row.get("item_stats_file"))
            if item_stats is not None:
                frame = annotate_targets(frame, item_stats)
            self._topk[path] = frame
        return self._topk[path]


def paired_tests(results, out, k=K, cache=None, reference=BASELINE):
    """Wilcoxon p-values of every other method vs ``reference`` (ERM unless told) of the
    same model and seed.

    Returns a DataFrame indexed by (dataset, model, method) with ``p_all``, ``p_tail``
    (users x seeds pooled), ``n_all``, ``n_tail`` (pooled pairs), ``nonzero_all``,
    ``nonzero_tail``, ``mean_diff_all``, ``mean_diff_tail`` (method - reference, per-user
    NDCG@k) and ``per_seed`` (``{seed: (p_all, p_tail)}``). Seeds whose top-K files are
    missing, or that the reference did not run, are skipped; a method with no usable seed
    gets nan.
    """
    cache = cache or _Cache(out, k)
    rows = []
    for (dataset, model), group in results.groupby(["dataset", "model"], sort=False):
        ref = {int(r["seed"]): r for _, r in group[group["method"] == reference].iterrows()}
        for method, sub in group.groupby("method", sort=False):
            if method == reference:
                continue
            all_diff, tail_diff, per_seed = [], [], {}
            for _, row in sub.sort_values("seed").iterrows():
                seed = int(row["seed"])
                if seed not in ref:
                    continue
                mine, base = cache.topk(row), cache.topk(ref[seed])
                if mine is None or base is None:
                    continue
                merged = paired_rows(mine, base)
                diff = (merged["ndcg_a"] - merged["ndcg_b"]).to_numpy()
                all_diff.append(diff)
                p_tail = float("nan")
                if "target_is_head_a" in merged:  # head / tail known from the item statistics
                    tail = diff[~merged["target_is_head_a"].to_numpy(dtype=bool)]
                    tail_diff.append(tail)
                    p_tail = wilcoxon_p(tail)[0]
                per_seed[seed] = (wilcoxon_p(diff)[0], p_tail)
            entry = {"dataset": dataset, "model": model, "method": method, "per_seed": per_seed}
            for name, diffs in (("all", all_diff), ("tail", tail_diff)):
                if diffs:
                    pooled = np.concatenate(diffs)
                    p, nonzero = wilcoxon_p(pooled)
                    entry.update({
                        f"p_{name}": p,
                        f"n_{name}": len(pooled),
                        f"nonzero_{name}": nonzero,
                        f"mean_diff_{name}": float(pooled.mean()) if len(pooled) else float("nan"),
                    })
                else:
                    entry.update({f"p_{name}": float("nan"), f"n_{name}": 0,
                                  f"nonzero_{name}": 0, f"mean_diff_{name}": float("nan")})
            rows.append(entry)
    if not rows:
        return pd.DataFrame(columns=["dataset", "model", "method"]).set_index(["dataset", "model", "method"])
    return pd.DataFrame(rows).set_index(["dataset", "model", "method"])


def decile_curves(results, out, k=K, cache=None, bins=10):
    """Per (dataset, model, method): mean per-user NDCG@k by target decile, pooled over seeds.

    Returns ``{(dataset, model): {"methods": {method: [10 values]}, "counts": [10 ints]}}``
    (counts: test rows per decile in one seed of ERM, or of the first method found).
    """
    cache = cache or _Cache(out, k)
    curves = {}
    for (dataset, model), group in results.groupby(["dataset", "model"], sort=False):
        entry = {"methods": {}, "counts": None}
        for method, sub in group.groupby("method", sort=False):
            frames = [cache.topk(row) for _, row in sub.iterrows()]
            frames = [f for f in frames if f is not None and "target_decile" in f]
            if not frames:
                continue
            pooled = pd.concat(frames, ignore_index=True)
            means = pooled.groupby("target_decile")["ndcg"].mean()
            entry["methods"][method] = [float(means.get(d, np.nan)) for d in range(1, bins + 1)]
            if entry["counts"] is None or method == BASELINE:
                counts = frames[0]["target_decile"].value_counts()
                entry["counts"] = [int(counts.get(d, 0)) for d in range(1, bins + 1)]
        if entry["methods"]:
            curves[(dataset, model)] = entry
    return curves


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
    from recbole_eisam.benchmark import METHODS

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


def model_table(summary, tests, dataset, model, metrics=METRICS):
    """Markdown table of one model: metrics (mean ± std (Δ vs ERM)), p-values, seeds."""
    part = summary.xs((dataset, model), level=("dataset", "model"))
    methods = sorted(part.index, key=method_sort_key)
    header = ["method"] + [name for _, name in metrics] + ["p (all)", "p (tail)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = part.loc[method]
        cells = [f"**{method}**" if method == "eisam" else method]
        cells += [_cell(row, key, method != BASELINE) for key, _ in metrics]
        if method != BASELINE and (dataset, model, method) in tests.index:
            test = tests.loc[(dataset, model, method)]
            cells += [_fmt_p(test["p_all"]), _fmt_p(test["p_tail"])]
        else:
            cells += ["", ""]
        cells.append(str(row["n_seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_lines(summary, dataset, model):
    """The paper's bar translated (docs: issue 5), as sentences; empty without ERM and EISAM."""
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
    """EISAM against each long-tail baseline, then each ablation, on the same users and
    seeds, as a table.

    ``against_eisam`` is :func:`paired_tests` with ``reference="eisam"``: its differences are
    baseline - EISAM, shown here as EISAM - baseline (positive: EISAM ahead). Empty when no
    baseline or ablation has a seed in common with EISAM.
    """
    lines = []
    for method in LONGTAIL_BASELINES + ABLATIONS:
        key = (dataset, model, method)
        if key not in against_eisam.index or not against_eisam.loc[key, "per_seed"]:
            continue
        test = against_eisam.loc[key]
        lines.append(
            f"| {method}{' (ablation)' if method in ABLATIONS else ''} | "
            f"{_fmt(0.0 - test['mean_diff_all'], 5)} | {_fmt_p(test['p_all'])} | "
            f"{_fmt(0.0 - test['mean_diff_tail'], 5)} | {_fmt_p(test['p_tail'])} | "
            f"{', '.join(str(s) for s in sorted(test['per_seed']))} |"
        )
    if not lines:
        return []
    return [
        "EISAM against each long-tail baseline and ablation, paired on the same users and seed "
        f"(per-user NDCG@{k}, EISAM - other method, pooled over the seeds both ran; Wilcoxon as "
        "above):",
        "",
        f"| method | Δ NDCG@{k} (all) | p (all) | Δ NDCG@{k} (tail users) | p (tail) | seeds |",
        "|---|---|---|---|---|---|",
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_head_tail(summary, dataset, model, path):
    plt = _plt()
    part = summary.xs((dataset, model), level=("dataset", "model"))
    methods = sorted(part.index, key=method_sort_key)
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(methods) + 2), 3.6))
    for offset, key, label in ((-0.2, "headndcg@10", "head targets"), (0.2, "tailndcg@10", "tail targets")):
        means = [part.loc[m, f"{key}_mean"] for m in methods]
        stds = [0.0 if math.isnan(part.loc[m, f"{key}_std"]) else part.loc[m, f"{key}_std"] for m in methods]
        ax.bar(x + offset, means, width=0.4, yerr=stds, capsize=3, label=label)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{model} on {dataset}: head vs tail targets\n(mean ± std over seeds)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_deciles(curve, dataset, model, path):
    plt = _plt()
    bins = len(curve["counts"])
    x = np.arange(1, bins + 1)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for method in sorted(curve["methods"], key=method_sort_key):
        style = {"linewidth": 2.5} if method == "eisam" else {"linewidth": 1.2}
        ax.plot(x, curve["methods"][method], marker="o", label=method, **style)
    ax.set_xticks(x, [f"{d}\n(n={c})" for d, c in zip(x, curve["counts"])], fontsize=8)
    ax.set_xlabel("training-popularity decile of the target item (1 = most frequent); n = test users per seed", fontsize=9)
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{model} on {dataset}: NDCG@10 by target popularity decile", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report
def _slug(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


def build_report(out, k=K, plots=True):
    """Write ``<out>/REPORT.md`` (and ``<out>/plots/*.png``); returns the report's path."""
    results = load_results(out)
    cache = _Cache(out, k)
    summary = summarize(results)
    tests = paired_tests(results, out, k, cache)
    against_eisam = paired_tests(results, out, k, cache, reference="eisam")
    curves = decile_curves(results, out, k, cache)
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
        "parentheses the relative change of the mean vs ERM of the same model;",
        "- Gini@10 is the Gini index of the recommended items (lower = more even exposure); "
        "TailCov@10 the share of tail items recommended at least once;",
        f"- p (all) / p (tail): two-sided Wilcoxon signed-rank test on per-user NDCG@{k} vs ERM "
        "of the same model and seed, pairs pooled over seeds (users × seeds), zero differences "
        "dropped; 'tail' = test users whose target is a tail item of the training split. "
        "Per-seed p-values are in the appendix. Pooling counts each user once per seed, so "
        "pairs are not fully independent: read the p-values as indicative;",
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
        lines += [f"## {model} on {dataset}", "", model_table(summary, tests, dataset, model), ""]
        bars = bar_lines(summary, dataset, model)
        if bars:
            lines += ["Against the bar of issue 5:", ""] + bars + [""]
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
        lines += ["## Wall time", "", "| model | method | mean s / run | runs |", "|---|---|---|---|"]
        for (model, method), sub in results.groupby(["model", "method"], sort=False):
            secs = pd.to_numeric(sub["wall_seconds"], errors="coerce")
            lines.append(f"| {model} | {method} | {_fmt(secs.mean(), 1)} | {len(sub)} |")
        lines.append("")

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
    args = parser.parse_args(argv)
    path = build_report(args.out, k=args.k, plots=not args.no_plots)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    from recbole_eisam.cli import main_guard

    raise SystemExit(main_guard(main))
