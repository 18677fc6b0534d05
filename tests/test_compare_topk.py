"""Paired comparison of two runs' top-K files, checked against an independent computation."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from recbole_eisam.analysis import compare_topk as ct
from recbole_eisam.cli import main_guard

N_ITEMS, N_USERS, HEAD = 20, 60, 4


def _write(tmp_path, rng):
    stats_path = tmp_path / "items.tsv"
    pd.DataFrame({
        "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
        "train_count": np.arange(N_ITEMS, 0, -1) * 2,
        "popularity_rank": np.arange(1, N_ITEMS + 1),
        "is_head": (np.arange(1, N_ITEMS + 1) <= HEAD).astype(int),
    }).to_csv(stats_path, sep="\t", index=False)
    targets = [f"i{i}" for i in rng.integers(1, N_ITEMS + 1, N_USERS)]
    files = {}
    for run in ("a", "b"):
        for seed in (1, 2):
            rows = [(f"u{u}", t, " ".join(f"i{i}" for i in rng.permutation(N_ITEMS)[:10] + 1))
                    for u, t in enumerate(targets)]
            path = tmp_path / f"{run}-{seed}.tsv"
            pd.DataFrame(rows, columns=["user_id", "target_item_id", "topk_item_ids"]).to_csv(path, sep="\t", index=False)
            files[(run, seed)] = str(path)
    return stats_path, files, np.array([int(t[1:]) for t in targets])


def _ndcg(path):
    frame = pd.read_csv(path, sep="\t", dtype=str)
    return np.array([1 / math.log2(items.split().index(t) + 2) if t in items.split() else 0.0
                     for t, items in zip(frame["target_item_id"], frame["topk_item_ids"])])


def test_paired_differences_and_p_values(tmp_path):
    stats_path, files, targets = _write(tmp_path, np.random.default_rng(3))
    result = ct.compare([files[("a", 1)], files[("a", 2)]], [files[("b", 1)], files[("b", 2)]],
                        ct.read_item_stats(stats_path))
    diff = np.concatenate([_ndcg(files[("a", s)]) - _ndcg(files[("b", s)]) for s in (1, 2)])
    tail = np.tile(targets > HEAD, 2)
    assert result["n_all"] == 2 * N_USERS and result["n_tail"] == int(tail.sum())
    assert result["mean_diff_all"] == pytest.approx(diff.mean())
    assert result["mean_diff_tail"] == pytest.approx(diff[tail].mean())
    assert result["p_all"] == pytest.approx(stats.wilcoxon(diff[diff != 0]).pvalue)
    assert result["p_tail"] == pytest.approx(stats.wilcoxon(diff[tail][diff[tail] != 0]).pvalue)
    # 20 items -> 2 per decile; decile of item i = ceil(i / 2)
    deciles = np.tile((targets + 1) // 2, 2)
    ndcg_a = np.concatenate([_ndcg(files[("a", s)]) for s in (1, 2)])
    for d in range(1, 11):
        expected = ndcg_a[deciles == d].mean() if (deciles == d).any() else np.nan
        np.testing.assert_allclose(result["deciles"]["a"][d - 1], expected)
    assert sum(result["deciles"]["counts"]) == N_USERS


def test_a_run_against_itself_and_without_item_stats(tmp_path, capsys):
    _, files, _ = _write(tmp_path, np.random.default_rng(4))
    same = ct.compare([files[("a", 1)]], [files[("a", 1)]])
    assert same["p_all"] == 1.0 and same["mean_diff_all"] == 0.0 and "p_tail" not in same
    assert main_guard(ct.main, [f"--a={files[('a', 1)]}", f"--b={files[('b', 1)]}"]) == 0
    out = capsys.readouterr().out
    assert "all users: n=60" in out and "tail users" not in out


@pytest.mark.parametrize("args, words", [
    (["--a=A1,A2", "--b=B1"], ["--a has 2", "--b 1"]),
    (["--a=", "--b=B1"], ["--a needs at least one"]),
    (["--a=nope.tsv", "--b=nope.tsv"], ["nope.tsv"]),
])
def test_bad_input_is_one_sentence(tmp_path, capsys, args, words):
    assert main_guard(ct.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for word in words:
        assert word in err


def test_pilot_prints_the_minimum_detectable_difference(tmp_path, capsys):
    """Two seeds of one method: their per-user differences are the noise a grid must beat."""
    stats_path, files, _ = _write(tmp_path, np.random.default_rng(5))
    argv = [f"--a={files[('a', 1)]}", f"--b={files[('a', 2)]}", f"--item_stats={stats_path}", "--seeds=1,4"]
    assert main_guard(ct.main, argv) == 0
    out = capsys.readouterr().out
    assert "Resolution, from the first pair" in out
    diff = _ndcg(files[("a", 1)]) - _ndcg(files[("a", 2)])
    row = next(line for line in out.splitlines() if line.startswith("| NDCG@10, all users |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert float(cells[4]) == pytest.approx(z * diff.std(ddof=1) / np.sqrt(4 * len(diff)), abs=5e-5)  # S = 4
    assert main_guard(ct.main, argv[:2] + ["--seeds=3"]) == 2  # needs the item statistics
