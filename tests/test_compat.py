"""The pinned dependency set works on the RecBole code paths this package uses."""

import numpy as np

from recbole_eisam.quick_start import build_dataset, load_config


def test_numpy2_aliases_used_by_recbole_metrics():
    # RecBole 1.2.1's NDCG/MAP/MRR still call np.float / np.bool
    assert np.float is np.float64 and np.bool is np.bool_


def test_item_file_with_missing_text_loads(tiny_data, tmp_path):
    data_path, name = tiny_data
    item_file = f"{data_path}/{name}/{name}.item"
    lines = open(item_file).read().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t\tDrama"  # item with an empty movie_title
    open(item_file, "w").write("\n".join(lines) + "\n")
    config = load_config(
        "SASRec", name,
        config_dict={"data_path": data_path, "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                           "item": ["item_id", "movie_title", "genre"]}},
    )
    dataset = build_dataset(config)
    titles = dataset.item_feat["movie_title"]
    empty_item = dataset.token2id("item_id", lines[3].split("\t")[0])
    assert int((titles[empty_item] != 0).sum()) == 0  # no tokens, no NaN crash
    assert int((titles[1] != 0).sum()) > 0


def test_anomaly_detection_is_off_after_model_lookup():
    import torch
    from recbole.utils import get_model

    get_model("SASRec")
    assert not torch.is_anomaly_enabled()


def test_ensure_dir_survives_a_folder_made_by_another_process(tmp_path, monkeypatch):
    """Two processes started together (``nproc=2``) both find ``./log`` missing; the one that
    calls ``makedirs`` second must not fail. Simulated: the folder exists, ``exists`` says no."""
    import importlib
    import os

    from recbole_eisam import compat

    folder = tmp_path / "log"
    folder.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # the check ran before the other process
    for name in compat._ENSURE_DIR_MODULES:
        module = importlib.import_module(name)
        module.ensure_dir(str(folder))  # RecBole's own ensure_dir raises FileExistsError here
        module.ensure_dir(str(folder / "SASRec"))
    assert (folder / "SASRec").is_dir()
