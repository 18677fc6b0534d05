"""The per-sample loss protocol that EISAM needs, and adapters for RecBole's own models.

EISAM weights every training sample by its target item, so it needs the vector of
per-sample losses, not RecBole's scalar ``calculate_loss``. The protocol is one method::

    model.calculate_logits(interaction) -> (logits FloatTensor[M, n_items], target LongTensor[M])

the *training* logits over all items and the target item of each of the ``M`` samples of the
batch (``M`` = batch size for SASRec-like models, the number of masked positions for
BERT4Rec). A model may return a third element, a scalar regulariser that belongs to the
plain loss ``L`` only (it is added to the batch mean, never weighted, never perturbed).
The trainer turns logits into losses with :func:`per_sample_losses`
(``F.cross_entropy(logits + tau * log_prior, target, reduction="none")`` on the
logit-adjusted base loss, Menon et al. 2021; plain cross-entropy otherwise).

A model that scores items by something other than one logit per item (a model that writes the
next item's tokens, :class:`~recbole_eisam.model.LLMRecGen`) gives the losses themselves::

    model.calculate_sample_losses(interaction, tau=0.0) -> (losses FloatTensor[M], target LongTensor[M])

with ``tau`` the train-time logit adjustment's strength, which the model applies in its own
form. :func:`get_losses_fn` gives the trainer one function for both protocols.

RecBole's own CE sequential models do not define ``calculate_logits``; :data:`ADAPTERS`
maps their class names to functions ``fn(model, interaction)`` with the same contract,
each a line-for-line copy of the model's ``calculate_loss`` CE branch (a test checks that
the mean of the per-sample losses plus the regulariser equals ``calculate_loss``).

Not supported, and why (:data:`UNSUPPORTED`):
"""

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- adapters


def _generic(model, interaction):
    """``forward(item_seq, item_seq_len)`` then a dot product with ``item_embedding``."""
    seq_output = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    logits = torch.matmul(seq_output, model.item_embedding.weight.transpose(0, 1))
    return logits, interaction[model.POS_ITEM_ID]


def _gcsan(model, interaction):
    logits, target = _generic(model, interaction)
    return logits, target, model.reg_weight * model.reg_loss(model.item_embedding.weight)


def _caser_regularizer(model):
    """Caser's own regulariser, as its ``calculate_loss`` adds it."""
    weights = [model.user_embedding.weight, model.item_embedding.weight, model.conv_v.weight,
               model.fc1.weight, model.fc2.weight]
    return model.reg_weight * model.reg_loss(weights) + model.reg_loss_conv_h()


def _caser(model, interaction):
    seq_output = model.forward(interaction[model.USER_ID], interaction[model.ITEM_SEQ])
    logits = torch.matmul(seq_output, model.item_embedding.weight.transpose(0, 1))
    return logits, interaction[model.POS_ITEM_ID], _caser_regularizer(model)


def _nextitnet(model, interaction):
    seq_output = model.forward(interaction[model.ITEM_SEQ])
    logits = torch.matmul(seq_output, model.item_embedding.weight.transpose(0, 1))
    reg = model.reg_loss([model.item_embedding.weight, model.final_layer.weight])
    return logits, interaction[model.POS_ITEM_ID], model.reg_weight * reg + model.reg_loss_rb()


def _core(model, interaction):
    seq_output = model.forward(interaction[model.ITEM_SEQ])
    all_item_emb = F.normalize(model.item_dropout(model.item_embedding.weight), dim=-1)
    logits = torch.matmul(seq_output, all_item_emb.transpose(0, 1)) / model.temperature
    return logits, interaction[model.POS_ITEM_ID]


def _bert4rec(model, interaction):
    """Masked positions only; like RecBole, a position is a sample when its index is > 0."""
    masked_item_seq = interaction[model.MASK_ITEM_SEQ]
    pos_items = interaction[model.POS_ITEMS]
    masked_index = interaction[model.MASK_INDEX]
    seq_output = model.forward(masked_item_seq)  # [B L H]
    keep = masked_index > 0  # [B mask_len]
    rows = torch.arange(masked_index.size(0), device=masked_index.device)
    rows = rows.unsqueeze(1).expand_as(masked_index)[keep]
    hidden = seq_output[rows, masked_index[keep]]  # [M H]
    item_emb = model.item_embedding.weight[: model.n_items]
    logits = torch.matmul(hidden, item_emb.transpose(0, 1)) + model.output_bias
    return logits, pos_items[keep]


