"""End to end through quick_start.run and the CLI on a tiny dataset written by the test."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

from recbole_eisam.quick_start import load_config, run
from recbole_eisam.utils import head_item_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["Hit", "NDCG", "HeadHit", "TailHit", "HeadNDCG", "TailNDCG", "TailCoverage", "ItemCoverage", "GiniIndex",
           "AveragePopularity", "TailMRR", "HeadMRR"]


def test_sasrec_end_to_end_and_topk_file_recomputes_metrics(tiny_config_dict, tmp_path):
    topk_path = tmp_path / "topk.tsv"
    config = dict(tiny_config_dict, metrics=METRICS, topk=[10])
    result = run("SASRec", "tiny", config_dict=config, save_topk=str(topk_path),
                 result_file=str(tmp_path / "result.json"))
    test = result["test_result"]
    for name in ["hit@10", "ndcg@10", "headhit@10", "tailhit@10", "headndcg@10", "tailndcg@10",
                 "tailcoverage@10", "itemcoverage@10", "giniindex@10", "averagepopularity@10", "tailmrr", "headmrr"]:
        assert test[name] is not None and math.isfinite(test[name]), name
    assert json.loads((tmp_path / "result.json").read_text())["test_result"] == test
    curve = result["valid_curve"]  # every validation, and when it peaked
    assert [epoch for epoch, _ in curve] == list(range(result["epochs_trained"]))
    best = max(score for _, score in curve)
    assert result["best_epoch"] == max(epoch for epoch, score in curve if score == best)
    assert round(best, 4) == round(result["best_valid_score"], 4)

    # recompute Hit@10 and TailHit@10 from the TSV alone, with the head set of the training split
    with open(topk_path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 40  # one test row per user
    from recbole.data import data_preparation

    from recbole_eisam.quick_start import build_dataset
    from recbole_eisam.utils import item_counts

    cfg = load_config("SASRec", "tiny", config_dict=config)
    dataset = build_dataset(cfg)
    train, _, _ = data_preparation(cfg, dataset)
    head = head_item_mask(item_counts(train.dataset), cfg["head_ratio"])
    head_tokens = set(dataset.id2token("item_id", torch.nonzero(head).flatten().numpy()).tolist())
    hits = np.array([r["target_item_id"] in r["topk_item_ids"].split()[:10] for r in rows])
    is_tail = np.array([r["target_item_id"] not in head_tokens for r in rows])
    assert all(len(r["topk_item_ids"].split()) == 10 for r in rows)
    assert round(hits.mean(), 4) == test["hit@10"]
    assert round(hits[is_tail].mean(), 4) == test["tailhit@10"]
    # the full rank: the list position where the target is listed, beyond the list elsewhere,
    # and the full-rank metrics are its means
    ranks = np.array([float(r["target_rank"]) for r in rows])
    for r, rank in zip(rows, ranks):
        listed = r["topk_item_ids"].split()
        if r["target_item_id"] in listed:
            assert rank == listed.index(r["target_item_id"]) + 1
        else:
            assert rank > 10
    assert round((1 / ranks[is_tail]).mean(), 4) == test["tailmrr"]
    assert round((1 / ranks[~is_tail]).mean(), 4) == test["headmrr"]


def test_cli_runs_with_overrides_and_config_files(tiny_data, tmp_path):
    data_path, name = tiny_data
    extra = tmp_path / "extra.yaml"
    extra.write_text("epochs: 1\nhidden_size: 8\ninner_size: 16\n")
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(ROOT, "run_recbole_eisam.py"), "--model=GRU4Rec", f"--dataset={name}",
           f"--data_path={data_path}", f"--config_files={extra}", "--embedding_size=8", "--show_progress=False",
           f"--checkpoint_dir={tmp_path / 'saved'}", "--metrics=['Hit','NDCG','TailNDCG']", "--topk=[5]",
           "--valid_metric=NDCG@5", f"--result_file={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["test_result"]) == {"hit@5", "ndcg@5", "tailndcg@5"}


def test_missing_dataset_is_one_sentence_and_nonzero_exit(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "run_recbole_eisam.py"), "--model=SASRec", "--dataset=ml-1m",
           f"--data_path={tmp_path / 'nowhere'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]  # the config dump and download log are held back
    last = lines[0]
    assert last.startswith("error: Dataset 'ml-1m' was not found")
    assert str(tmp_path / "nowhere" / "ml-1m") in last
    assert "downloads known datasets there itself when the machine is online" in last
