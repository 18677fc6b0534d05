"""Train and evaluate any RecBole model (and ``LLMRec``) with the EISAM trainer family.

``recbole.quick_start`` imports ray at module level, which breaks with NumPy 2 and recent
setuptools, so this module rebuilds the same pipeline from ``recbole.config``,
``recbole.data`` and ``recbole.trainer``: Config -> dataset -> dataloaders -> model ->
trainer -> fit with early stopping on ``valid_metric`` -> evaluation of the best model on
the test split.

Configuration is layered, later layers overriding earlier ones:
RecBole's internal defaults, ``properties/overall.yaml``, ``properties/eisam.yaml``,
``properties/model/<model>.yaml``, ``properties/dataset/<dataset>.yaml``, the user's YAML
files, then ``config_dict`` (the command line's ``--key=value`` pairs end up there).
"""

import contextlib
import csv
import json
import math
import os
import sys
from logging import getLogger

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.config import Config
from recbole.data import create_dataset
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import get_model, init_logger, init_seed

from recbole_eisam.cli import USER_ERRORS
from recbole_eisam.defaults import default_config_files
from recbole_eisam.errors import DatasetNotFoundError, EISAMError, TrainingInterrupted
from recbole_eisam.evaluator.collector import target_rank
from recbole_eisam.registry import trainer_class
from recbole_eisam.trainer import EISAMTrainer
from recbole_eisam.utils.windows import prepare_data
from recbole_eisam.validation import check_yaml_file, hold_console_log, validate_config, validate_dataset


@contextlib.contextmanager
def _without_command_line():
    """RecBole's Config parses ``sys.argv`` itself; our callers pass overrides explicitly."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def load_config(model, dataset, config_file_list=None, config_dict=None):
    """Build RecBole's ``Config`` with the package's YAML defaults underneath the user's."""
    for path in config_file_list or []:
        if not os.path.isfile(path):
            raise EISAMError(f"Config file '{path}' given in config_files does not exist.")
        check_yaml_file(path)
    files = default_config_files(model, dataset) + list(config_file_list or [])
    with _without_command_line():
        try:
            return Config(model=model, dataset=dataset, config_file_list=files, config_dict=config_dict)
        except ValueError as err:
            if "is not the name of an existing model" in str(err):
                raise EISAMError(
                    f"Model '{model}' is neither a RecBole model nor one of recbole_eisam's (LLMRec, LLMRecGen)."
                ) from None
            raise
        except TypeError as err:  # RecBole's checks of value types (e.g. topk)
            raise EISAMError(f"A configuration value has the wrong type: {err}.") from None


def _atomic_files_present(config):
    path, name = config["data_path"], config["dataset"]
    if config["benchmark_filename"]:
        return all(
            os.path.isfile(os.path.join(path, f"{name}.{part}.inter"))
            for part in config["benchmark_filename"]
        )
    return os.path.isfile(os.path.join(path, f"{name}.inter"))


def build_dataset(config):
    """``create_dataset`` with one clear sentence when the atomic files are missing.

    When ``<data_path>/<dataset>/<dataset>.inter`` is absent RecBole tries its own
    downloader (it knows ml-1m, steam-merged, amazon-digital-music-18 ...); offline, or for
    an unknown name, that fails and the user is told where to put the files.
    """
    present = _atomic_files_present(config)
    try:
        return create_dataset(config)
    except (Exception, SystemExit) as err:  # RecBole's downloader exits or raises URLError
        if present:
            raise
        reason = str(err).strip() or type(err).__name__
        if "a known dataset name" in reason:  # RecBole has no download URL for this name
            reason = f"'{config['dataset']}' is not one of them"
        else:
            reason = f"the download failed: {reason}"
        raise DatasetNotFoundError(
            f"Dataset '{config['dataset']}' was not found: put its RecBole atomic files "
            f"({config['dataset']}.inter and optionally .item/.user) in "
            f"'{os.path.abspath(config['data_path'])}' or set --data_path to their parent folder "
            f"(RecBole downloads known datasets there itself when the machine is online; {reason})."
        ) from None


def _json_number(value):
    value = float(value)
    return None if math.isnan(value) else value


