"""The pinned dependency set works on the RecBole code paths this package uses."""

import os

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

    from recbole_eisam import patches

    folder = tmp_path / "log"
    folder.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # the check ran before the other process
    for name in patches._ENSURE_DIR_MODULES:
        module = importlib.import_module(name)
        module.ensure_dir(str(folder))  # RecBole's own ensure_dir raises FileExistsError here
        module.ensure_dir(str(folder / "SASRec"))
    assert (folder / "SASRec").is_dir()


def test_plain_recbole_config_gets_the_documented_defaults(tiny_data):
    """RecBole's own Config, without any of this package's files, reads LLMRec's and the
    trainer family's defaults from properties/ (the one place they are written)."""
    from recbole.config import Config

    from recbole_eisam.defaults import PROPERTIES_DIR, model_file, read_yaml

    data_path, name = tiny_data
    config = Config(model="LLMRec", dataset=name, config_dict={"data_path": data_path, "state": "ERROR"})
    model_yaml = read_yaml(model_file("LLMRec"))
    trainer_yaml = read_yaml(os.path.join(PROPERTIES_DIR, "eisam.yaml"))
    rewritten = {"train_neg_sample_args"}  # RecBole turns ~ into its 'none' sampling dict
    for key, value in {**trainer_yaml, **model_yaml}.items():
        if key not in rewritten:
            assert config[key] == value, key
    assert (config["max_history_items"], config["user_pooling"], config["item_id_tokens"]) == (8, "mean", True)


def test_trainer_defaults_are_read_from_the_yaml(tmp_path, monkeypatch):
    """Change a default in the YAML and the trainer's settings follow: no second copy in code."""
    import shutil

    from recbole_eisam import defaults
    from recbole_eisam.trainer import resolve_settings

    for name in ("overall.yaml", "eisam.yaml"):
        shutil.copy(os.path.join(defaults.PROPERTIES_DIR, name), tmp_path / name)
    text = (tmp_path / "eisam.yaml").read_text().replace("eisam_rho: 0.05 ", "eisam_rho: 0.33 ")
    (tmp_path / "eisam.yaml").write_text(text.replace("imbsam_eta: 20 ", "imbsam_eta: 7 "))
    assert resolve_settings({})["eisam_rho"] == 0.05
    monkeypatch.setattr(defaults, "PROPERTIES_DIR", str(tmp_path))
    s = resolve_settings({"train_method": "imbsam"})
    assert (s["eisam_rho"], s["weight_eta"]) == (0.33, 7)


def test_config_reads_string_values_as_literals_without_running_them(tiny_data):
    """RecBole's Config would eval every string of config_dict; after the patch only literals
    are read (an expression stays text, and so fails the value checks with one sentence)."""
    from recbole.config import Config

    data_path, name = tiny_data
    config = Config(model="SASRec", dataset=name, config_dict={
        "data_path": data_path, "state": "ERROR", "loss_type": "CE", "train_neg_sample_args": None,
        "eisam_rho": "9**9**9", "epochs": "3", "topk": "[5, 10]", "show_progress": "false", "note": "ml-100k",
    })
    assert config["eisam_rho"] == "9**9**9"
    assert (config["epochs"], config["topk"], config["show_progress"], config["note"]) == (3, [5, 10], False, "ml-100k")
