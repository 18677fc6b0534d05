"""
LLMRec
################################################

An LLM-based sequential recommender: a (LoRA-tuned) large language model reads the user's
recent items as text and its last hidden state scores every item.

Reference:
    Zhang et al. "Taming the Long Tail: Efficient Item-wise Sharpness-Aware Minimization
    for LLM-based Recommender Systems." arXiv 2603.12752, 2026 (the LRS setting EISAM is
    built for).

Reference:
    Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models." in ICLR 2022.

Reference:
    Li et al. "E4SRec: An Elegant Effective Efficient Extensible Solution of Large Language
    Models for Sequential Recommendation." in WWW 2024 (LLM hidden state + item head over
    all items, trained with cross-entropy).
"""

import os
from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_eisam.model import item_text as it
from recbole_eisam.model.llm_backbone import load_backbone_from_config
from recbole_eisam.model.state_cache import PromptStateCache
from recbole_eisam.utils.longtail import item_counts


class LLMRec(SequentialRecommender):
    r"""LLMRec renders the user's history as a text prompt, pools the LLM's hidden states
    (``user_pooling``: the mean over the prompt's tokens, or its last token) and scores all
    items against an item representation matrix.

    * Backbone (:meth:`encode_sequence`): a local Hugging Face / GGUF causal LM (default
      SmolLM2-135M-Instruct), cut to its first ``llm_num_layers`` decoder layers, frozen,
      with LoRA adapters (PEFT). The prompt ``prompt_template`` holds the user's last
      ``max_history_items`` item texts, oldest first and newest last; the target item is
      never part of it (RecBole's ``ITEM_SEQ`` holds only the items before it). Prompts are
      assembled from token ids cached per item and right-padded, so the read hidden state is
      each prompt's real last token. With ``item_id_tokens`` each history item's tokens also
      carry a trainable embedding of the item's ID mapped into the token-embedding space
      (collaborative tokens, as CoLLM and LLaRA put ID embeddings into the prompt); the map
      starts at zero, so training starts from the text prompt alone.
    * Head (:meth:`score`): ``user = W_u LN(h)`` and, for every item ``i``,
      ``item_i = W_i e_i (+ E[i])`` where ``e_i`` is the frozen base model's mean-pooled
      encoding of the item text (computed once, cached on disk) and ``E`` an optional
      trainable ID embedding; ``logits = user @ item^T + b`` with an optional item bias ``b``
      initialised to the training split's log item prior (``item_bias``).
    * Loss: softmax cross-entropy over all items; :meth:`calculate_logits` exposes the
      per-sample logits that EISAM's per-sample losses are built from.

    NOTE:
        Only the LoRA adapters, the ID tokens' embedding and map, and the head are trainable;
        :meth:`checkpoint_state_dict` returns exactly those tensors, so a checkpoint is
        megabytes, not the whole LLM.
    """

    HEAD_MODULES = ("user_norm", "user_proj", "item_proj", "item_embedding", "item_bias", "head_dropout")

    def __init__(self, config, dataset):
        super(LLMRec, self).__init__(config, dataset)
        self.logger = getLogger()

        # load parameters info
        self.loss_type = config["loss_type"]
        if self.loss_type != "CE":
            raise NotImplementedError("LLMRec is trained with loss_type: CE (softmax over all items).")
        self.item_text_fields = list(config["item_text_fields"])
        self.item_text_separator = str(config["item_text_separator"])
        self.max_history_items = int(config["max_history_items"])
        self.max_item_tokens = config["max_item_tokens"]
        self.prompt_template = str(config["prompt_template"])
        self.history_item_template = str(config["history_item_template"])
        self.item_prompt_template = str(config["item_prompt_template"])
        self.item_pooling = str(config["item_pooling"])
        if self.item_pooling not in ("mean", "last"):
            raise ValueError(f"item_pooling must be 'mean' or 'last', got {self.item_pooling!r}.")
        self.user_pooling = str(config["user_pooling"])
        if self.user_pooling not in ("mean", "last"):
            raise ValueError(f"user_pooling must be 'mean' or 'last', got {self.user_pooling!r}.")
        self.use_item_id_embedding = bool(config["item_id_embedding"])
        self.use_item_bias = bool(config["item_bias"])
        self.use_item_id_tokens = bool(config["item_id_tokens"])
        self.llm_frozen = bool(config["llm_frozen"])
        self.attn_implementation = config["llm_attn_implementation"]
        self.prompt_length_buckets = it.length_buckets(config)
        if self.llm_frozen and self.use_item_id_tokens:
            raise ValueError(
                "llm_frozen=True computes each prompt's state once with the frozen LLM, so the prompt "
                "cannot hold trainable ID embeddings: set item_id_tokens: False."
            )
        self.projection_size = int(config["projection_size"])
        self.head_dropout_prob = float(config["head_dropout"])
        self.show_progress = bool(config["show_progress"])
        self.dataset_name = str(config["dataset"])
        self.llm_cache_dir = str(config["llm_cache_dir"] or os.path.join(str(config["checkpoint_dir"]), "llm_cache"))

        # item texts (raises a one-sentence ValueError for a missing field)
        self.item_texts = it.extract_item_texts(dataset, self.item_text_fields, self.item_text_separator)

        # define the backbone: frozen base LLM (first llm_num_layers layers) + LoRA adapters
        self.backbone, self.tokenizer, self.backbone_info = load_backbone_from_config(
            config, self.device, lora=not self.llm_frozen
        )
        self.hidden_size = self.backbone_info["hidden_size"]

        # prompts from token ids cached once per item
        self.prompt_builder = it.PromptBuilder(
            self.tokenizer,
            self.item_texts,
            self.prompt_template,
            self.history_item_template,
            self.max_history_items,
            self.max_item_tokens,
        )

        # item representations: the frozen base model's encoding of each item text (cached)
        self.item_encode_batch_size = int(config["item_encode_batch_size"])
        encodings, self.item_cache_path, self.item_cache_hit = self._item_encodings(self.item_encode_batch_size)
        real = encodings[1:]
        center = real.mean(0, keepdim=True)
        scale = (real - center).pow(2).sum(1).mean().sqrt().clamp(min=1e-6)
        normed = (encodings - center) / scale
        normed[0] = 0.0
        self.register_buffer("item_text_emb", normed.float(), persistent=False)

        # define the head
        self.user_norm = nn.LayerNorm(self.hidden_size)
        self.head_dropout = nn.Dropout(self.head_dropout_prob)
        self.user_proj = nn.Linear(self.hidden_size, self.projection_size)
        self.item_proj = nn.Linear(self.hidden_size, self.projection_size, bias=False)
        if self.use_item_id_embedding:
            self.item_embedding = nn.Embedding(self.n_items, self.projection_size, padding_idx=0)
            nn.init.normal_(self.item_embedding.weight, std=0.02)
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        else:
            self.item_embedding = None
        if self.use_item_id_tokens:
            # collaborative input: each history item's tokens also get a trainable embedding
            # of the item's ID, mapped into the LLM's token-embedding space. The map starts at
            # zero, so training starts from the plain text prompt. Backbone side: it changes
            # what the LLM reads, so head scope never perturbs it.
            self.history_id_embedding = nn.Embedding(self.n_items, self.projection_size, padding_idx=0)
            nn.init.normal_(self.history_id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.history_id_embedding.weight[0].zero_()
            self.history_id_proj = nn.Linear(self.projection_size, self.hidden_size, bias=False)
            nn.init.zeros_(self.history_id_proj.weight)
        if self.use_item_bias:
            # output bias initialised to the log prior of the training split ("init well"):
            # training starts from popularity and learns the personal part on top of it
            counts = item_counts(dataset, self.n_items).float()
            prior = torch.log((counts + 1.0) / (counts + 1.0).sum())
            self.item_bias = nn.Parameter(prior - prior[1:].mean())
        else:
            self.item_bias = None
        self.loss_fct = nn.CrossEntropyLoss()
        self.state_cache = None  # llm_frozen: the prompt states, computed once (model/state_cache.py)
        if self.llm_frozen and config["llm_state_cache"]:
            self.state_cache = PromptStateCache(
                self.llm_cache_dir, self._state_key_parts(), self._frozen_states, self.item_encode_batch_size,
                self.logger, self.show_progress,
            )
            windows = self.prompt_builder.history(dataset.inter_feat[self.ITEM_SEQ], dataset.inter_feat[self.ITEM_SEQ_LEN])
            self.state_cache.build(windows, what="training")
            self.state_cache.flush()
        lengths = self.prompt_builder.item_token_len[1:].float()
        self.logger.info(
            f"LLMRec: backbone {self.backbone_info['gguf_file'] or self.backbone_info['folder']} "
            f"({self.backbone_info['num_layers']} layers kept, {self.backbone_info['dtype']}), "
            f"{self.max_history_items} history items of {lengths.mean():.1f} tokens on average"
        )

    # ------------------------------------------------------------------ item encodings
    def _item_encodings(self, batch_size):
        ids, lens, span = it.tokenize_item_prompts(
            self.tokenizer, self.item_texts, self.item_prompt_template, self.max_item_tokens
        )
        info = self.backbone_info
        key_parts = {
            "model": info["fingerprint"],
            "gguf_file": info["gguf_file"],
            "num_layers": info["num_layers"],
            "dtype": str(info["dtype"]),
            "dataset": self.dataset_name,
            "item_texts": it.cache_key({"t": self.item_texts}),
            "item_prompt_template": self.item_prompt_template,
            "item_pooling": self.item_pooling,
            "max_item_tokens": self.max_item_tokens,
        }

        def encode():
            base = self.backbone
            was_training = base.training
            base.eval()
            base.to(self.device)
            try:
                if hasattr(base, "disable_adapter"):
                    with base.disable_adapter():
                        return self._encode(base, ids, lens, span, batch_size)
                return self._encode(base, ids, lens, span, batch_size)
            finally:
                base.train(was_training)

        return it.load_or_encode_items(self.llm_cache_dir, key_parts, encode, self.logger)

    def _encode(self, base, ids, lens, span, batch_size):
        return it.encode_items(
            base, ids, lens, span, self.item_pooling, batch_size, self.device, self.show_progress
        )

    # ------------------------------------------------------------------ backbone
    def build_prompts(self, item_seq, item_seq_len):
        """``(input_ids, attention_mask, lengths)`` of the history prompts (right-padded)."""
        return self.prompt_builder(item_seq, item_seq_len)

    def _state_key_parts(self):
        """Everything a prompt's frozen state depends on (the prompt-state cache's key)."""
        info = self.backbone_info
        return {
            "model": info["fingerprint"], "gguf_file": info["gguf_file"], "num_layers": info["num_layers"],
            "dtype": str(info["dtype"]), "dataset": self.dataset_name,
            "item_texts": it.cache_key({"t": self.item_texts}), "prompt_template": self.prompt_template,
            "history_item_template": self.history_item_template, "max_history_items": self.max_history_items,
            "max_item_tokens": self.max_item_tokens, "user_pooling": self.user_pooling,
            "attn_implementation": self.attn_implementation,
        }

    @torch.no_grad()
    def _frozen_states(self, windows):
        """The frozen LLM's states of history windows ``[B, max_history_items]``."""
        length = torch.full((windows.size(0),), windows.size(1), dtype=torch.long, device=windows.device)
        input_ids, attention_mask, lengths = self.build_prompts(windows.to(self.device), length.to(self.device))
        return self._prompt_states(attention_mask, lengths, input_ids=input_ids)

    def _prompt_states(self, attention_mask, lengths, input_ids=None, inputs_embeds=None):
        """The backbone's pooled state of each right-padded prompt, ``[B, H]``. With
        ``prompt_length_buckets`` k > 1 the prompts run in k groups of similar length, each cut to
        its own longest prompt (:func:`~recbole_eisam.model.item_text.length_groups`): the same
        states, fewer padded positions (bench.gpu's batch with gpu.yaml: 1.85 positions per real
        token in one group)."""
        inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        groups = it.length_groups(lengths, self.prompt_length_buckets)
        parts = []
        for rows, width in groups:
            mask = attention_mask[rows, :width]
            output = self.backbone(attention_mask=mask, **{key: value[rows, :width] for key, value in inputs.items()})
            parts.append(self._pool(output.last_hidden_state, mask, lengths[rows]))
        return torch.cat(parts)[torch.argsort(torch.cat([rows for rows, _ in groups]))]

    def _pool(self, hidden, attention_mask, lengths):
        """The user state ``[B, H]`` from the prompt's hidden states (``user_pooling``)."""
        if self.user_pooling == "mean":  # mean over each prompt's real tokens
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()  # [B H]
        return self.gather_indexes(hidden, lengths - 1).float()  # each prompt's real last token

    def forward(self, item_seq, item_seq_len):
        if self.llm_frozen:  # the state depends on the window of history items alone
            windows = self.prompt_builder.history(item_seq, item_seq_len)
            return self._frozen_states(windows) if self.state_cache is None else self.state_cache.lookup(windows)
        if self.use_item_id_tokens:
            input_ids, attention_mask, lengths, owners = self.prompt_builder(item_seq, item_seq_len, return_items=True)
            embeds = self.backbone.get_input_embeddings()(input_ids)
            ids = self.history_id_proj(self.history_id_embedding(owners))  # 0 on template and padding tokens
            return self._prompt_states(attention_mask, lengths, inputs_embeds=embeds + ids.to(embeds.dtype))
        input_ids, attention_mask, lengths = self.build_prompts(item_seq, item_seq_len)
        return self._prompt_states(attention_mask, lengths, input_ids=input_ids)

    def encode_sequence(self, interaction):
        """Backbone part: the LLM's hidden state at each prompt's last token, ``[B, H]``."""
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    # ------------------------------------------------------------------ head
    def user_vectors(self, hidden):
        return self.user_proj(self.head_dropout(self.user_norm(hidden)))  # [B d]

    def item_vectors(self, items=None):
        """Item representations ``[n_items, d]`` (or of ``items``)."""
        text = self.item_text_emb if items is None else self.item_text_emb[items]
        vectors = self.item_proj(text)
        if self.item_embedding is not None:
            vectors = vectors + (self.item_embedding.weight if items is None else self.item_embedding(items))
        return vectors

    def score(self, hidden):
        """Head part: logits of all items (padding id 0 included), ``[B, n_items]``."""
        logits = torch.matmul(self.user_vectors(hidden), self.item_vectors().transpose(0, 1))
        return logits if self.item_bias is None else logits + self.item_bias

    def head_parameters(self):
        """Parameters of the head (everything after :meth:`encode_sequence`)."""
        return [p for _, p in self.named_head_parameters()]

    def named_head_parameters(self):
        return [
            (n, p)
            for n, p in self.named_parameters()
            if p.requires_grad and n.split(".")[0] in self.HEAD_MODULES
        ]

    # ------------------------------------------------------------------ RecBole API
    def calculate_logits(self, interaction):
        """Per-sample protocol: ``(logits [B, n_items], target [B])``."""
        logits = self.score(self.encode_sequence(interaction))
        return logits, interaction[self.POS_ITEM_ID]

    def calculate_loss(self, interaction):
        logits, target = self.calculate_logits(interaction)
        return self.loss_fct(logits, target)

    def predict(self, interaction):
        user = self.user_vectors(self.encode_sequence(interaction))
        items = self.item_vectors(interaction[self.ITEM_ID])
        scores = torch.mul(user, items).sum(dim=1)  # [B]
        return scores if self.item_bias is None else scores + self.item_bias[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        return self.score(self.encode_sequence(interaction))  # [B n_items]

    def flush_caches(self):
        """Write the prompt states computed since the last write (``llm_frozen`` with its cache)."""
        if self.state_cache is not None:
            self.state_cache.flush()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state_dict(self):
        """Trainable tensors only (LoRA adapters, ID tokens, head), keyed like :meth:`state_dict`."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory):
        """Write the LoRA adapter in PEFT format (``adapter/``) and every other trainable
        tensor (head, ID tokens) as ``trainable.safetensors``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        if hasattr(self.backbone, "peft_config"):
            self.backbone.save_pretrained(os.path.join(directory, "adapter"))
        rest = {
            n: p.detach().cpu().contiguous()
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("backbone.")
        }
        save_file(rest, os.path.join(directory, "trainable.safetensors"))

    def load_pretrained(self, directory):
        """Inverse of :meth:`save_pretrained`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = os.path.join(directory, "adapter", "adapter_model.safetensors")
        if os.path.isfile(adapter) and hasattr(self.backbone, "peft_config"):
            set_peft_model_state_dict(self.backbone, load_file(adapter))
        missing = self.load_state_dict(load_file(os.path.join(directory, "trainable.safetensors")), strict=False)
        return missing