def write_topk(trainer, eval_data, path, k=None):
    """Write the top-``k`` recommendations of every evaluation row as TSV.

    Columns: ``user_id``, ``target_item_id``, ``topk_item_ids`` (space-separated, best
    first), all as the dataset's original tokens, and ``target_rank``, the target's rank
    among all items (ties share their mean rank). The ranking is the one the evaluator
    scores (history items and padding masked in full ranking, sampled candidates only in
    sampled mode), so every top-K metric, and every full-rank one, can be recomputed.
    """
    config = trainer.config
    dataset = eval_data._dataset
    uid_field, iid_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    k = k or max(config["topk"])
    full = isinstance(eval_data, FullSortEvalDataLoader)
    if full and trainer.item_tensor is None:
        trainer.item_tensor = dataset.get_item_feature().to(trainer.device)
    trainer.tot_item_num = dataset.item_num
    trainer.model.eval()
    rows = []
    with torch.no_grad():
        for batched_data in eval_data:
            if full:
                interaction, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batched_data)
                users = interaction[uid_field].cpu()
            else:
                interaction, scores, positive_u, positive_i = trainer._neg_sample_batch_eval(batched_data)
                users = torch.zeros(scores.shape[0], dtype=torch.long)
                users[batched_data[1].cpu()] = interaction[uid_field].cpu()
            topk = torch.topk(scores, k, dim=-1).indices.cpu()
            targets = torch.zeros(scores.shape[0], dtype=torch.long)
            targets[positive_u.cpu()] = positive_i.cpu()
            ranks = torch.zeros(scores.shape[0], dtype=torch.float64)
            ranks[positive_u.cpu()] = target_rank(scores, positive_u, positive_i).cpu()
            user_tokens = dataset.id2token(uid_field, users.numpy())
            target_tokens = dataset.id2token(iid_field, targets.numpy())
            for row in range(scores.shape[0]):
                items = dataset.id2token(iid_field, topk[row].numpy())
                rows.append((user_tokens[row], target_tokens[row], " ".join(map(str, items)), f"{ranks[row]:g}"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["user_id", "target_item_id", "topk_item_ids", "target_rank"])
        writer.writerows(rows)
    return len(rows)


def run(
    model,
    dataset,
    config_file_list=None,
    config_dict=None,
    saved=True,
    result_file=None,
    save_topk=None,
    resume=None,
    nproc=None,
):
    """Train ``model`` on ``dataset``, pick the best epoch on validation, evaluate it on test.

    Args:
        model (str): a RecBole model name (``SASRec``, ``GRU4Rec``, ``Pop``...) or ``LLMRec`` / ``LLMRecGen``.
        dataset (str): a RecBole dataset name (``ml-100k`` works offline).
        config_file_list (list[str], optional): user YAML files, loaded after the defaults.
        config_dict (dict, optional): overrides of any key, applied last.
        saved (bool): write the best checkpoint and reload it for the test evaluation.
        result_file (str, optional): also write the returned dict there as JSON.
        save_topk (str, optional): write the test split's top-K lists there as TSV.
        resume (str, optional): continue training from this checkpoint, e.g. the
            ``...-resume.safetensors`` an interrupted run wrote (identical to an
            uninterrupted run, see ``EISAMTrainer.resume_checkpoint``).
        nproc (int, optional): processes to train with (RecBole's distributed mode, gloo on
            CPU, NCCL on GPUs); default the config's ``nproc``, else 1. ``world_size``,
            ``ip``, ``port`` and ``offset`` come from the config (several machines).

    Raises:
        recbole_eisam.errors.NonFiniteLossError: the loss became nan / inf.
        recbole_eisam.errors.TrainingInterrupted: SIGINT / SIGTERM during training; the
            exception names the checkpoint to pass as ``resume``.

    Returns:
        dict: ``{"best_valid_result": {...}, "test_result": {...}, "best_valid_score": float,
        "config": {...}}``, metrics keyed by RecBole's names (``ndcg@10``, ``tailndcg@10``...).
    """
    launched = torchrun_settings()
    if launched:  # this process is one rank of a group torchrun started: join it, spawn nothing
        if save_topk:
            raise EISAMError("save_topk needs one process: evaluate the checkpoint again without torchrun.")
        config_dict = dict(config_dict or {}, **launched)
    config = load_config(model, dataset, config_file_list, config_dict)
    validate_config(config)  # bad values and malformed files: one sentence, before any loading
    nproc = int(nproc or config["nproc"] or 1)
    if config["single_spec"] and (nproc > 1 or (config["world_size"] or 0) > 1):
        run_kwargs = dict(model=model, dataset=dataset, config_file_list=config_file_list,
                          config_dict=config_dict, saved=saved, resume=resume)
        return _run_processes(nproc, config, run_kwargs, result_file, save_topk)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    with hold_console_log():  # bad data is reported alone, not after the config dump
        logger.info(config)
        data = build_dataset(config)
        validate_dataset(config, data)
    logger.info(data)
    train_data, valid_data, test_data = prepare_data(config, data)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    recommender = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(recommender)
    trainer = trainer_class(config)(config, recommender)
    if resume:
        if not isinstance(trainer, EISAMTrainer):
            raise EISAMError(
                f"resume needs EISAMTrainer's safetensors checkpoints, but model '{config['model']}' "
                f"uses RecBole's {type(trainer).__name__}."
            )
        trainer.resume_checkpoint(resume)

    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(
        test_data, load_best_model=saved, show_progress=config["show_progress"]
    )
    logger.info(f"best valid : {dict(best_valid_result)}")
    logger.info(f"test result: {dict(test_result)}")

    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "train_method": config["train_method"] or "erm",
        "best_valid_score": _json_number(best_valid_score),
        "best_valid_result": {key: _json_number(v) for key, v in best_valid_result.items()},
        "test_result": {key: _json_number(v) for key, v in test_result.items()},
    }
    if isinstance(trainer, EISAMTrainer):  # when validation peaked, how long training ran
        result.update(trainer.training_summary())
    if result_file and (config["single_spec"] or dist.get_rank() == 0):
        os.makedirs(os.path.dirname(os.path.abspath(result_file)), exist_ok=True)
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
    if save_topk:
        write_topk(trainer, test_data, save_topk)
    return result


