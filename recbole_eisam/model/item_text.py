"""Item texts, prompts built from cached token ids, and the on-disk item-encoding cache.

* :func:`extract_item_texts` recovers each item's text from RecBole's item features
  (``token_seq`` fields are stored as id sequences and mapped back through
  ``dataset.field2id_token``).
* :class:`PromptBuilder` tokenizes every item once and builds each batch's prompts by
  concatenating cached token ids (prompt prefix, the history items, prompt suffix), packed
  to the left and right-padded to the batch's longest prompt, so the hidden state at
  ``lengths - 1`` is each sequence's real last token. No tokenizer call per batch.
* :func:`encode_items` / :func:`load_or_encode_items`: the frozen base model's encoding of
  every item text, cached on disk under a key that hashes everything it depends on.
"""

import hashlib
import json
import os

import numpy as np
import torch
from recbole.utils import FeatureType
from torch import nn

CACHE_VERSION = 1


def check_item_text_fields(dataset, fields):
    """Raise a one-sentence ``ValueError`` when a field of ``fields`` is not an item feature."""
    item_feat = getattr(dataset, "item_feat", None)
    have = [] if item_feat is None else list(item_feat.columns)
    name = getattr(dataset, "dataset_name", None) or "dataset"
    folder = getattr(dataset, "dataset_path", None) or "its data_path"
    for field in fields:
        if field in have:
            continue
        if item_feat is None:
            raise ValueError(
                f"Item text field {field!r} (item_text_fields) cannot be read: dataset {name!r} has "
                f"no item features (fields []); put a {name}.item file in {folder!r} and load it "
                f"through load_col: {{item: [...]}}."
            )
        raise ValueError(
            f"Item text field {field!r} (item_text_fields) is not among the dataset's item "
            f"fields {have}; load it through load_col: {{item: [...]}} or change item_text_fields."
        )


def extract_item_texts(dataset, fields, separator=", "):
    """Text of every internal item id (index 0, the padding item, is ``""``).

    Args:
        dataset: a RecBole dataset whose ``item_feat`` holds ``fields``.
        fields (list[str]): item fields joined (in this order) into the item text.
        separator (str): string placed between the fields' texts.
    """
    if isinstance(fields, str):
        fields = [fields]
    check_item_text_fields(dataset, fields)
    item_feat = dataset.item_feat

    n_items = dataset.item_num
    columns = []
    for field in fields:
        values = item_feat[field]
        ftype = dataset.field2type[field]
        if ftype in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ):
            vocab = np.asarray(dataset.field2id_token[field], dtype=object).copy()
            vocab[0] = ""  # padding id 0 / [PAD]
            ids = values.cpu().numpy()
            if ids.ndim == 1:
                col = [str(vocab[i]) for i in ids]
            else:
                col = [" ".join(str(vocab[i]) for i in row if i != 0) for row in ids]
        elif ftype == FeatureType.FLOAT:
            col = [f"{float(v):g}" for v in values.cpu().numpy()]
        else:  # FLOAT_SEQ
            col = [" ".join(f"{float(v):g}" for v in row if v != 0) for row in values.cpu().numpy()]
        columns.append(col)
    texts = [""] * n_items
    for i in range(1, min(n_items, len(columns[0]))):
        parts = [c[i].strip() for c in columns if c[i].strip() and c[i].strip() != "[PAD]"]
        texts[i] = separator.join(parts)
    return texts


def _split_template(template, placeholder):
    if template.count(placeholder) != 1:
        raise ValueError(f"The template {template!r} must contain {placeholder} exactly once.")
    return template.split(placeholder)


def _tokenize(tokenizer, texts):
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _padded(rows, max_len=None, pad=0):
    n = max((len(r) for r in rows), default=0) if max_len is None else max_len
    ids = torch.full((len(rows), max(n, 1)), pad, dtype=torch.long)
    lens = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:n]
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        lens[i] = len(r)
    return ids, lens


def length_buckets(config):
    """``prompt_length_buckets`` of ``config``, checked (at least 1)."""
    k = int(config["prompt_length_buckets"])
    if k < 1:
        raise ValueError(f"prompt_length_buckets must be at least 1, got {k}.")
    return k


