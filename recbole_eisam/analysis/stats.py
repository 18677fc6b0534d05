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
    ("tailmrr", "TailMRR"),
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
#: bootstrap resamples of the confidence intervals, and their level
BOOTSTRAP, LEVEL = 2000, 0.95


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
    for every metric ``<m>_mean``, ``<m>_std`` and ``<m>_rel``, the change against ERM over
    the seeds both ran (nan where ERM shares no seed).
    """
    erm_rows = results[results["method"] == BASELINE]
    rows = []
    for (dataset, model, method), group in results.groupby(["dataset", "model", "method"], sort=False):
        erm = erm_rows[(erm_rows["dataset"] == dataset) & (erm_rows["model"] == model)]
        shared = set(group["seed"]) & set(erm["seed"])
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
            # against ERM on the seeds both ran, so a method with fewer seeds meets ERM on its own
            row[f"{key}_rel"] = (
                relative_change(_mean_on_seeds(group, column, shared), _mean_on_seeds(erm, column, shared))
                if shared and column in group else float("nan")
            )
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    return summary.set_index(["dataset", "model", "method"])


def _mean_on_seeds(rows, column, seeds):
    """Mean of ``column`` over the rows of the given seeds."""
    return pd.to_numeric(rows[rows["seed"].isin(seeds)][column], errors="coerce").mean()


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


def _resample_means(v, count, rng):
    """Means of ``count`` resamples (with replacement) of ``v``, in blocks that bound memory."""
    n, out = len(v), np.empty(count)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        out[start : start + size] = v[rng.integers(0, n, size=(size, n))].mean(axis=1)
    return out


def bootstrap_ci(values, n_boot=BOOTSTRAP, level=LEVEL, seed=0):
    """Percentile bootstrap interval of the mean of ``values`` (its entries resampled with
    replacement, ``n_boot`` times, from a fixed seed); ``(nan, nan)`` without values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    means = _resample_means(v, n_boot, np.random.default_rng(seed))
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def seeds_and_users_ci(groups, n_boot=BOOTSTRAP, level=LEVEL, seed=0):
    """Two-level bootstrap interval of a mean over seeds and users: each resample draws the
    seeds with replacement, then the users within every drawn seed, so the interval holds
    the run-to-run variation of training as well as the choice of users. ``groups``: one
    array of per-user values per seed. With one seed it is :func:`bootstrap_ci`."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    groups = [g[~np.isnan(g)] for g in groups if len(g)]
    if len(groups) <= 1:
        return bootstrap_ci(groups[0] if groups else [], n_boot, level, seed)
    rng = np.random.default_rng(seed)
    slots = len(groups)
    # for every seed, an independent user resample for every (replicate, slot)
    means = np.stack([_resample_means(g, n_boot * slots, rng).reshape(n_boot, slots) for g in groups])
    pick = rng.integers(0, slots, size=(n_boot, slots))  # which seed fills each slot
    replicates = means[pick, np.arange(n_boot)[:, None], np.arange(slots)[None, :]].mean(axis=1)
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def minimum_detectable_difference(sd, n, alpha=0.05, power=0.8):
    """The smallest true mean difference a two-sided test at ``alpha`` finds with probability
    ``power``, for ``n`` independent units whose differences have standard deviation ``sd``
    (normal approximation: ``(z_{1-alpha/2} + z_power) * sd / sqrt(n)``)."""
    if n <= 0 or not np.isfinite(sd):
        return float("nan")
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / math.sqrt(n))


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
    """Every other method against ``reference`` (ERM unless told), same model and seed.

    Per method: the Wilcoxon p-values on per-user NDCG@k, users x seeds pooled (``p_all``,
    ``p_tail``, ``n_*``, ``nonzero_*``), the mean differences (method - reference,
    ``mean_diff_all`` / ``mean_diff_tail``), and their paired bootstrap 95% intervals over
    *users* (``ci_all``, ``ci_tail``: each user's difference averaged over the seeds both
    ran, users resampled; ``users_all``, ``users_tail``). Where the top-K files hold the full
    rank, the same for the tail users' reciprocal rank (``mean_diff_tail_rr``,
    ``ci_tail_rr``, ``p_tail_rr``). ``per_seed``: ``{seed: (p_all, p_tail)}``. Seeds whose
    top-K files are missing, or that the reference did not run, are skipped; a method with
    no usable seed gets nan.
    """
    cache = cache or _Cache(out, k)
    rows = []
    for (dataset, model), group in results.groupby(["dataset", "model"], sort=False):
        ref = {int(r["seed"]): r for _, r in group[group["method"] == reference].iterrows()}
        for method, sub in group.groupby("method", sort=False):
            if method == reference:
                continue
            frames, per_seed = [], {}
            for _, row in sub.sort_values("seed").iterrows():
                seed = int(row["seed"])
                mine = cache.topk(row) if seed in ref else None
                base = cache.topk(ref[seed]) if mine is not None else None
                if base is None:
                    continue
                frame = _paired_frame(paired_rows(mine, base), seed)
                frames.append(frame)
                tail = frame[frame["tail"]]
                p_tail = wilcoxon_p(tail["ndcg"])[0] if frame["tail_known"].all() else float("nan")
                per_seed[seed] = (wilcoxon_p(frame["ndcg"])[0], p_tail)
            entry = {"dataset": dataset, "model": model, "method": method, "per_seed": per_seed}
            entry.update(_differences(pd.concat(frames, ignore_index=True) if frames else None))
            rows.append(entry)
    if not rows:
        return pd.DataFrame(columns=["dataset", "model", "method"]).set_index(["dataset", "model", "method"])
    return pd.DataFrame(rows).set_index(["dataset", "model", "method"])


def _paired_frame(merged, seed=0):
    """Per row of two paired top-K frames of one seed: the user, NDCG@k and reciprocal-rank
    differences (a - b), and whether the target is a tail item."""
    frame = pd.DataFrame({"user": merged["user_id"].to_numpy(), "ndcg": (merged["ndcg_a"] - merged["ndcg_b"]).to_numpy(),
                          "seed": seed})
    frame["rr"] = (merged["rr_a"] - merged["rr_b"]).to_numpy() if "rr_a" in merged else np.nan
    frame["tail_known"] = "target_is_head_a" in merged
    frame["tail"] = ~merged["target_is_head_a"].to_numpy(dtype=bool) if "target_is_head_a" in merged else False
    return frame


def _interval(part, column):
    """The 95% interval of the mean of ``column``: seeds and users resampled (one group per seed)."""
    return seeds_and_users_ci([group[column].to_numpy() for _, group in part.groupby("seed", sort=True)])


def _differences(pooled):
    """Wilcoxon (users x seeds pooled) and bootstrap intervals (over seeds and users) of paired differences."""
    out = {}
    known = pooled is not None and bool(pooled["tail_known"].all())
    for name, part in (("all", pooled), ("tail", pooled[pooled["tail"]] if known else None)):
        if part is None or part.empty:
            out.update({f"p_{name}": float("nan"), f"n_{name}": 0, f"nonzero_{name}": 0,
                        f"mean_diff_{name}": float("nan"), f"ci_{name}": (float("nan"), float("nan")),
                        f"users_{name}": 0})
            continue
        p, nonzero = wilcoxon_p(part["ndcg"])
        out.update({f"p_{name}": p, f"n_{name}": len(part), f"nonzero_{name}": nonzero,
                    f"mean_diff_{name}": float(part["ndcg"].mean()), f"ci_{name}": _interval(part, "ndcg"),
                    f"users_{name}": part["user"].nunique()})
    tail = pooled[pooled["tail"]] if known else None
    if tail is not None and not tail.empty and tail["rr"].notna().all():
        out.update({"mean_diff_tail_rr": float(tail["rr"].mean()), "p_tail_rr": wilcoxon_p(tail["rr"])[0],
                    "ci_tail_rr": _interval(tail, "rr")})
    else:
        out.update({"mean_diff_tail_rr": float("nan"), "p_tail_rr": float("nan"),
                    "ci_tail_rr": (float("nan"), float("nan"))})
    return out


def noise_between(fa, fb):
    """Seed noise from two runs that differ only in their seed (two top-K frames, annotated
    with the item statistics): the number of users, the per-user SD of their NDCG@k
    differences (all and tail users) and of the tail's reciprocal-rank differences, and run
    ``fa``'s means of the same measures."""
    frame = _paired_frame(paired_rows(fa, fb))
    tail = frame[frame["tail"]]
    entry = {"users": {"all": len(frame), "tail": len(tail)}, "sd": {}, "mean": {}}
    entry["sd"]["ndcg_all"] = float(frame["ndcg"].std(ddof=1))
    entry["sd"]["ndcg_tail"] = float(tail["ndcg"].std(ddof=1)) if len(tail) > 1 else float("nan")
    entry["sd"]["rr_tail"] = float(tail["rr"].std(ddof=1)) if len(tail) > 1 else float("nan")
    entry["mean"]["ndcg_all"] = float(fa["ndcg"].mean())
    tail_a = fa[~fa["target_is_head"].to_numpy(dtype=bool)] if "target_is_head" in fa else fa.iloc[:0]
    entry["mean"]["ndcg_tail"] = float(tail_a["ndcg"].mean()) if len(tail_a) else float("nan")
    entry["mean"]["rr_tail"] = float(tail_a["rr"].mean()) if len(tail_a) and "rr" in tail_a else float("nan")
    return entry


def seed_noise(results, out, k=K, cache=None, reference=BASELINE):
    """What the grid can resolve, from two seeds of ``reference`` (ERM): per (dataset, model),
    the standard deviation of the per-user differences between its first two seeds (pure
    seed-to-seed noise) for NDCG@k (all and tail users) and the tail's reciprocal rank, and
    the number of users. ``{(dataset, model): {"seeds": (a, b), "users": {...}, "sd": {...},
    "mean": {...}}}``; models with fewer than two reference seeds are left out."""
    cache = cache or _Cache(out, k)
    noise = {}
    for (dataset, model), group in results.groupby(["dataset", "model"], sort=False):
        ref = group[group["method"] == reference].sort_values("seed")
        frames = [(int(r["seed"]), cache.topk(r)) for _, r in ref.iterrows()]
        frames = [(s, f) for s, f in frames if f is not None]
        if len(frames) < 2:
            continue
        (a, fa), (b, fb) = frames[:2]
        entry = dict(noise_between(fa, fb), seeds=(a, b))
        noise[(dataset, model)] = entry
    return noise


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