# ---------------------------------------------------------------------------- processes
def torchrun_settings():
    """The distributed keys of a process that ``torchrun`` started (its environment rendezvous:
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``), or ``{}`` outside torchrun or in a group of one."""
    env = os.environ
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return {}
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    return {
        "local_rank": local_rank, "offset": rank - local_rank, "world_size": int(env["WORLD_SIZE"]),
        "nproc": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "ip": env.get("MASTER_ADDR", "127.0.0.1"),
        "port": str(env.get("MASTER_PORT", "29500")), "dist_init_method": "env://",
    }



def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _process_main(rank, run_kwargs, queue):
    """One process of :func:`_run_processes`: ``run`` with ``local_rank``; reports to ``queue``."""


    run_kwargs = dict(run_kwargs, config_dict=dict(run_kwargs["config_dict"], local_rank=rank))
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run_kwargs["config_dict"]["nproc"]))
    try:
        result = run(**run_kwargs)
        if dist.is_initialized():
            # every process is past its last collective before any tears the group down: rank 0
            # hosts the rendezvous store, and leaving early aborted the other process now and then
            dist.barrier()
    except TrainingInterrupted as err:
        queue.put(("interrupted", str(err), err.exit_code, err.checkpoint))
        sys.exit(err.exit_code)
    except USER_ERRORS as err:
        queue.put(("error", type(err).__name__, str(err)))
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        queue.put(("result", result))


def _run_processes(nproc, config, run_kwargs, result_file, save_topk):
    """``run`` in ``nproc`` spawned processes (RecBole's distributed mode); rank 0's result.

    SIGINT / SIGTERM received here are passed on to the processes, which save a checkpoint
    to resume from after their current step (together) and exit; the first process's
    message is raised here as the same exception (``TrainingInterrupted``, ``EISAMError``...).
    """
    import signal
    import threading



    if save_topk:
        raise EISAMError("save_topk needs one process: evaluate the checkpoint again without nproc.")
    world_size = config["world_size"] if (config["world_size"] or 0) > 0 else nproc
    port = config["port"] or (_free_port() if world_size == nproc else "5678")
    overrides = dict(run_kwargs["config_dict"] or {})
    overrides.update(nproc=nproc, world_size=world_size, ip=config["ip"] or "127.0.0.1", port=str(port),
                     offset=config["offset"] or 0)
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _process_main, args=(dict(run_kwargs, config_dict=overrides), queue), nprocs=nproc, join=False,
        start_method="spawn",
    )

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        reports = []
        while not queue.empty():
            reports.append(queue.get())
        for report in reports:
            if report[0] == "interrupted":
                raise TrainingInterrupted(report[1], exit_code=report[2], checkpoint=report[3]) from None
        for report in reports:
            if report[0] == "error":
                kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(report[1], EISAMError)
                raise kind(report[2]) from None
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
    result = None
    while not queue.empty():
        report = queue.get()
        if report[0] == "result":
            result = report[1]
    if result_file and result is not None:
        os.makedirs(os.path.dirname(os.path.abspath(result_file)), exist_ok=True)
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
    return result
