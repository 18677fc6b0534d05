"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON sidecar.

A checkpoint ``<stem>.safetensors`` comes with

* ``<stem>.json``: format tag, model and dataset names, epoch, cur_step, best valid score,
  train_method, whether the state dict is partial (``checkpoint_state_dict``), the
  optimizer's param groups and non-tensor state, and RecBole's ``other_parameter``
  when it is JSON-serialisable;
* ``<stem>.optim.safetensors`` (optional): the optimizer's tensor state
  (``state.<param index>.<name>``).

Nothing is ever unpickled: :func:`load_checkpoint` reads safetensors and JSON only.
"""

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

FORMAT = "recbole-eisam-checkpoint"
VERSION = 1
SUFFIX = ".safetensors"


def paths(model_file):
    """``(tensor file, JSON sidecar, optimizer tensor file)`` of a checkpoint path."""
    stem = str(model_file)
    for suffix in (SUFFIX, ".pth", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + SUFFIX, stem + ".json", stem + ".optim" + SUFFIX


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


def save_checkpoint(model_file, tensors, meta, optimizer=None):
    """Write the tensors (safetensors), the sidecar JSON and optionally the optimizer state."""
    tensor_file, json_file, optim_file = paths(model_file)
    os.makedirs(os.path.dirname(os.path.abspath(tensor_file)), exist_ok=True)
    meta = dict(meta, format=FORMAT, version=VERSION)
    if "best_valid_score" in meta:
        meta["best_valid_score"] = _json_float(meta["best_valid_score"])
    save_file(_tensors_for_safetensors(tensors), tensor_file)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_safe(optimizer)
        save_file(_tensors_for_safetensors(opt_tensors), optim_file)
        meta["optimizer"] = opt_meta
    elif os.path.exists(optim_file):
        os.remove(optim_file)
    with open(json_file, "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return tensor_file


def load_checkpoint(model_file, device="cpu", expect_model=None, expect_dataset=None):
    """Read ``(tensors, meta, optimizer_state_or_None)``; refuse pickles and foreign checkpoints.

    Raises:
        ValueError: for a pickled ``.pth`` file, a file that is not ours, or a checkpoint of
            another model or dataset than ``expect_model`` / ``expect_dataset``.
    """
    tensor_file, json_file, optim_file = paths(model_file)
    if not (os.path.exists(tensor_file) and os.path.exists(json_file)):
        if str(model_file).endswith(".pth") and os.path.exists(str(model_file)):
            raise ValueError(
                f"{model_file} is a pickled RecBole checkpoint; recbole-eisam loads only its "
                "own safetensors checkpoints (never unpickles). Re-train to get one."
            )
        raise FileNotFoundError(
            f"no checkpoint at {tensor_file} (+ {os.path.basename(json_file)})."
        )
    with open(json_file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_file} is not a {FORMAT} sidecar.")
    for key, expected in (("model", expect_model), ("dataset", expect_dataset)):
        if expected is not None and str(meta.get(key)).lower() != str(expected).lower():
            raise ValueError(
                f"checkpoint {tensor_file} was trained for {key} {meta.get(key)!r}, not "
                f"{expected!r}; load it with the same model and dataset it was trained on."
            )
    if isinstance(meta.get("best_valid_score"), str):
        meta["best_valid_score"] = float(meta["best_valid_score"])
    tensors = load_file(tensor_file, device=str(device))
    opt_state = None
    if "optimizer" in meta:
        opt_tensors = load_file(optim_file, device=str(device)) if os.path.exists(optim_file) else {}
        opt_state = optimizer_from_safe(opt_tensors, meta["optimizer"])
    return tensors, meta, opt_state
