"""train_windows_per_user: each user's latest training windows, with the full split's frequencies."""

import os
import subprocess
import sys

import numpy as np
import torch
from recbole.data import data_preparation

from recbole_eisam.quick_start import build_dataset, load_config, run
from recbole_eisam.utils.longtail import head_item_mask, item_counts
from recbole_eisam.utils.windows import prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _splits(config_dict, n):
    cfg = load_config("SASRec", "tiny", config_dict=dict(config_dict, train_windows_per_user=n))
    return prepare_data(cfg, build_dataset(cfg)), cfg


def _rows(dataset):
    feat = dataset.inter_feat
    users = feat[dataset.uid_field].tolist()
    lists = feat[dataset.item_id_list_field]
    lengths = feat[dataset.item_list_length_field].tolist()
    targets = feat[dataset.iid_field].tolist()
    return [(u, tuple(lists[i, : lengths[i]].tolist()), t) for i, (u, t) in enumerate(zip(users, targets))]


def test_keeps_each_users_latest_windows_and_the_full_counts(tiny_config_dict):
    (full, full_valid, _), cfg = _splits(tiny_config_dict, 0)
    (capped, capped_valid, _), _ = _splits(tiny_config_dict, 3)
    all_rows, kept = _rows(full.dataset), _rows(capped.dataset)
    by_user = {}
    for row in all_rows:
        by_user.setdefault(row[0], []).append(row)
    expected = [row for rows in by_user.values() for row in sorted(rows, key=lambda r: len(r[1]))[-3:]]
    # every user keeps exactly its 3 longest histories (its 3 latest targets), nothing else
    assert sorted(kept) == sorted(expected)
    assert len(kept) == 3 * len(by_user) < len(all_rows)
    # frequencies, the head and the tail still count every training interaction
    counts = item_counts(full.dataset)
    assert torch.equal(item_counts(capped.dataset), counts)
    assert torch.equal(head_item_mask(item_counts(capped.dataset), cfg["head_ratio"]),
                       head_item_mask(counts, cfg["head_ratio"]))
    # a plain count of the capped rows would differ: the cap really removed targets
    plain = torch.bincount(capped.dataset.inter_feat["item_id"], minlength=counts.numel())
    assert not torch.equal(plain, counts)
    # validation and test are untouched
    assert len(capped_valid.dataset) == len(full_valid.dataset)
    # 0 is RecBole's own preparation
    cfg0 = load_config("SASRec", "tiny", config_dict=dict(tiny_config_dict))
    plain_train, _, _ = data_preparation(cfg0, build_dataset(cfg0))
    assert sorted(_rows(plain_train.dataset)) == sorted(all_rows)


def test_a_capped_run_trains_on_fewer_windows(tiny_config_dict):
    config = dict(tiny_config_dict, epochs=1, train_windows_per_user=2)
    result = run("SASRec", "tiny", config_dict=config, saved=False)
    assert result["test_result"]["ndcg@10"] >= 0.0
    (capped, _, _), _ = _splits(tiny_config_dict, 2)
    assert capped.sample_size == 2 * len(np.unique(capped.dataset.inter_feat["user_id"].numpy()))


def test_bad_value_is_one_sentence(tiny_data):
    data_path, name = tiny_data
    cmd = [sys.executable, os.path.join(ROOT, "run_recbole_eisam.py"), "--model=SASRec", f"--dataset={name}",
           f"--data_path={data_path}", "--train_windows_per_user=2.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "train_windows_per_user must be an integer >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr
