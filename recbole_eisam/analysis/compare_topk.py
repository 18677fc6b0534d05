"""Two runs (or two sets of seeds) compared user by user from their top-K files.

    python -m recbole_eisam.analysis.compare_topk \\
        --a=runs/a-seed1.tsv,runs/a-seed2.tsv --b=runs/b-seed1.tsv,runs/b-seed2.tsv \\
        --item_stats=<out>/item_stats/ml-100k-LLMRec.tsv

The i-th file of ``--a`` is paired with the i-th of ``--b`` (the same seed, so the same
test rows); the per-user NDCG@k differences are pooled over the pairs and tested with the
report's two-sided Wilcoxon signed-rank test, for all test users and, given the training
split's item statistics, for the users whose target is a tail item. It also prints each
side's mean NDCG@k by popularity decile of the target, as the report's decile table does.
Top-K files come from ``--save_topk`` or the benchmark's ``runs/`` folders.
"""

import argparse

import numpy as np
import pandas as pd

from recbole_eisam.analysis.report import _fmt, _fmt_p, decile_table_lines
from recbole_eisam.analysis.stats import K, wilcoxon_p
from recbole_eisam.analysis.topk import annotate_targets, paired_rows, read_item_stats, read_topk
from recbole_eisam.cli import main_guard


def _files(text, flag):
    files = [f.strip() for f in str(text or "").split(",") if f.strip()]
    if not files:
        raise ValueError(f"{flag} needs at least one top-K file (comma-separated).")
    return files


def compare(files_a, files_b, item_stats=None, k=K, bins=10):
    """Paired comparison of ``files_a[i]`` against ``files_b[i]``; returns a dict.

    Keys: ``pairs``, ``n_all``, ``mean_diff_all`` (a - b), ``p_all``, and with item
    statistics ``n_tail``, ``mean_diff_tail``, ``p_tail`` and ``deciles`` (``{"a": [...],
    "b": [...], "counts": [...]}``, mean NDCG@k per decile pooled over the pairs).
    """
    if len(files_a) != len(files_b):
        raise ValueError(
            f"--a has {len(files_a)} top-K file(s) and --b {len(files_b)}: give one of each per seed."
        )
    all_diff, tail_diff, frames_a, frames_b = [], [], [], []
    for path_a, path_b in zip(files_a, files_b):
        a, b = read_topk(path_a, k), read_topk(path_b, k)
        if item_stats is not None:
            a, b = annotate_targets(a, item_stats, bins), annotate_targets(b, item_stats, bins)
        merged = paired_rows(a, b)
        diff = (merged["ndcg_a"] - merged["ndcg_b"]).to_numpy()
        all_diff.append(diff)
        if item_stats is not None:
            tail_diff.append(diff[~merged["target_is_head_a"].to_numpy(dtype=bool)])
            frames_a.append(a)
            frames_b.append(b)
    pooled = np.concatenate(all_diff)
    result = {"pairs": len(files_a), "n_all": int(pooled.size), "mean_diff_all": float(pooled.mean()),
              "p_all": wilcoxon_p(pooled)[0]}
    if item_stats is not None:
        tail = np.concatenate(tail_diff)
        result.update({"n_tail": int(tail.size), "mean_diff_tail": float(tail.mean()) if tail.size else float("nan"),
                       "p_tail": wilcoxon_p(tail)[0]})
        deciles = {}
        for side, frames in (("a", frames_a), ("b", frames_b)):
            means = pd.concat(frames, ignore_index=True).groupby("target_decile")["ndcg"].mean()
            deciles[side] = [float(means.get(d, np.nan)) for d in range(1, bins + 1)]
        counts = frames_a[0]["target_decile"].value_counts()
        deciles["counts"] = [int(counts.get(d, 0)) for d in range(1, bins + 1)]
        result["deciles"] = deciles
    return result


def report_lines(result, k=K):
    lines = [
        f"pairs of top-K files: {result['pairs']}",
        f"all users: n={result['n_all']}, mean NDCG@{k} a - b = {_fmt(result['mean_diff_all'], 5)}, "
        f"Wilcoxon p = {_fmt_p(result['p_all'])}",
    ]
    if "p_tail" in result:
        lines.append(
            f"tail users: n={result['n_tail']}, mean NDCG@{k} a - b = {_fmt(result['mean_diff_tail'], 5)}, "
            f"Wilcoxon p = {_fmt_p(result['p_tail'])}"
        )
        deciles = result["deciles"]
        curve = {"methods": {side: deciles[side] for side in ("a", "b")}, "counts": deciles["counts"]}
        lines += [""] + decile_table_lines(curve, k)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Paired per-user comparison of two runs' top-K files (Wilcoxon, all and tail users).",
        allow_abbrev=False,
    )
    parser.add_argument("--a", required=True, help="top-K files of run a, comma-separated, one per seed")
    parser.add_argument("--b", required=True, help="top-K files of run b, in the same seed order")
    parser.add_argument("--item_stats", help="item-statistics TSV of the training split (for tail users and deciles)")
    parser.add_argument("--k", type=int, default=K, help="cut-off of the per-user NDCG (default 10)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}.")
    files_a, files_b = _files(args.a, "--a"), _files(args.b, "--b")
    item_stats = read_item_stats(args.item_stats) if args.item_stats else None
    print("\n".join(report_lines(compare(files_a, files_b, item_stats, args.k), args.k)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
