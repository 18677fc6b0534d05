"""Where an item weighting puts the training loss, by item-popularity decile.

    python -m recbole_eisam.analysis.weight_share \\
        --item_stats=docs/results/cpu-llmrec-xeon/item_stats/ml-100k-LLMRec.tsv \\
        --weight=uniform --weight=power:alpha=0.5 --weight=reweight:beta=0.25

For each weighting ``w`` and each training-popularity decile ``d`` of the items (the
deciles of the report's decile curve), it prints the share of the training samples' total
weight that targets in ``d`` carry::

    share_d = sum_{i in d} n_i w_i / sum_i n_i w_i

with ``n_i`` the item's training count (the item-statistics file the benchmark writes,
training split only). With equal per-sample losses this is each decile's share of EISAM's
weighted loss ``L_w`` (so of the direction its perturbation follows) or of the re-weighted
loss; ``uniform`` gives the plain share of training samples (ERM, SAM). The weights are the
trainer's own (``recbole_eisam.trainer.weighting``), normalised to mean 1 over samples.

A weighting is ``family[:key=value[:key=value]]``: an EISAM family (power, log, focal,
tail, uniform) with its parameters ``alpha``, ``c``, ``gamma``, ``head_ratio``, or
``reweight:beta=B`` for the re-weighting baseline's ``n ** -B``.
"""

import argparse

import numpy as np
import torch

from recbole_eisam.analysis.topk import popularity_decile, read_item_stats
from recbole_eisam.cli import main_guard
from recbole_eisam.trainer.weighting import WEIGHT_FAMILIES, item_weights, reweight_weights

DEFAULT_WEIGHTS = ("uniform", "power:alpha=0.5", "log", "reweight:beta=0.25")
EISAM_PARAMS = ("alpha", "c", "gamma", "head_ratio")


def parse_weight(text):
    """``"power:alpha=0.5"`` -> ``("power", {"alpha": 0.5})``; a bad spec is a ValueError."""
    family, *pairs = str(text).split(":")
    allowed = {"reweight": ("beta",), **{name: EISAM_PARAMS for name in WEIGHT_FAMILIES}}
    if family not in allowed:
        raise ValueError(
            f"--weight={text}: the family must be one of {', '.join(allowed)}, got {family!r}."
        )
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed[family]:
            raise ValueError(
                f"--weight={text}: {pair!r} is not key=value with a key of {family} "
                f"({', '.join(allowed[family])})."
            )
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"--weight={text}: {key} must be a number, got {value!r}.") from None
    if family == "reweight" and "beta" not in params:
        raise ValueError(f"--weight={text}: reweight needs beta, e.g. reweight:beta=0.25.")
    return family, params


def sample_weights(counts, family, params):
    """Per-item weights of one weighting, normalised to mean 1 over training samples."""


    counts = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    if family == "reweight":
        return reweight_weights(counts, params["beta"]).double().numpy()
    return item_weights(counts, family, **params).double().numpy()


def decile_shares(item_stats, weights, bins=10):
    """``{"deciles": [...], "counts": (min, max) per decile, "items": [...], "shares": {spec: [...]}}``."""
    counts = item_stats["train_count"].to_numpy(dtype=np.float64)
    deciles = popularity_decile(item_stats, bins).loc[item_stats["item_id"]].to_numpy()
    result = {"deciles": list(range(1, bins + 1)), "counts": [], "items": [], "shares": {}}
    for d in result["deciles"]:
        members = counts[deciles == d]
        result["items"].append(int(members.size))
        result["counts"].append((int(members.min()), int(members.max())) if members.size else (0, 0))
    for spec in weights:
        family, params = parse_weight(spec)
        mass = counts * sample_weights(counts, family, params)
        result["shares"][spec] = [float(mass[deciles == d].sum() / mass.sum()) for d in result["deciles"]]
    return result


def table_lines(result):
    header = ["decile", "items", "training count"] + [f"`{spec}`" for spec in result["shares"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j, d in enumerate(result["deciles"]):
        low, high = result["counts"][j]
        cells = [str(d), str(result["items"][j]), f"{low}-{high}"]
        cells += [f"{shares[j]:.3f}" for shares in result["shares"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Share of the training samples' weight per item-popularity decile, per weighting.",
        allow_abbrev=False,
    )
    parser.add_argument("--item_stats", required=True, help="item-statistics TSV (<out>/item_stats/*.tsv)")
    parser.add_argument("--weight", action="append", help=f"a weighting, repeatable (default: {' '.join(DEFAULT_WEIGHTS)})")
    parser.add_argument("--bins", type=int, default=10, help="popularity groups (default 10: deciles)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = parser.parse_args(argv)
    if args.bins < 1:
        raise ValueError(f"--bins must be at least 1, got {args.bins}.")
    weights = args.weight or list(DEFAULT_WEIGHTS)
    for spec in weights:  # every spec checked before any file is read
        parse_weight(spec)
    result = decile_shares(read_item_stats(args.item_stats), weights, args.bins)
    print(f"Share of the training samples' weight per popularity decile (1 = most frequent items), {args.item_stats}:")
    print()
    print("\n".join(table_lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
