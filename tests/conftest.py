"""Shared fixtures: tiny atomic datasets written by the tests themselves."""

import os

import numpy as np
import pytest

import recbole_eisam  # noqa: F401  (registers the plugin)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=60, seed=0, with_titles=True):
    """Write ``<root>/<name>/<name>.inter`` (and ``.item`` with a ``movie_title`` field).

    Item popularity follows a Zipf-like law so that the head / tail split is non-trivial;
    every user has 8 to 15 interactions with strictly increasing timestamps.
    Returns the ``data_path`` to give RecBole (``root``).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    popularity /= popularity.sum()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        length = int(rng.integers(8, 16))
        items = rng.choice(np.arange(1, n_items + 1), size=length, replace=False, p=popularity)
        for t, i in enumerate(items):
            lines.append(f"u{u}\ti{i}\t{int(rng.integers(1, 6))}\t{1000 * u + t}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if with_titles:
        genres = ["Drama", "Comedy", "Action", "Thriller", "Romance"]
        rows = ["item_id:token\tmovie_title:token_seq\tgenre:token"]
        for i in range(1, n_items + 1):
            rows.append(f"i{i}\tMovie Number {i} ({1950 + i})\t{genres[i % len(genres)]}")
        with open(os.path.join(folder, f"{name}.item"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    """``(data_path, dataset_name)`` of a fresh tiny dataset with item titles."""
    return write_tiny_dataset(str(tmp_path / "data")), "tiny"


@pytest.fixture
def tiny_config_dict(tiny_data, tmp_path):
    """A config dict that trains any sequential model on the tiny dataset in seconds."""
    data_path, _ = tiny_data
    return {
        "data_path": data_path,
        "checkpoint_dir": str(tmp_path / "saved"),
        "log_wandb": False,
        "show_progress": False,
        "epochs": 2,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "stopping_step": 2,
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 16,
        "inner_size": 32,
        "embedding_size": 16,
        "n_layers": 1,
        "n_heads": 1,
        "seed": 2020,
        "device": "cpu",
        "use_gpu": False,
    }
