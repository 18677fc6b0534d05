"""Two gloo processes on CPU equal one process: the EISAM step and the evaluation metrics."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import write_tiny_dataset
from safetensors.torch import load_file, save_file

#: the EISAM step of 2 processes (half of the global batch each) against 1 process (all of
#: it): only the order of float additions differs (all-reduce), so float32 round-off
ATOL = 1e-6
METRICS = ["Hit", "NDCG", "ItemCoverage", "GiniIndex"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_dict(data_path, tmp, **extra):
    return {
        "data_path": data_path, "checkpoint_dir": os.path.join(tmp, "saved"), "show_progress": False,
        "train_batch_size": 64, "eval_batch_size": 16, "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16,
        "inner_size": 32, "n_layers": 1, "n_heads": 1, "seed": 2020, "use_gpu": False, "device": "cpu",
        "train_method": "eisam", "metrics": METRICS, "topk": [10], "valid_metric": "NDCG@10",
        "log_wandb": False, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, **extra,  # no random masks
    }


def build(cfg):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    import recbole_eisam  # noqa: F401  (patches: gloo on CPU)
    from recbole_eisam.trainer import EISAMTrainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    props = [os.path.join(root, "properties", name) for name in ("overall.yaml", "eisam.yaml")]
    config = Config(model="SASRec", dataset="tiny", config_file_list=props, config_dict=cfg)
    init_seed(config["seed"], True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], True)
    model = get_model("SASRec")(config, train_data._dataset)
    trainer = EISAMTrainer(config, model)
    trainer.setup_item_weights(train_data.dataset)
    trainer.eval_collector.data_collect(train_data)
    return trainer, train_data, test_data


def worker(rank, data_path, tmp, port):
    torch.set_num_threads(1)
    from recbole.data.interaction import Interaction

    trainer, _, test_data = build(config_dict(data_path, tmp, local_rank=rank, world_size=2, nproc=2,
                                              ip="127.0.0.1", port=str(port)))
    assert not trainer.config["single_spec"] and torch.distributed.get_world_size() == 2
    trainer.model.load_state_dict(load_file(os.path.join(tmp, "initial.safetensors")))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for index in range(2):
        batch = Interaction(load_file(os.path.join(tmp, f"batch{index}.safetensors")))
        half = batch[torch.arange(rank, len(batch), 2)]  # this process's half of the global batch
        trainer._step([half], scaler)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, os.path.join(tmp, "ddp.safetensors"))
    # evaluation of the same weights: rows gathered from both processes (41 users: one padded)
    trainer.model.load_state_dict(load_file(os.path.join(tmp, "reference.safetensors")))
    result = trainer.evaluate(test_data, load_best_model=False)
    with open(os.path.join(tmp, f"metrics{rank}.json"), "w") as f:
        json.dump(dict(result), f)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    tmp = str(tmp_path)
    data_path = write_tiny_dataset(os.path.join(tmp, "data"), n_users=41)
    trainer, train_data, test_data = build(config_dict(data_path, tmp))
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, os.path.join(tmp, "initial.safetensors"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batches = iter(train_data)
    for index in range(2):  # two EISAM steps on two full batches of 64 sequences
        batch = next(batches)
        assert len(batch) == 64
        save_file(dict(batch.interaction), os.path.join(tmp, f"batch{index}.safetensors"))
        stats = trainer._step([batch], scaler)
        assert stats["sharpness"] != 0
    reference = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in reference.items()}, os.path.join(tmp, "reference.safetensors"))
    expected = trainer.evaluate(test_data, load_best_model=False)

    mp.start_processes(worker, args=(data_path, tmp, free_port()), nprocs=2, join=True, start_method="spawn")

    ddp = load_file(os.path.join(tmp, "ddp.safetensors"))
    initial = load_file(os.path.join(tmp, "initial.safetensors"))
    diff = max((ddp[k] - v).abs().max().item() for k, v in reference.items())
    moved = max((initial[k] - v).abs().max().item() for k, v in reference.items())
    print(f"max |2 processes - 1 process| = {diff:.3g} (the two steps moved weights by up to {moved:.3g})")
    assert diff <= ATOL and moved > 100 * ATOL
    for rank in range(2):
        with open(os.path.join(tmp, f"metrics{rank}.json")) as f:
            assert json.load(f) == pytest.approx(dict(expected), abs=0), rank


def test_quick_start_with_two_processes(tmp_path):
    """``run(nproc=2)``: spawned gloo processes train, rank 0 writes the checkpoint and the
    result, metrics come from both processes' rows."""
    from recbole_eisam.quick_start import run

    tmp = str(tmp_path)
    data_path = write_tiny_dataset(os.path.join(tmp, "data"))
    result = run("SASRec", "tiny", config_dict=config_dict(data_path, tmp, epochs=1), nproc=2,
                 result_file=os.path.join(tmp, "result.json"))
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "itemcoverage@10", "giniindex@10"}
    assert result["test_result"]["hit@10"] > 0
    with open(os.path.join(tmp, "result.json")) as f:
        assert json.load(f)["test_result"] == result["test_result"]
    saved = sorted(os.listdir(os.path.join(tmp, "saved")))
    assert len(saved) == 3 and [name.split(".", 1)[1] for name in saved] == ["json", "optim.safetensors", "safetensors"]


def test_torchrun_trains_like_nproc(tmp_path):
    """``torchrun --nproc_per_node=2 run_recbole_eisam.py ...`` (environment rendezvous): the
    same metrics as ``--nproc=2``, rank 0 alone writing the result file."""
    import subprocess
    import sys

    from recbole_eisam.quick_start import run

    tmp = str(tmp_path)
    data_path = write_tiny_dataset(os.path.join(tmp, "data"))
    cfg = config_dict(data_path, tmp, epochs=1)
    spawned = run("SASRec", "tiny", config_dict=dict(cfg), nproc=2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [f"--{k}={v!r}" if isinstance(v, (list, dict, str)) else f"--{k}={v}" for k, v in cfg.items()]
    out = os.path.join(tmp, "torchrun.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         os.path.join(root, "run_recbole_eisam.py"), "--model=SASRec", "--dataset=tiny", f"--result_file={out}", *args],
        capture_output=True, text=True, cwd=tmp, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        launched = json.load(f)
    assert launched["test_result"] == spawned["test_result"]
    assert launched["best_valid_result"] == spawned["best_valid_result"]
    assert proc.stdout.count('"test_result"') == 1  # rank 0 alone prints


def name_worker(rank, data_path, tmp, port):
    import recbole.trainer.trainer as recbole_trainer

    torch.set_num_threads(1)
    if rank == 1:  # this process builds its trainer a second later than rank 0
        recbole_trainer.get_local_time = lambda: "Dec-03-2026_20-23-17"
    trainer, _, _ = build(config_dict(data_path, tmp, local_rank=rank, world_size=2, nproc=2,
                                      ip="127.0.0.1", port=str(port)))
    with open(os.path.join(tmp, f"name{rank}.txt"), "w") as f:
        f.write(trainer.saved_model_file)
    torch.distributed.destroy_process_group()


def test_every_process_uses_rank_0s_checkpoint_name(tmp_path):
    """RecBole names a checkpoint after the clock; a process that starts later must still load
    the file rank 0 writes."""
    tmp = str(tmp_path)
    data_path = write_tiny_dataset(os.path.join(tmp, "data"))
    mp.spawn(name_worker, args=(data_path, tmp, free_port()), nprocs=2, join=True)
    names = [open(os.path.join(tmp, f"name{rank}.txt")).read() for rank in (0, 1)]
    assert names[0] == names[1] and names[0].endswith(".safetensors")
