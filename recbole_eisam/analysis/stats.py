"""The numbers of the benchmark report: means over seeds, changes against ERM, paired tests
on per-user NDCG read from the runs' top-K files, and the NDCG@10 curve by popularity decile.

The definitions are stated in :mod:`recbole_eisam.analysis.report` (and at the top of every
REPORT.md).
"""

import math
import os

import numpy as np
import pandas as pd
from scipy import stats

from recbole_eisam.analysis.topk import annotate_targets, paired_rows, read_item_stats, read_topk
from recbole_eisam.methods import METHODS, names

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
LONGTAIL_BASELINES = names("baseline")
#: EISAM with one part changed (the grid's ablations)
ABLATIONS = names("ablation")
METHOD_ORDER = tuple(METHODS)
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
