"""Reliability: a non-finite loss, SIGTERM and resume, checkpoints that are never unpickled."""

import hashlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from recbole_eisam import patches

patches.apply()


import test_trainer_e2e  # noqa: E402  (its build: config, data and model of the tiny dataset)

from recbole_eisam.errors import NonFiniteLossError, TrainingInterrupted  # noqa: E402
from recbole_eisam.trainer import EISAMTrainer  # noqa: E402
from recbole_eisam.trainer import checkpoint as ckpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(config_dict, model_name="SASRec", **extra):
    """A fresh config, data, model and trainer, as a new process would build them."""
    config, model, train_data, valid_data, test_data = test_trainer_e2e.build(model_name, config_dict, **extra)
    return EISAMTrainer(config, model), train_data, valid_data, test_data


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_last_good_checkpoint(tiny_config_dict):
    trainer, train_data, valid_data, test_data = build(
        tiny_config_dict, train_method="eisam", epochs=3, stopping_step=10
    )
    losses_fn = trainer.losses_fn

    def poisoned(interaction, log_prior=None, tau=0.0):  # nan losses at the third step of the second epoch
        out = losses_fn(interaction, log_prior, tau)
        if trainer._epoch_idx == 1 and trainer._epoch_step == 3:
            return (out[0] * float("nan"),) + tuple(out[1:])
        return out

    trainer.losses_fn = poisoned
    saved = []
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(train_data, valid_data, saved=True, callback_fn=lambda e, s: saved.append(digest(trainer.saved_model_file)))
    path = trainer.saved_model_file
    assert str(info.value) == (
        f"Training stopped: the loss is nan at epoch 1, step 3; the last good checkpoint {path} is kept "
        "(a smaller learning_rate or clip_grad_norm may help)."
    )
    # the step with the nan loss was not taken, the epoch-0 checkpoint is byte for byte the same
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert saved and digest(path) == saved[-1]
    assert json.load(open(ckpt.paths(path)[1]))["epoch"] == 0
    # and it loads into a fresh trainer and evaluates to finite metrics
    fresh, *_, fresh_test = build(tiny_config_dict, train_method="eisam")
    result = fresh.evaluate(fresh_test, load_best_model=True, model_file=path)
    assert set(result) == {"hit@10", "ndcg@10"} and all(math.isfinite(v) for v in result.values())
    assert result["hit@10"] > 0


def test_runs_started_in_the_same_second_keep_their_own_checkpoints(tiny_config_dict, monkeypatch):
    # RecBole names checkpoints after the clock to the second: freeze it, as two grid
    # processes (or a job array) starting together see it
    import recbole.trainer.trainer as recbole_trainer

    monkeypatch.setattr(recbole_trainer, "get_local_time", lambda: "Dec-07-2026_14-59-11")
    first, train_a, valid_a, _ = build(tiny_config_dict, train_method="erm", epochs=1)
    second, train_b, valid_b, _ = build(tiny_config_dict, train_method="eisam", epochs=1)
    assert first.saved_model_file != second.saved_model_file
    assert os.path.dirname(first.saved_model_file) == os.path.dirname(second.saved_model_file)
    first.fit(train_a, valid_a, saved=True)
    kept = digest(first.saved_model_file)
    second.fit(train_b, valid_b, saved=True)
    assert digest(first.saved_model_file) == kept  # the second run did not overwrite the first's
    assert digest(second.saved_model_file) != kept


def test_non_finite_weights_are_never_saved(tiny_config_dict):
    trainer, train_data, valid_data, _ = build(tiny_config_dict, train_method="erm", epochs=1)
    trainer.fit(train_data, valid_data, saved=True)
    path = trainer.saved_model_file
    before = digest(path)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"the weights \(.*\) are not finite after epoch 4; the last good"):
        trainer._save_checkpoint(4)
    assert digest(path) == before