ADAPTERS = {
    "SASRec": _generic,
    "GRU4Rec": _generic,
    "NARM": _generic,
    "STAMP": _generic,
    "SRGNN": _generic,
    "LightSANs": _generic,
    "SASRecF": _generic,
    "GRU4RecF": _generic,
    "FDSA": _generic,
    "GCSAN": _gcsan,
    "Caser": _caser,
    "NextItNet": _nextitnet,
    "CORE": _core,
    "BERT4Rec": _bert4rec,
}

UNSUPPORTED = {
    "FPMC": "pairwise BPR model (no full softmax over items)",
    "TransRec": "pairwise BPR model with translation distances (no full softmax)",
    "DIN": "point-wise CTR model (binary labels, no next-item softmax)",
    "DIEN": "point-wise CTR model (binary labels, no next-item softmax)",
    "RepeatNet": "outputs a repeat/explore probability mixture with a joint auxiliary loss",
    "FEARec": "its loss adds batch-level contrastive terms that are not per-sample",
    "S3Rec": "pre-training stage has self-supervised losses; fine-tuning is not adapted yet",
    "SASRecCPR": "softmax-CPR mixture head, not a plain logit matrix",
    "GRU4RecCPR": "softmax-CPR mixture head, not a plain logit matrix",
    "GRU4RecKG": "knowledge-graph model, not adapted (needs KG data to test)",
    "KSR": "knowledge-graph model, not adapted (needs KG data to test)",
    "SINE": "multi-interest model with a regulariser on a non-CE branch; not adapted",
    "HGN": "its regulariser depends on the batch's positive items; not adapted",
    "HRM": "not adapted yet",
    "SHAN": "its regulariser depends on the batch's positive items; not adapted",
    "NPE": "not adapted yet",
    "FOSSIL": "its regulariser depends on the batch's positive items; not adapted",
}

__doc__ += "".join(f"\n* ``{k}``: {v}." for k, v in UNSUPPORTED.items())
__doc__ += (
    "\n\nNon-sequential models (``Pop``, ``BPR``...) and any model trained with a loss_type "
    "other than ``CE`` have no per-sample CE losses either."
)

# ---------------------------------------------------------------------------- protocol


def unsupported_reason(model):
    """``None`` if ``model`` gives per-sample CE losses, else one sentence saying why not."""
    name = type(model).__name__
    if hasattr(model, "calculate_logits") or hasattr(model, "calculate_sample_losses"):
        return None
    if name in ADAPTERS:
        loss_type = getattr(model, "loss_type", "CE")
        if loss_type != "CE":
            return f"{name} is trained with loss_type={loss_type}; set loss_type: CE"
        return None
    why = UNSUPPORTED.get(name, "it defines no calculate_logits(interaction) method")
    return (
        f"{name} gives no per-sample cross-entropy losses ({why}); use a supported model "
        f"({', '.join(sorted(ADAPTERS))}) or implement "
        f"{name}.calculate_logits(interaction) -> (logits[M, n_items], target[M])"
    )


def get_logits_fn(model):
    """``fn(interaction) -> (logits, target[, extra])`` for ``model``, or ``None`` if unsupported
    (or if the model gives its losses through ``calculate_sample_losses`` instead)."""
    if unsupported_reason(model) is not None or not (hasattr(model, "calculate_logits") or type(model).__name__ in ADAPTERS):
        return None
    if hasattr(model, "calculate_logits"):
        return model.calculate_logits
    adapter = ADAPTERS[type(model).__name__]
    return lambda interaction: adapter(model, interaction)


