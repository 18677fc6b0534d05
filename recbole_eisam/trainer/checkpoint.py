"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON sidecar.

A checkpoint ``<stem>.safetensors`` comes with

* ``<stem>.json``: format tag, model and dataset names, epoch, cur_step, best valid score,
  train_method, whether the state dict is partial (``checkpoint_state_dict``), the
  optimizer's param groups and non-tensor state, and RecBole's ``other_parameter``
  when it is JSON-serialisable;
* ``<stem>.optim.safetensors`` (optional): the optimizer's tensor state
  (``state.<param index>.<name>``);
* ``<stem>.state.safetensors`` (optional, checkpoints written to resume an interrupted
  run): random number generator states and the data loader's generator
  (:func:`rng_state`), described by the sidecar's ``training_state``.

Nothing is ever unpickled: :func:`load_checkpoint` reads safetensors and JSON only, and a
file written by ``torch.save`` or ``pickle`` is refused before any byte of it is
interpreted. Every file is written to a temporary name and renamed into place, the JSON
sidecar last, so an interruption while saving leaves the previous checkpoint readable.
:class:`CheckpointMixin` is the trainer's side: what goes into a checkpoint and back.
"""

import json
import math
import os
import random
import secrets

import numpy as np
import torch
from recbole.utils import set_color
from safetensors.torch import load_file, save_file

from recbole_eisam.errors import NonFiniteLossError

FORMAT = "recbole-eisam-checkpoint"
VERSION = 1
SUFFIX = ".safetensors"


def _stem(model_file):
    stem = str(model_file)
    for suffix in (SUFFIX, ".pth", ".json"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def paths(model_file):
    """``(tensor file, JSON sidecar, optimizer tensor file)`` of a checkpoint path."""
    stem = _stem(model_file)
    return stem + SUFFIX, stem + ".json", stem + ".optim" + SUFFIX


def run_path(model_file):
    """A checkpoint path of this run alone, from RecBole's ``<model>-<clock>.pth``.

    RecBole names the file after the clock to the second, so two runs that build their
    trainers in the same second in one ``checkpoint_dir`` (two grid processes, a job array)
    would save to one file and each test the other's weights; a random tag keeps them apart.
    """
    return f"{_stem(model_file)}-{secrets.token_hex(4)}{SUFFIX}"


def state_path(model_file):
    """The training-state tensor file (RNG states) of a checkpoint path."""
    return _stem(model_file) + ".state" + SUFFIX


def resume_path(model_file):
    """Where the checkpoint to resume an interrupted run goes, next to ``model_file``."""
    return _stem(model_file) + "-resume" + SUFFIX


#: first bytes of files this module refuses to read: pickle protocols 2-5, torch's zip format
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _refuse_pickle(path):
    """Raise ValueError when ``path`` starts like a pickle or a ``torch.save`` archive."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return
    if head.startswith(_PICKLE_MAGIC) or str(path).endswith(".pth"):
        raise ValueError(
            f"{path} is a pickled file (torch.save / pickle, e.g. a RecBole .pth checkpoint); "
            "recbole-eisam loads only its own safetensors checkpoints and never unpickles."
        )


def _replace_atomically(path, write):
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tensors_for_safetensors(state):
    """Detached, contiguous CPU tensors; storages shared between entries are cloned apart."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def _json_float(x):
    x = float(x)
    return x if math.isfinite(x) else repr(x)  # "inf" / "-inf" / "nan" as strings


def optimizer_to_safe(optimizer):
    """Split ``optimizer.state_dict()`` into (tensors, JSON-able dict)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = json.loads(json.dumps(sd["param_groups"], default=lambda o: None))
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_safe(tensors, meta):
    """Inverse of :func:`optimizer_to_safe`: a dict for ``optimizer.load_state_dict``."""
    state = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entries in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(model_file, tensors, meta, optimizer=None, state_tensors=None):
    """Write the tensors (safetensors), optionally the optimizer state and the training-state
    tensors, then the sidecar JSON. Each file is replaced atomically."""
    tensor_file, json_file, optim_file = paths(model_file)
    train_state_file = state_path(model_file)
    os.makedirs(os.path.dirname(os.path.abspath(tensor_file)), exist_ok=True)
    meta = dict(meta, format=FORMAT, version=VERSION)
    if "best_valid_score" in meta:
        meta["best_valid_score"] = _json_float(meta["best_valid_score"])
    files = [(tensor_file, tensors)]
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_safe(optimizer)
        files.append((optim_file, opt_tensors))
        meta["optimizer"] = opt_meta
    if state_tensors is not None:
        files.append((train_state_file, state_tensors))
    for path, content in files:
        _replace_atomically(path, lambda tmp, c=content: save_file(_tensors_for_safetensors(c), tmp))
    for path, wanted in ((optim_file, optimizer is not None), (train_state_file, state_tensors is not None)):
        if not wanted and os.path.exists(path):
            os.remove(path)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, default=str)

    _replace_atomically(json_file, write_json)
    return tensor_file


def _load_safetensors(path, device):
    _refuse_pickle(path)
    try:
        return load_file(path, device=str(device))
    except Exception as err:  # safetensors' own error type: a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from None


def load_state_tensors(model_file):
    """The training-state tensors of a checkpoint (:func:`rng_state` ...), ``{}`` if none."""
    path = state_path(model_file)
    return _load_safetensors(path, "cpu") if os.path.exists(path) else {}