def _final_state(trainer):
    return {key: value.clone() for key, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("where, sig", [("step", signal.SIGTERM), ("validation", signal.SIGINT)])
def test_signal_then_resume_is_identical_to_an_uninterrupted_run(tiny_config_dict, tmp_path, monkeypatch, where, sig):
    """3 epochs of SASRec + EISAM (dropout on) on CPU: uninterrupted (A) == interrupted by a
    signal (B) and resumed in a fresh trainer (C), to the last bit of every weight and metric."""
    settings = dict(train_method="eisam", epochs=3, stopping_step=10)
    if where == "step":  # the learning-rate schedule's position is part of the resumed state
        settings.update(lr_scheduler="cosine", lr_warmup_steps=2)
    # A: uninterrupted
    trainer_a, train_a, valid_a, test_a = build(tiny_config_dict, checkpoint_dir=str(tmp_path / "a"), **settings)
    best_a = trainer_a.fit(train_a, valid_a, saved=True)
    final_a = _final_state(trainer_a)
    test_result_a = trainer_a.evaluate(test_a, load_best_model=True)

    # B: SIGTERM to itself after step 2 of epoch 1, or SIGINT during the validation of epoch 0
    trainer_b, train_b, valid_b, _ = build(tiny_config_dict, checkpoint_dir=str(tmp_path / "b"), **settings)
    step = trainer_b._step

    def step_then_signal(batches, scaler):
        stats = step(batches, scaler)
        if where == "step" and trainer_b._epoch_idx == 1 and trainer_b._epoch_step == 2:
            os.kill(os.getpid(), sig)
        return stats

    def callback(epoch_idx, valid_score):
        if where == "validation" and epoch_idx == 0:
            os.kill(os.getpid(), sig)

    trainer_b._step = step_then_signal
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as info:
        trainer_b.fit(train_b, valid_b, saved=True, callback_fn=callback)
    assert signal.getsignal(sig) is before  # the previous handler is back
    resume_file = info.value.checkpoint
    assert info.value.exit_code == 128 + sig
    where_text = "epoch 1, step 2" if where == "step" else "epoch 1, step 0"
    assert str(info.value) == (
        f"Training interrupted by {sig.name} at {where_text}; its state is saved in {resume_file}: "
        f"continue with --resume={resume_file} and the same other options."
    )
    assert resume_file.endswith("-resume.safetensors") and os.path.exists(resume_file)
    assert os.path.exists(trainer_b.saved_model_file)  # the best checkpoint of epoch 0 is separate

    # C: a fresh trainer (other seed for its initial weights) resumes; nothing is unpickled
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load / pickle.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    trainer_c, train_c, valid_c, test_c = build(tiny_config_dict, checkpoint_dir=str(tmp_path / "c"), **dict(settings, seed=7))
    trainer_c.config["seed"] = trainer_a.config["seed"]  # only the initial weights differ (overwritten)
    trainer_c.resume_checkpoint(resume_file)
    assert trainer_c.start_epoch == 1 and trainer_c.saved_model_file == trainer_b.saved_model_file
    best_c = trainer_c.fit(train_c, valid_c, saved=True)
    final_c = _final_state(trainer_c)
    for key, value in final_a.items():
        assert torch.equal(value, final_c[key]), key
    assert best_c[0] == best_a[0] and dict(best_c[1]) == dict(best_a[1])
    test_result_c = trainer_c.evaluate(test_c, load_best_model=True)
    assert test_result_c == test_result_a
    assert trainer_c.epoch_stats["samples"] == trainer_a.epoch_stats["samples"]
    assert trainer_c.training_summary() == trainer_a.training_summary()  # the validation curve survives
    assert trainer_c.optimizer.param_groups[0]["lr"] == trainer_a.optimizer.param_groups[0]["lr"]


class MarkerPayload:
    """Unpickling this creates the file ``path``: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_files(folder, marker):
    """A torch.save file, a raw pickle named like our checkpoint (with a valid-looking sidecar)
    and a raw pickle without a suffix, each carrying the payload."""
    os.makedirs(folder, exist_ok=True)
    pth = os.path.join(folder, "old.pth")
    torch.save({"state_dict": MarkerPayload(marker)}, pth)
    named = os.path.join(folder, "evil.safetensors")
    with open(named, "wb") as f:
        pickle.dump({"weights": MarkerPayload(marker)}, f)
    with open(os.path.join(folder, "evil.json"), "w") as f:
        json.dump({"format": ckpt.FORMAT, "version": 1, "model": "SASRec", "dataset": "tiny", "epoch": 0,
                   "cur_step": 0, "best_valid_score": 0.1}, f)
    bare = os.path.join(folder, "evil_bare")
    with open(bare, "wb") as f:
        pickle.dump(MarkerPayload(marker), f)
    return [pth, named, bare]


def test_pickled_checkpoints_are_refused_and_never_unpickled(tiny_config_dict, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    files = _pickle_files(str(tmp_path / "evil"), marker)
    assert not os.path.exists(marker)
    trainer, train_data, valid_data, test_data = build(tiny_config_dict, train_method="erm", epochs=1)
    for path in files:
        with pytest.raises(ValueError, match="pickled file|not a readable safetensors"):
            trainer.evaluate(test_data, load_best_model=True, model_file=path)
        with pytest.raises(ValueError, match="pickled file|not a readable safetensors"):
            trainer.resume_checkpoint(path)
        assert not os.path.exists(marker), path
    # the payload is live: unpickling it would have created the marker
    with open(files[-1], "rb") as f:
        pickle.load(f).close()
    assert os.path.exists(marker)

    # a checkpoint of another dataset is refused too
    trainer.fit(train_data, valid_data, saved=True)
    json_file = ckpt.paths(trainer.saved_model_file)[1]
    meta = json.load(open(json_file))
    json.dump(dict(meta, dataset="ml-1m"), open(json_file, "w"))
    with pytest.raises(ValueError, match="trained for dataset 'ml-1m', not 'tiny'"):
        trainer.evaluate(test_data, load_best_model=True)


# ---------------------------------------------------------------------------- through the CLI
def _cli(args, cwd, **popen):
    cmd = [sys.executable, os.path.join(ROOT, "run_recbole_eisam.py"), "--model=SASRec", "--dataset=tiny",
           "--show_progress=False", "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
           "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=64", "--metrics=['Hit','NDCG']", "--topk=[10]",
           "--valid_metric=NDCG@10", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cli_resume_refuses_a_pickle_without_unpickling(tiny_data, tmp_path):
    data_path, _ = tiny_data
    marker = str(tmp_path / "UNPICKLED")
    pth = _pickle_files(str(tmp_path / "evil"), marker)[0]
    proc = _cli([f"--data_path={data_path}", f"--checkpoint_dir={tmp_path / 'saved'}", f"--resume={pth}"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {pth} is a pickled file")
    assert not os.path.exists(marker)


def test_cli_nan_is_one_line_and_sigterm_then_resume(tiny_data, tmp_path):
    data_path, _ = tiny_data
    common = [f"--data_path={data_path}", f"--checkpoint_dir={tmp_path / 'saved'}", "--train_method=eisam"]
    # an absurd learning rate makes the loss non-finite in the first epoch
    proc = _cli(common + ["--learning_rate=1e30", "--epochs=2"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Training stopped: the loss is ") and ", step " in last, last
    assert "at epoch 0, step" in last and "no checkpoint had been saved yet" in last, last

    # SIGTERM once the first epoch was logged: a checkpoint, exit 143, one line saying how to resume
    proc = _cli(common + ["--epochs=30", "--stopping_step=3"], tmp_path)
    for line in proc.stderr:
        if "epoch 0 eisam" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Training interrupted by SIGTERM at epoch ") and "--resume=" in last, last
    resume_file = last.split("--resume=")[1].split(" ")[0]
    assert os.path.exists(resume_file)
    out = tmp_path / "resumed.json"
    proc = _cli(common + ["--epochs=30", "--stopping_step=3", f"--resume={resume_file}", f"--result_file={out}"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "Resume training at epoch" in err
    assert all(math.isfinite(v) for v in json.loads(out.read_text())["test_result"].values())