def get_losses_fn(model):
    """``fn(interaction, log_prior, tau) -> (l [M], target [M], extra or None)`` for ``model``, or
    ``None`` if it gives no per-sample losses."""
    if hasattr(model, "calculate_sample_losses"):
        def from_model(interaction, log_prior=None, tau=0.0):
            out = model.calculate_sample_losses(interaction, tau=tau)
            return out[0], out[1], (out[2] if len(out) > 2 else None)

        return from_model
    logits_fn = get_logits_fn(model)
    if logits_fn is None:
        return None

    def from_logits(interaction, log_prior=None, tau=0.0):
        out = logits_fn(interaction)
        return per_sample_losses(out[0], out[1], log_prior, tau), out[1], (out[2] if len(out) > 2 else None)

    return from_logits


def per_sample_losses(logits, target, log_prior=None, tau=0.0):
    """``l_j = CE(logits_j + tau * log_prior, y_j)`` for every sample, as a float vector [M].

    The logit-adjusted loss (``tau > 0``, Menon et al., ICLR 2021) adds the scaled log
    prior to the *training* logits only and predicts with the raw logits: the model must
    beat the prior's head start on popular items, so it learns less of the prior. (The
    post-hoc form subtracts it at prediction instead: ``EISAMTrainer``'s evaluation.)
    """
    if log_prior is not None and tau:
        if logits.size(-1) != log_prior.numel():
            raise ValueError(
                f"logit adjustment: the model gives {logits.size(-1)} logits per sample but "
                f"the training split has {log_prior.numel()} items."
            )
        logits = logits + tau * log_prior.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, reduction="none")


# ---------------------------------------------------------------------------- head split
#
# ``eisam_scope: head`` perturbs only the parameters after the backbone, so it needs the
# forward pass cut in two (docs/EISAM.md, "Where the perturbation lives"):
#
#     encode(interaction) -> (hidden [M, H], target [M], extra or None)     the backbone
#     score(hidden)       -> logits [M, n_items]                             the head
#
# ``score`` reads the head tensors from the model *at call time* (``model.<name>``), so the
# trainer can evaluate it at head + e with ``torch.func.functional_call`` without touching
# the parameters in place. ``extra`` is the regulariser of the plain loss L (as in the
# per-sample protocol); it never depends on e.
#
# A model opts in with three methods: ``encode_sequence(interaction) -> hidden``,
# ``score(hidden) -> logits`` and ``head_parameters()`` (LLMRec does); the target is
# ``interaction[model.POS_ITEM_ID]``. RecBole's own models get :data:`SPLIT_ADAPTERS`:
# the backbone is the model's ``forward`` (the sequence representation ``seq_output``), the
# head the dot product with the item embedding matrix.
#
# NOTE: in RecBole's models the item embedding is *tied*: the same matrix ``E`` is the
# input lookup of the backbone and the output layer. The head scope perturbs only its
# OUTPUT use, ``logits = h @ (E + e_E)^T``, while the input lookup keeps ``E``; ``g_w`` is
# likewise the gradient through the output use only. The update of ``E`` still sums the
# gradients of both uses.


def _split_generic(model):
    def encode(interaction):
        seq_output = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
        return seq_output, interaction[model.POS_ITEM_ID], None

    return encode, _dot_item_embedding(model), ["item_embedding.weight"]


def _dot_item_embedding(model):
    return lambda hidden: torch.matmul(hidden, model.item_embedding.weight.transpose(0, 1))


def _split_gcsan(model):
    def encode(interaction):
        seq_output = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
        extra = model.reg_weight * model.reg_loss(model.item_embedding.weight)
        return seq_output, interaction[model.POS_ITEM_ID], extra

    return encode, _dot_item_embedding(model), ["item_embedding.weight"]


def _split_caser(model):
    def encode(interaction):
        seq_output = model.forward(interaction[model.USER_ID], interaction[model.ITEM_SEQ])
        return seq_output, interaction[model.POS_ITEM_ID], _caser_regularizer(model)

    return encode, _dot_item_embedding(model), ["item_embedding.weight"]


def _split_nextitnet(model):
    def encode(interaction):
        seq_output = model.forward(interaction[model.ITEM_SEQ])
        reg = model.reg_loss([model.item_embedding.weight, model.final_layer.weight])
        return seq_output, interaction[model.POS_ITEM_ID], model.reg_weight * reg + model.reg_loss_rb()

    return encode, _dot_item_embedding(model), ["item_embedding.weight"]


