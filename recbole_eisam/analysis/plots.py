"""The report's plots: head and tail NDCG@10 per method, and NDCG@10 by popularity decile."""

import math

import numpy as np

from recbole_eisam.analysis.stats import method_sort_key


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
