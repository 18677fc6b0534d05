"""Two runs (or two sets of seeds) compared user by user from their top-K files.

    python -m recbole_eisam.analysis.compare_topk \\
        --a=runs/a-seed1.tsv,runs/a-seed2.tsv --b=runs/b-seed1.tsv,runs/b-seed2.tsv \\
        --item_stats=<out>/item_stats/ml-100k-LLMRec.tsv

The i-th file of ``--a`` is paired with the i-th of ``--b`` (the same seed, so the same
test rows); the per-user NDCG@k differences are pooled over the pairs and tested with the
report's two-sided Wilcoxon signed-rank test, with the report's paired bootstrap 95%
interval (over the pairs of files and the users), for all test users and, given the
training split's item statistics, for the users whose target is a tail item (and their reciprocal rank, where the files hold
the full rank). It also prints each side's mean NDCG@k by popularity decile of the target,
as the report's decile table does. Top-K files come from ``--save_topk`` or the benchmark's
``runs/`` folders.

A pilot for sizing a grid: two runs that differ only in their seed (``--a=erm-seed1.tsv
--b=erm-seed2.tsv``) with ``--seeds=1,3,5,10`` print the minimum detectable difference at 80%
power for that many seeds, from the per-user seed-to-seed noise of the first pair.
"""

import argparse

import numpy as np
import pandas as pd

from recbole_eisam.analysis.report import _ci, _fmt_p, decile_table_lines, resolution_lines
from recbole_eisam.analysis.stats import K, _differences, _paired_frame, noise_between
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
    frames, frames_a, frames_b, first_pair = [], [], [], None
    for pair, (path_a, path_b) in enumerate(zip(files_a, files_b)):
        a, b = read_topk(path_a, k), read_topk(path_b, k)
        if item_stats is not None:
            a, b = annotate_targets(a, item_stats, bins), annotate_targets(b, item_stats, bins)
            frames_a.append(a)
            frames_b.append(b)
        frames.append(_paired_frame(paired_rows(a, b), seed=pair))
        first_pair = first_pair or (a, b)
    differences = _differences(pd.concat(frames, ignore_index=True))
    keys = ["n_all", "mean_diff_all", "p_all", "ci_all"]
    if item_stats is not None:
        keys += ["n_tail", "mean_diff_tail", "p_tail", "ci_tail", "mean_diff_tail_rr", "ci_tail_rr", "p_tail_rr"]
    result = {"pairs": len(files_a), **{key: differences[key] for key in keys}}
    if item_stats is not None:
        deciles = {}
        for side, side_frames in (("a", frames_a), ("b", frames_b)):
            means = pd.concat(side_frames, ignore_index=True).groupby("target_decile")["ndcg"].mean()
            deciles[side] = [float(means.get(d, np.nan)) for d in range(1, bins + 1)]
        counts = frames_a[0]["target_decile"].value_counts()
        deciles["counts"] = [int(counts.get(d, 0)) for d in range(1, bins + 1)]
        result["deciles"] = deciles
        result["noise"] = noise_between(*first_pair)
    return result


def report_lines(result, k=K, seeds=None):
    lines = [
        f"pairs of top-K files: {result['pairs']}",
        f"all users: n={result['n_all']}, mean NDCG@{k} a - b = {_ci(result['mean_diff_all'], result['ci_all'], 5)} "
        f"(95% CI over file pairs and users), Wilcoxon p = {_fmt_p(result['p_all'])}",
    ]
    if "p_tail" in result:
        lines.append(
            f"tail users: n={result['n_tail']}, mean NDCG@{k} a - b = "
            f"{_ci(result['mean_diff_tail'], result['ci_tail'], 5)}, Wilcoxon p = {_fmt_p(result['p_tail'])}"
        )
        if not np.isnan(result["mean_diff_tail_rr"]):
            lines.append(
                f"tail users: mean reciprocal rank a - b = {_ci(result['mean_diff_tail_rr'], result['ci_tail_rr'], 5)}, "
                f"Wilcoxon p = {_fmt_p(result['p_tail_rr'])}"
            )
        deciles = result["deciles"]
        curve = {"methods": {side: deciles[side] for side in ("a", "b")}, "counts": deciles["counts"]}
        lines += [""] + decile_table_lines(curve, k)
        if seeds:
            lines += [""] + resolution_lines(result["noise"], seeds, "the first pair, if a and b differ only in their seed")
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
    parser.add_argument("--seeds", default=None, help="seed counts to size a grid for, e.g. 1,3,5,10 (needs --item_stats)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}.")
    files_a, files_b = _files(args.a, "--a"), _files(args.b, "--b")
    item_stats = read_item_stats(args.item_stats) if args.item_stats else None
    seeds = sorted({int(n) for n in args.seeds.split(",") if n.strip()}) if args.seeds else None
    if seeds and (min(seeds) < 1 or item_stats is None):
        raise ValueError("--seeds needs positive seed counts and --item_stats (the tail users' noise).")
    print("\n".join(report_lines(compare(files_a, files_b, item_stats, args.k), args.k, seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
