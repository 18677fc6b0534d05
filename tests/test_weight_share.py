"""Share of the training samples' weight per popularity decile, on a hand-made item-statistics file."""

import numpy as np
import pandas as pd
import pytest

from recbole_eisam.analysis import weight_share as ws
from recbole_eisam.cli import main_guard

N_ITEMS = 20  # 2 items per decile


@pytest.fixture
def stats_file(tmp_path):
    counts = np.array([90, 60, 40, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4, 3, 3, 2, 2, 1, 1, 0])
    frame = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
        "train_count": counts,
        "popularity_rank": np.arange(1, N_ITEMS + 1),
        "is_head": (np.arange(1, N_ITEMS + 1) <= 4).astype(int),
    })
    path = tmp_path / "items.tsv"
    frame.sample(frac=1.0, random_state=0).to_csv(path, sep="\t", index=False)  # row order must not matter
    return path, counts


def _expected(counts, w):
    mass = counts * w
    return [mass[2 * d:2 * d + 2].sum() / mass.sum() for d in range(10)]


def test_shares_match_a_hand_computation(stats_file):
    path, counts = stats_file
    specs = ["uniform", "power:alpha=0.5:c=2", "log", "reweight:beta=0.5"]
    result = ws.decile_shares(ws.read_item_stats(path), specs)
    n = counts.astype(float)
    hand = {
        "uniform": np.ones_like(n),
        "power:alpha=0.5:c=2": (n + 2) ** -0.5,
        "log": 1 / np.log(np.e + n),
        "reweight:beta=0.5": np.maximum(n, 1) ** -0.5,
    }
    for spec in specs:
        np.testing.assert_allclose(result["shares"][spec], _expected(n, hand[spec]), rtol=1e-6)
        assert sum(result["shares"][spec]) == pytest.approx(1.0)
    assert result["items"] == [2] * 10
    assert result["counts"][0] == (60, 90) and result["counts"][-1] == (0, 1)
    # rare-item weightings move weight from the first decile to the last ones
    assert result["shares"]["power:alpha=0.5:c=2"][0] < result["shares"]["uniform"][0]
    assert result["shares"]["power:alpha=0.5:c=2"][-1] > result["shares"]["uniform"][-1]


def test_table_has_a_row_per_decile(stats_file, capsys):
    path, counts = stats_file
    assert main_guard(ws.main, [f"--item_stats={path}", "--weight=uniform"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 10
    first = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert first == ["1", "2", "60-90", f"{150 / counts.sum():.3f}"]


@pytest.mark.parametrize("spec, words", [
    ("cubic", ["'cubic'", "power", "reweight"]),
    ("power:beta=1", ["'beta=1'", "alpha"]),
    ("power:alpha=x", ["alpha", "'x'"]),
    ("reweight", ["reweight needs beta"]),
    ("power:alpha=-1", ["eisam_alpha", ">= 0"]),
])
def test_bad_weighting_is_one_sentence(stats_file, capsys, spec, words):
    path, _ = stats_file
    assert main_guard(ws.main, [f"--item_stats={path}", f"--weight={spec}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for word in words:
        assert word in err
