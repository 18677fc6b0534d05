"""Per-sample loss adapters: the mean of the per-sample losses (plus the unweighted
regulariser) is exactly RecBole's own ``calculate_loss`` for every adapted model."""

import copy

import pytest
import torch

from recbole_eisam import patches

patches.apply()

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.transform import construct_transform  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from recbole_eisam.trainer import ADAPTERS, EISAMTrainer, get_logits_fn, per_sample_losses  # noqa: E402
from recbole_eisam.trainer.losses import unsupported_reason  # noqa: E402

PROPS = ["properties/overall.yaml", "properties/eisam.yaml"]
FEATURES = {  # item features for SASRecF, GRU4RecF, FDSA (harmless for the other models)
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]},
    "selected_features": ["genre"],
    "pooling_mode": "sum",
    "mask_ratio": 0.3,  # BERT4Rec
}


def build(model_name, config_dict, **extra):
    config = Config(
        model=model_name,
        dataset="tiny",
        config_file_list=PROPS,
        config_dict={**config_dict, "metrics": ["Hit"], "topk": [10], "valid_metric": "Hit@10", **extra},
    )
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(model_name)(config, train_data._dataset)
    return config, model, train_data, valid_data, test_data


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dataset and one training batch for every model (built under SASRec's config)."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("adapters")
    config_dict = {
        "data_path": write_tiny_dataset(str(root / "data")),
        "checkpoint_dir": str(root / "saved"),
        "show_progress": False,
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 16,
        "embedding_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "device": "cpu",
        "use_gpu": False,
        **FEATURES,
    }
    _, _, train_data, _, _ = build("SASRec", config_dict)
    return config_dict, train_data, next(iter(train_data))


@pytest.mark.parametrize("model_name", sorted(ADAPTERS))
def test_adapter_matches_calculate_loss(shared, model_name):
    config_dict, train_data, batch = shared
    config = Config(model=model_name, dataset="tiny", config_file_list=PROPS,
                    config_dict={**config_dict, "metrics": ["Hit"], "topk": [10], "valid_metric": "Hit@10"})
    transform = construct_transform(config)  # BERT4Rec masks in the dataloader (and sets keys)
    init_seed(config["seed"], True)
    model = get_model(model_name)(config, train_data._dataset)
    batch = transform(train_data._dataset, copy.deepcopy(batch))
    model.eval()  # no dropout: both computations see the same network
    out = get_logits_fn(model)(batch)
    logits, target = out[0], out[1]
    assert logits.shape == (target.numel(), model.n_items)
    loss = per_sample_losses(logits, target).mean()
    if len(out) > 2:
        loss = loss + out[2]
    torch.testing.assert_close(loss, model.calculate_loss(batch), rtol=1e-5, atol=1e-6)
    if model_name == "BERT4Rec":
        assert target.numel() != len(batch)  # samples are masked positions, not sequences


def test_bpr_model_refused_with_reason(tiny_config_dict):
    config, model, *_ = build("GRU4Rec", tiny_config_dict)
    model.loss_type = "BPR"
    assert "loss_type=BPR" in unsupported_reason(model)
    config["train_method"] = "sam"
    with pytest.raises(ValueError, match="GRU4Rec is trained with loss_type=BPR; set loss_type: CE"):
        EISAMTrainer(config, model)