def length_groups(lengths, k):
    """Rows of a right-padded batch in ``k`` groups of similar length: ``[(rows, width)]`` with
    ``width`` the group's longest length, so that each group can be cut to ``[:, :width]``. Rows
    are sorted by length, stably (two passes over one batch group it alike); with ``k`` 1, one
    group of every row in batch order. A right-padded, causal sequence's states do not depend on
    the padding after it, so the groups give the states of the whole batch."""
    order = torch.argsort(lengths, stable=True) if k > 1 else torch.arange(lengths.numel(), device=lengths.device)
    return [(rows, int(lengths[rows].max())) for rows in order.chunk(min(k, lengths.numel()))]


def pack_right(pieces, masks):
    """Concatenate token pieces, move real tokens to the left, cut to the longest row.

    Args:
        pieces (list[Tensor]): ``[B, n_k]`` id tensors, in prompt order.
        masks (list[Tensor]): matching boolean masks of real tokens.

    Returns:
        tuple: ``(input_ids [B, L], attention_mask [B, L], lengths [B])``, right-padded with
        ``L`` the longest row of the batch.
    """
    ids = torch.cat(pieces, dim=1)
    mask = torch.cat(masks, dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    ids = ids.gather(1, order)
    mask = mask.gather(1, order)
    lengths = mask.sum(dim=1)
    width = max(int(lengths.max()), 1)
    ids, mask = ids[:, :width], mask[:, :width]
    return ids * mask, mask.long(), lengths


class PromptBuilder(nn.Module):
    """History prompts assembled from token ids cached once per item.

    ``prompt_template`` contains ``{history}`` once; ``history_item_template`` contains
    ``{item}`` once and is rendered and tokenized once per item (then truncated to
    ``max_item_tokens``). A batch's prompt is ``prefix + item_1 + ... + item_h + suffix``,
    the user's last ``max_history_items`` items, oldest first and newest last.
    """

    def __init__(self, tokenizer, item_texts, prompt_template, history_item_template,
                 max_history_items, max_item_tokens):
        super().__init__()
        prefix, suffix = _split_template(prompt_template, "{history}")
        _split_template(history_item_template, "{item}")
        self.max_history_items = int(max_history_items)
        self.prompt_template = prompt_template
        self.history_item_template = history_item_template
        pre, suf = _tokenize(tokenizer, [prefix, suffix]) if (prefix or suffix) else ([], [])
        pre = pre if prefix else []
        suf = suf if suffix else []
        rendered = [history_item_template.replace("{item}", t) if t else "" for t in item_texts]
        rows = _tokenize(tokenizer, rendered)
        rows = [r if t else [] for r, t in zip(rows, item_texts)]
        item_ids, item_len = _padded(rows, None if not max_item_tokens else int(max_item_tokens))
        self.register_buffer("prefix_ids", torch.as_tensor(pre, dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.as_tensor(suf, dtype=torch.long), persistent=False)
        self.register_buffer("item_token_ids", item_ids, persistent=False)
        self.register_buffer("item_token_len", item_len, persistent=False)

    def history(self, item_seq, item_seq_len):
        """The last ``max_history_items`` items of each sequence, ``[B, h]``, 0 where absent."""
        h = self.max_history_items
        pos = item_seq_len.view(-1, 1) - h + torch.arange(h, device=item_seq.device).view(1, -1)
        valid = (pos >= 0) & (pos < item_seq.size(1))
        items = item_seq.gather(1, pos.clamp(0, item_seq.size(1) - 1))
        return items * valid

    def forward(self, item_seq, item_seq_len, return_items=False):
        """``(input_ids, attention_mask, lengths)`` of the batch's prompts (right-padded).

        With ``return_items``, a fourth tensor ``[B, L]`` gives the item id each token
        belongs to (0 for the template's own tokens and for padding).
        """
        hist = self.history(item_seq, item_seq_len)  # [B, h]
        B = hist.size(0)
        tok = self.item_token_ids[hist]  # [B, h, T]
        T = tok.size(-1)
        tmask = torch.arange(T, device=hist.device).view(1, 1, T) < self.item_token_len[hist].unsqueeze(-1)
        pieces = [tok.reshape(B, -1)]
        owners = [hist.unsqueeze(-1).expand(-1, -1, T).reshape(B, -1)]
        masks = [tmask.reshape(B, -1)]
        for ids, at_start in ((self.prefix_ids, True), (self.suffix_ids, False)):
            if ids.numel():
                where = 0 if at_start else len(pieces)
                pieces.insert(where, ids.expand(B, -1))
                owners.insert(where, torch.zeros(B, ids.numel(), dtype=hist.dtype, device=hist.device))
                masks.insert(where, torch.ones(B, ids.numel(), dtype=torch.bool, device=hist.device))
        packed = pack_right(pieces, masks)
        if not return_items:
            return packed
        items, _, _ = pack_right(owners, masks)  # same masks, so the same token order
        return packed + (items,)

    def decode(self, tokenizer, input_ids, lengths):
        """The prompt texts of a batch (for logs and tests)."""
        return [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(input_ids, lengths)]


def tokenize_item_prompts(tokenizer, item_texts, item_prompt_template, max_item_tokens=None):
    """Token ids of every item's encoding prompt and the mask of its item-text tokens.

    The item text's tokens are found through the fast tokenizer's offsets (all tokens when
    offsets are unavailable); they are the ones mean-pooled by :func:`encode_items`.
    """
    prefix, _ = _split_template(item_prompt_template, "{item}")
    rendered = [item_prompt_template.replace("{item}", t) for t in item_texts]
    spans = [(len(prefix), len(prefix) + len(t)) for t in item_texts]
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        enc = tokenizer(rendered, add_special_tokens=False)
        offsets = None
    rows, span_rows = [], []
    limit = None
    if max_item_tokens:
        limit = int(max_item_tokens) + len(_tokenize(tokenizer, [item_prompt_template.replace("{item}", "")])[0])
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)[:limit] if limit else list(ids)
        if offsets is None:
            span = [1] * len(ids)
        else:
            s, e = spans[i]
            span = [1 if (a < e and b > s) else 0 for a, b in offsets[i][: len(ids)]]
            if not any(span):
                span = [1] * len(ids)
        rows.append(ids)
        span_rows.append(span)
    ids, lens = _padded(rows)
    span, _ = _padded(span_rows, ids.size(1))
    return ids, lens, span.bool()


@torch.no_grad()
def encode_items(model, ids, lens, span, pooling="mean", batch_size=128, device="cpu",
                 show_progress=False):
    """Hidden states of the item prompts, pooled: ``[n_items, H]`` float32 (row 0 is zeros)."""
    n = ids.size(0)
    out = None
    order = torch.argsort(lens, descending=True)  # similar lengths together: less padding
    starts = range(0, n, batch_size)
    if show_progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="Encoding item texts", total=(n + batch_size - 1) // batch_size)
    for s in starts:
        idx = order[s : s + batch_size]
        width = max(int(lens[idx].max()), 1)
        x = ids[idx, :width].to(device)
        am = (torch.arange(width).view(1, -1) < lens[idx].view(-1, 1)).long().to(device)
        hidden = model(input_ids=x, attention_mask=am).last_hidden_state.float()
        if pooling == "last":
            pooled = hidden[torch.arange(len(idx)), (lens[idx] - 1).clamp(min=0).to(device)]
        else:
            w = (span[idx, :width] & am.bool().cpu()).float().to(device).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        if out is None:
            out = torch.zeros(n, hidden.size(-1))
        out[idx] = pooled.cpu()
    out[lens == 0] = 0.0
    return out


def cache_key(parts):
    """Hex digest of a JSON-serialisable description of everything an encoding depends on."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def load_or_encode_items(cache_dir, key_parts, encode_fn, logger=None):
    """Return ``(encodings, path, hit)``: read ``cache_dir/item_enc_<key>.safetensors`` or
    compute ``encode_fn()`` and write it (atomically)."""
    from safetensors.torch import load_file, save_file

    key = cache_key(dict(key_parts, cache_version=CACHE_VERSION))
    path = os.path.join(cache_dir, f"item_enc_{key}.safetensors")
    if os.path.isfile(path):
        try:
            enc = load_file(path)["item_encodings"]
            if logger is not None:
                logger.info(f"LLMRec: item encodings read from the cache {path}")
            return enc, path, True
        except Exception as err:  # a truncated file: recompute
            if logger is not None:
                logger.warning(f"LLMRec: unreadable item-encoding cache {path} ({err}); recomputing")
    enc = encode_fn().contiguous()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({"item_encodings": enc}, tmp, metadata={"key": key})
    os.replace(tmp, path)
    if logger is not None:
        logger.info(f"LLMRec: item encodings written to the cache {path}")
    return enc, path, False