def _split_core(model):
    def encode(interaction):
        return model.forward(interaction[model.ITEM_SEQ]), interaction[model.POS_ITEM_ID], None

    def score(hidden):
        all_item_emb = F.normalize(model.item_dropout(model.item_embedding.weight), dim=-1)
        return torch.matmul(hidden, all_item_emb.transpose(0, 1)) / model.temperature

    return encode, score, ["item_embedding.weight"]


def _split_bert4rec(model):
    def encode(interaction):
        masked_index = interaction[model.MASK_INDEX]
        seq_output = model.forward(interaction[model.MASK_ITEM_SEQ])  # [B L H]
        keep = masked_index > 0
        rows = torch.arange(masked_index.size(0), device=masked_index.device)
        rows = rows.unsqueeze(1).expand_as(masked_index)[keep]
        return seq_output[rows, masked_index[keep]], interaction[model.POS_ITEMS][keep], None

    def score(hidden):
        item_emb = model.item_embedding.weight[: model.n_items]
        return torch.matmul(hidden, item_emb.transpose(0, 1)) + model.output_bias

    return encode, score, ["item_embedding.weight", "output_bias"]


SPLIT_ADAPTERS = {
    **{name: _split_generic for name, fn in ADAPTERS.items() if fn is _generic},
    "GCSAN": _split_gcsan,
    "Caser": _split_caser,
    "NextItNet": _split_nextitnet,
    "CORE": _split_core,
    "BERT4Rec": _split_bert4rec,
}


class _ScoreCall(torch.nn.Module):
    """``score(hidden)`` as a module call, so that ``functional_call`` can swap the head tensors."""

    def __init__(self, model, score):
        super().__init__()
        self.model = model
        self.score_fn = score

    def forward(self, hidden):
        return self.score_fn(hidden)


class HeadSplit:
    """A model's forward cut into backbone and head (see the comment block above).

    Attributes:
        encode: ``fn(interaction) -> (hidden, target, extra or None)``.
        score: ``fn(hidden) -> logits``, reading the head tensors from the model at call time.
        head_names: names (as in ``model.named_parameters()``) of the trainable head tensors.
    """

    def __init__(self, model, encode, score, head_names):
        self.encode, self.score, self.head_names = encode, score, list(head_names)
        self._call = _ScoreCall(model, score)

    def score_with(self, hidden, head_tensors):
        """``score(hidden)`` with the head tensors replaced by ``head_tensors`` (name -> tensor),
        functionally: the model's parameters are neither changed nor copied."""
        tensors = {f"model.{name}": t for name, t in head_tensors.items()}
        return torch.func.functional_call(self._call, tensors, (hidden,))


def head_split_reason(model):
    """``None`` if ``model`` can be trained with ``eisam_scope: head``, else one sentence why not."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    name = type(model).__name__
    if not all(hasattr(model, m) for m in ("encode_sequence", "score", "head_parameters")):
        if name not in SPLIT_ADAPTERS or hasattr(model, "calculate_logits"):
            return (
                f"{name} does not say where its backbone ends: define encode_sequence(interaction) "
                "-> hidden, score(hidden) -> logits and head_parameters(), or use eisam_scope: all"
            )
    if not get_head_split(model, check=False).head_names:
        return f"{name} has no trainable head parameters; use eisam_scope: all"
    return None


def get_head_split(model, check=True):
    """The :class:`HeadSplit` of ``model``; raises ``ValueError`` when it has none."""
    if check:
        reason = head_split_reason(model)
        if reason is not None:
            raise ValueError(f"eisam_scope=head needs a backbone/head split, but {reason}.")
    if all(hasattr(model, m) for m in ("encode_sequence", "score", "head_parameters")):
        names = {id(p): n for n, p in model.named_parameters()}
        head_names = [names[id(p)] for p in model.head_parameters() if p.requires_grad]

        def encode(interaction):
            return model.encode_sequence(interaction), interaction[model.POS_ITEM_ID], None

        return HeadSplit(model, encode, model.score, head_names)
    encode, score, head_names = SPLIT_ADAPTERS[type(model).__name__](model)
    params = dict(model.named_parameters())
    return HeadSplit(model, encode, score, [n for n in head_names if n in params and params[n].requires_grad])