def load_checkpoint(model_file, device="cpu", expect_model=None, expect_dataset=None):
    """Read ``(tensors, meta, optimizer_state_or_None)``; refuse pickles and foreign checkpoints.

    Raises:
        ValueError: for a pickle or ``torch.save`` file (whatever its name; detected from its
            first bytes, never unpickled), a file that is not ours, or a checkpoint of
            another model or dataset than ``expect_model`` / ``expect_dataset``.
    """
    tensor_file, json_file, optim_file = paths(model_file)
    if os.path.isfile(str(model_file)):  # the file named, whatever its suffix, is never unpickled
        _refuse_pickle(str(model_file))
    if not (os.path.exists(tensor_file) and os.path.exists(json_file)):
        if os.path.isfile(str(model_file)) and str(model_file) not in (tensor_file, json_file):
            raise ValueError(
                f"{model_file} is not a recbole-eisam checkpoint (expected {tensor_file} "
                f"with {os.path.basename(json_file)} next to it)."
            )
        raise FileNotFoundError(
            f"no checkpoint at {tensor_file} (+ {os.path.basename(json_file)})."
        )
    _refuse_pickle(json_file)
    try:
        with open(json_file) as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_file} is not a {FORMAT} sidecar ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_file} is not a {FORMAT} sidecar.")
    for key, expected in (("model", expect_model), ("dataset", expect_dataset)):
        if expected is not None and str(meta.get(key)).lower() != str(expected).lower():
            raise ValueError(
                f"checkpoint {tensor_file} was trained for {key} {meta.get(key)!r}, not "
                f"{expected!r}; load it with the same model and dataset it was trained on."
            )
    if isinstance(meta.get("best_valid_score"), str):
        meta["best_valid_score"] = float(meta["best_valid_score"])
    tensors = _load_safetensors(tensor_file, device)
    opt_state = None
    if "optimizer" in meta:
        # on the CPU: optimizer.load_state_dict moves each state to its parameter's device
        # (and keeps Adam's ``step`` on the CPU, where it must stay)
        opt_tensors = _load_safetensors(optim_file, "cpu") if os.path.exists(optim_file) else {}
        opt_state = optimizer_from_safe(opt_tensors, meta["optimizer"])
    return tensors, meta, opt_state


# ---------------------------------------------------------------------------- RNG states
def rng_state():
    """The states of every random number generator training draws from, as tensors.

    Python's ``random``, NumPy's global generator, torch's CPU generator and, when CUDA is
    available, every CUDA device's generator. Floats and integers are stored exactly
    (float64 / int64), so :func:`set_rng_state` restores bit-identical generators.
    """
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{index}"] = cuda_state
    return state


def set_rng_state(state):
    """Restore the generators from :func:`rng_state`'s tensors."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    version, has_gauss, gauss = state["python_meta"].tolist()
    internal = tuple(int(x) for x in state["python"].tolist())
    random.setstate((int(version), internal, gauss if has_gauss else None))
    pos, has_gauss, cached = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda.{index}" in state:
                torch.cuda.set_rng_state(state[f"cuda.{index}"].to(torch.uint8), index)


class CheckpointMixin:
    """The trainer's side of the format: which tensors and metadata a checkpoint holds, and
    the rule that weights which are not finite are never written."""

    def _kept_checkpoint(self):
        if os.path.exists(self.saved_model_file):
            return f"the last good checkpoint {self.saved_model_file} is kept"
        return "no checkpoint had been saved yet"

    def _checkpoint_tensors(self):
        model = self.model
        if hasattr(model, "checkpoint_state_dict"):
            tensors = dict(model.checkpoint_state_dict())
        else:
            tensors = dict(model.state_dict())
        other, other_json = model.other_parameter() or {}, {}
        for key, value in other.items():
            if torch.is_tensor(value):
                tensors[f"__other__.{key}"] = value
            else:
                other_json[key] = value
        return tensors, other_json

    def _checkpoint_meta(self, epoch, other_json):
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "train_method": self.train_method,
            "partial_state_dict": hasattr(self.model, "checkpoint_state_dict"),
            "other_parameter": other_json,
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """Rank 0 writes the checkpoint; weights that are not finite are never written (every
        process checks, their weights are the same, so all of them stop together)."""
        tensors, other_json = self._checkpoint_tensors()
        bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteLossError(
                f"Training stopped: the weights ({bad[0]}) are not finite after epoch {epoch}; "
                f"{self._kept_checkpoint()} (a smaller learning_rate or clip_grad_norm may help)."
            )
        if not self.is_main_process():
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        meta = self._checkpoint_meta(epoch, other_json)
        saved_model_file = save_checkpoint(saved_model_file, tensors, meta, self.optimizer)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _load_weights(self, model_file):
        """Load model tensors (and RecBole's other_parameter) from our checkpoint; returns its meta."""
        tensors, meta, opt_state = load_checkpoint(
            model_file, self.device, expect_model=self.config["model"], expect_dataset=self.config["dataset"]
        )
        other = {k[len("__other__.") :]: v for k, v in tensors.items() if k.startswith("__other__.")}
        state = {k: v for k, v in tensors.items() if not k.startswith("__other__.")}
        self.model.load_state_dict(state, strict=not hasattr(self.model, "checkpoint_state_dict"))
        other.update(meta.get("other_parameter") or {})
        if other:
            self.model.load_other_parameter(other)
        return meta, opt_state
