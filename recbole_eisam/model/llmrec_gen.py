"""
LLMRecGen
################################################

A generative LLM-based sequential recommender: a (LoRA-tuned) causal language model reads the
user's recent items as text and *writes* the next item's title; decoding is constrained to
the titles of real items.

Reference:
    Bao et al. "A Bi-Step Grounding Paradigm for Large Language Models in Recommendation
    Systems." ACM TORS 2025 (BIGRec: fine-tune the LLM to generate the next item's title).

Reference:
    Zhang et al. "Taming the Long Tail: Efficient Item-wise Sharpness-Aware Minimization
    for LLM-based Recommender Systems." arXiv 2603.12752, 2026.

Reference:
    Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models." in ICLR 2022.
"""

import inspect
import os
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from transformers import DynamicCache

from recbole_eisam.model import item_text as it
from recbole_eisam.model.llm_backbone import load_backbone_from_config
from recbole_eisam.model.title_trie import TitleTrie, constrained_beam_search, leaves_to_scores
from recbole_eisam.utils.longtail import item_counts

#: metrics that read the target's rank among *all* items, which beam search does not give
FULL_RANK_METRICS = ("headmrr", "tailmrr", "gauc", "auc", "logloss", "mae", "rmse")


class LLMRecGen(SequentialRecommender):
    r"""LLMRecGen fine-tunes an LLM to write the next item's title after a prompt of the
    user's history (the prompt of :class:`~recbole_eisam.model.llmrec.LLMRec`).

    * Training (:meth:`calculate_sample_losses`): teacher forcing on ``prompt + target +
      end-of-item token``, where the target is ``target_template`` rendered with the next
      item's text; the loss is on the target's tokens only. The softmax runs over the output
      vocabulary: the tokens that occur in the catalog's targets (``gen_vocab: catalog``, the
      language-model head's rows of those tokens; a few thousand instead of the tokenizer's
      tens of thousands, in training and decoding alike) or every token (``full``). The per-sample loss is the sum
      (``gen_loss_reduction: sum``, the title's negative log-likelihood) or the mean of the
      target's token cross-entropies: one value per training sample, so every method of the
      trainer family weights samples by their target item.
    * Logit adjustment, train-time form (``tau > 0``): the item prior factorises over the
      title trie (``pi(title) = prod_t pi(token_t | prefix_t)``), and every target token's
      softmax over the trie's children of its prefix gets ``+ tau log pi(child | prefix)``
      (adding ``tau log pi(title)`` to the sequence log-likelihood itself would only shift
      each sample's loss by a constant, with no gradient). Post-hoc form
      (:attr:`posthoc_tau`): beam scores get ``- tau log pi(child | prefix)`` per token, so a
      finished title scores ``log p(title) - tau log pi(title)``.
    * Inference (:meth:`full_sort_predict`): constrained beam search (``num_beams`` >= the
      largest ``topk``) over the prefix trie of all titles, one KV-cached decoder step per
      token; every beam is a real item, a title shared by several items scores all of them,
      and items of the user's input sequence are never generated when
      ``eval_mask_history`` is on. The score matrix holds the beams' log-likelihoods and
      ``-inf`` elsewhere, so Hit, NDCG, MRR@K and the tail metrics at cut-offs up to
      ``num_beams`` are exact; metrics that need the target's rank among all items are
      refused. :meth:`predict` (sampled evaluation) scores a candidate by its title's
      log-likelihood.
    * Grounding (``gen_inference: grounding``, BIGRec's two steps, :meth:`grounded_scores`):
      the model writes freely (greedy, KV-cached, no trie), and every item is ranked by the
      L2 distance between the written text's embedding and its target's (the decoder's last
      hidden state at the end-of-item token, each text fed alone), so every item gets a
      score and metrics of the full rank work; post-hoc logit adjustment subtracts
      ``tau log pi(item)`` from those scores.

    NOTE:
        There is no cheap head here: every parameter that trains is inside the LLM (LoRA),
        so ``eisam_scope: head`` is refused.
    """

    def __init__(self, config, dataset):
        super(LLMRecGen, self).__init__(config, dataset)
        self.logger = getLogger()
        self.item_text_fields = list(config["item_text_fields"])
        self.loss_reduction = str(config["gen_loss_reduction"])
        if self.loss_reduction not in ("sum", "mean"):
            raise ValueError(f"gen_loss_reduction must be 'sum' or 'mean', got {self.loss_reduction!r}.")
        self.inference = str(config["gen_inference"])
        if self.inference not in ("beam", "grounding"):
            raise ValueError(f"gen_inference must be 'beam' or 'grounding', got {self.inference!r}.")
        self.item_encode_batch_size = int(config["item_encode_batch_size"])
        self.prompt_length_buckets = it.length_buckets(config)
        self._item_embeddings = None  # grounding's item embeddings, dropped whenever training resumes
        self.num_beams = int(config["num_beams"])
        topk = [int(k) for k in (config["topk"] or [])]
        if self.inference == "beam" and topk and self.num_beams < max(topk):
            raise ValueError(
                f"num_beams {self.num_beams} is smaller than the largest topk {max(topk)}: LLMRecGen's "
                f"top-K lists come from its beams; set num_beams to at least {max(topk)}."
            )
        refused = [m for m in (config["metrics"] or []) if str(m).lower() in FULL_RANK_METRICS]
        if self.inference == "beam" and refused:
            raise ValueError(
                f"metrics {refused} need the target's rank among all items, but LLMRecGen ranks only the "
                f"titles its {self.num_beams} beams reach; drop them (MRR, Hit, NDCG and the @K tail metrics work) or "
                f"rank every item with gen_inference: grounding."
            )
        if str(config["eisam_scope"] or "all") == "head":
            raise ValueError(
                "eisam_scope=head perturbs a head after the backbone, but LLMRecGen has none (all its "
                "trainable parameters are LoRA adapters inside the LLM); use eisam_scope: all."
            )
        self.mask_history = bool(config["eval_mask_history"])
        self.posthoc_tau = 0.0  # set by the trainer for logit_adjust_posthoc (applied per beam step)

        self.item_texts = it.extract_item_texts(dataset, self.item_text_fields, str(config["item_text_separator"]))
        self.backbone, self.tokenizer, self.backbone_info = load_backbone_from_config(
            config, self.device, causal_lm=True
        )
        self.prompt_builder = it.PromptBuilder(
            self.tokenizer, self.item_texts, str(config["prompt_template"]), str(config["history_item_template"]),
            int(config["max_history_items"]), config["max_item_tokens"],
        )

        # targets: each item's rendered title, cut to max_target_tokens, then the end-of-item token
        self.target_template = str(config["target_template"])
        it._split_template(self.target_template, "{item}")
        end = config["gen_end_token"] or self.tokenizer.eos_token
        end_ids = it._tokenize(self.tokenizer, [end])[0] if end else []
        if len(end_ids) != 1:
            raise ValueError(
                f"gen_end_token {end!r} must be one token of the LLM's tokenizer (it is {len(end_ids)}); "
                "set gen_end_token to a single-token string."
            )
        self.end_token_id = int(end_ids[0])
        limit = config["max_target_tokens"]
        rendered = [self.target_template.replace("{item}", t) if t else "" for t in self.item_texts]
        rows = it._tokenize(self.tokenizer, rendered)
        rows = [((r[: int(limit)] if limit else r) + [self.end_token_id]) if t else [] for r, t in zip(rows, self.item_texts)]
        # the output vocabulary: every token of the catalog's targets (gen_vocab: catalog) or all
        self.gen_vocab = str(config["gen_vocab"])
        if self.gen_vocab not in ("catalog", "full"):
            raise ValueError(f"gen_vocab must be 'catalog' or 'full', got {self.gen_vocab!r}.")
        full_size = self._decoder_and_head()[1].weight.size(0)
        if self.gen_vocab == "catalog":
            vocab = torch.tensor(sorted({t for r in rows for t in r}), dtype=torch.long)
        else:
            vocab = torch.arange(full_size)
        to_out = torch.full((max(full_size, int(vocab.max()) + 1),), -1, dtype=torch.long)
        to_out[vocab] = torch.arange(len(vocab))
        self.register_buffer("vocab_ids", vocab, persistent=False)
        self.register_buffer("to_out", to_out, persistent=False)
        self.counts = item_counts(dataset, self.n_items)
        self.trie = TitleTrie([to_out[torch.tensor(r, dtype=torch.long)].tolist() for r in rows], counts=self.counts)
        target_ids, target_len = it._padded(rows)
        self.register_buffer("target_ids", target_ids, persistent=False)  # token ids (the LLM's input)
        self.register_buffer("target_len", target_len, persistent=False)
        titles = len(self.trie.leaf_items)
        shared = int(sum(len(v) for v in self.trie.leaf_items.values())) - titles
        self.logger.info(
            f"LLMRecGen: backbone {self.backbone_info['gguf_file'] or self.backbone_info['folder']} "
            f"({self.backbone_info['num_layers']} layers kept, {self.backbone_info['dtype']}), "
            f"{titles} distinct titles ({shared} items share a title) in a trie of {self.trie.num_nodes} nodes, "
            f"{float(target_len[1:].float().mean()):.1f} target tokens per item on average, "
            f"an output vocabulary of {len(vocab)} tokens ({self.gen_vocab})"
        )

    # ------------------------------------------------------------------ pieces of the LLM
    @property
    def _cache_kwarg(self):
        """The decoder's name for its KV cache argument (``cache``, or ``past_key_values`` before
        transformers renamed it)."""
        decoder, _ = self._decoder_and_head()
        return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def _decoder_and_head(self):
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return base.model, base.get_output_embeddings()

    def output_logits(self, hidden):
        """Logits over the output vocabulary (``vocab_ids``) from decoder hidden states."""
        _, head = self._decoder_and_head()
        if self.gen_vocab == "full":
            return head(hidden)
        bias = None if head.bias is None else head.bias[self.vocab_ids]
        return F.linear(hidden, head.weight[self.vocab_ids], bias)

    def teacher_forcing_inputs(self, interaction, items):
        """``(input_ids, attention_mask, is_target)`` ``[B, L]``: each prompt followed by the
        target tokens of ``items``, right-padded; ``is_target`` marks the target's tokens."""
        input_ids, attention_mask, _ = self.prompt_builder(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        tgt = self.target_ids[items]  # [B, T]
        tmask = torch.arange(tgt.size(1), device=tgt.device).unsqueeze(0) < self.target_len[items].unsqueeze(1)
        masks = [attention_mask.bool(), tmask]
        ids, mask, _ = it.pack_right([input_ids, tgt], masks)
        marks, _, _ = it.pack_right([torch.zeros_like(input_ids), torch.ones_like(tgt)], masks)
        return ids, mask, marks

    def training_tokens(self, interaction):
        """``(real, padded)`` tokens of a training batch's teacher-forced inputs (for bench.speed)."""
        _, mask, _ = self.teacher_forcing_inputs(interaction, interaction[self.POS_ITEM_ID])
        return int(mask.sum()), int(mask.numel())

    def _teacher_forced(self, interaction, items):
        """Hidden states predicting each target token: ``(hidden [N, H], labels [N], row [N],
        k [N])`` with ``labels`` indices of the output vocabulary and ``k`` the token's index
        within its title. With ``prompt_length_buckets`` k > 1 the sequences run in k groups of
        similar length, each cut to its own longest (:func:`~recbole_eisam.model.item_text.length_groups`)."""
        ids, mask, marks = self.teacher_forcing_inputs(interaction, items)
        decoder, _ = self._decoder_and_head()
        parts = []
        for group, width in it.length_groups(mask.sum(1), self.prompt_length_buckets):
            g_ids, g_mask, g_marks = ids[group, :width], mask[group, :width], marks[group, :width]
            hidden = decoder(input_ids=g_ids, attention_mask=g_mask).last_hidden_state  # [b, width, H]
            is_label = g_marks[:, 1:].bool() & g_mask[:, 1:].bool()  # token p+1 is a target token
            rows = group[torch.nonzero(is_label, as_tuple=True)[0]]
            k = (torch.cumsum(is_label.long(), dim=1) - 1)[is_label]
            parts.append((hidden[:, :-1][is_label], self.to_out[g_ids[:, 1:][is_label]], rows, k))
        return tuple(torch.cat(column) for column in zip(*parts))

    def sequence_losses(self, interaction, items, tau=0.0):
        """Per-sample loss ``[B]`` of writing ``items``' titles after the batch's prompts."""
        h, labels, rows, k = self._teacher_forced(interaction, items)
        logits = self.output_logits(h).float()  # [N, V_out]
        if tau:
            nodes = self.trie.path_nodes[items.cpu()[rows.cpu()], k.cpu()]
            child_tokens, _, valid = self.trie.children(nodes)
            child_tokens, valid = child_tokens.to(logits.device), valid.to(logits.device)
            z = logits.gather(1, child_tokens) + tau * self.trie.children_prior(nodes).to(logits.device)
            z = z.masked_fill(~valid, -float("inf"))
            pick = (child_tokens == labels.unsqueeze(1)) & valid
            token_loss = torch.logsumexp(z, dim=1) - (z.masked_fill(~pick, 0.0)).sum(1)
        else:
            token_loss = F.cross_entropy(logits, labels, reduction="none")
        out = torch.zeros(items.size(0), device=logits.device, dtype=token_loss.dtype).index_add_(0, rows, token_loss)
        if self.loss_reduction == "mean":
            out = out / self.target_len[items].to(out.dtype).clamp(min=1)
        return out

    # ------------------------------------------------------------------ RecBole API
    def calculate_sample_losses(self, interaction, tau=0.0):
        """Per-sample protocol of sequence models: ``(losses [B], target [B])``."""
        target = interaction[self.POS_ITEM_ID]
        return self.sequence_losses(interaction, target, tau), target

    def calculate_loss(self, interaction):
        return self.calculate_sample_losses(interaction)[0].mean()

    def predict(self, interaction):
        """Score of each (user, candidate) pair: the candidate title's log-likelihood."""
        return -self.sequence_losses(interaction, interaction[self.ITEM_ID])

    def _decoding_step(self, interaction, W):
        """``step(state, tokens, origin) -> (log_probs [B*W, V_out], state)``: the KV-cached
        decoder step of :func:`~recbole_eisam.model.title_trie.constrained_beam_search`, for the
        batch's prompts each repeated for ``W`` rows (``origin=None``: every row keeps its own)."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        input_ids, attention_mask, lengths = self.prompt_builder(item_seq, item_seq_len)
        L = input_ids.size(1)
        # left-pad, so that every prompt's next token sits at the same column
        shift = (L - lengths).view(-1, 1)
        cols = (torch.arange(L, device=input_ids.device).view(1, -1) - shift) % L
        ids = input_ids.gather(1, cols)
        mask = attention_mask.gather(1, cols)
        decoder, _ = self._decoder_and_head()

        def step(state, tokens, origin):
            if tokens is None:
                position = (mask.cumsum(1) - 1).clamp(min=0)
                cache = DynamicCache()  # filled in place, then repeated for the beams and reordered
                out = decoder(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                              **{self._cache_kwarg: cache})
                cache.batch_repeat_interleave(W)
                last = out.last_hidden_state[:, -1].repeat_interleave(W, dim=0)
                return F.log_softmax(self.output_logits(last).float(), dim=-1), (cache, mask.repeat_interleave(W, 0), lengths.repeat_interleave(W))
            cache, am, pos = state
            if origin is not None:  # beams: each row continues the row it came from (greedy: itself)
                origin = origin.to(ids.device)
                cache.reorder_cache(origin)
                am, pos = am[origin], pos[origin]
            am = torch.cat([am, torch.ones(am.size(0), 1, dtype=am.dtype, device=am.device)], dim=1)
            token_ids = self.vocab_ids[tokens.to(ids.device)].view(-1, 1)  # output index -> token id
            out = decoder(input_ids=token_ids, attention_mask=am, position_ids=pos.view(-1, 1),
                          use_cache=True, **{self._cache_kwarg: cache})
            return F.log_softmax(self.output_logits(out.last_hidden_state[:, -1]).float(), dim=-1), (cache, am, pos + 1)

        return step

    def generate(self, interaction, num_beams=None):
        """Constrained beam search: ``(items' leaves [B, W], scores [B, W])`` (see :mod:`title_trie`)."""
        item_seq = interaction[self.ITEM_SEQ]
        B, W = item_seq.size(0), int(num_beams or self.num_beams)
        banned = None
        if self.mask_history:
            banned = torch.zeros(B, self.n_items, dtype=torch.bool, device=item_seq.device)
            banned.scatter_(1, item_seq, True)
            banned[:, 0] = True
            banned = banned.cpu()
        step = self._decoding_step(interaction, W)
        return constrained_beam_search(step, None, self.trie, B, W, banned=banned, prior_tau=self.posthoc_tau)

    @torch.no_grad()
    def generate_free(self, interaction, max_tokens=None):
        """Greedy decoding without the trie (BIGRec's first step): ``[B, T]`` output-vocabulary
        indices of each prompt's text, every row closed by the end-of-item token (appended
        where ``max_tokens``, by default the longest target, ran out first)."""
        B = interaction[self.ITEM_SEQ].size(0)
        limit = int(max_tokens or self.target_ids.size(1))
        end = int(self.to_out[self.end_token_id])
        step = self._decoding_step(interaction, 1)
        log_probs, state = step(None, None, None)
        rows, done = [], torch.zeros(B, dtype=torch.bool)
        for t in range(limit):
            token = log_probs.argmax(dim=-1).cpu()
            token = torch.where(done, torch.full_like(token, end), token)
            rows.append(token)
            done = done | (token == end)
            if bool(done.all()) or t == limit - 1:
                break
            log_probs, state = step(state, token, None)
        out = torch.stack(rows, dim=1)
        if not bool(done.all()):
            out = torch.cat([out, torch.full((B, 1), end, dtype=out.dtype)], dim=1)
        return out

    def embed_targets(self, tokens):
        """BIGRec's embedding of a written text: the decoder's last hidden state at the first
        end-of-item token of each row of ``tokens`` (output-vocabulary indices, ``[N, T]``), the
        text fed on its own, without the prompt."""
        end = int(self.to_out[self.end_token_id])
        tokens = tokens.to(self.device)
        is_end = tokens == end
        length = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full_like(tokens[:, 0], tokens.size(1) - 1)) + 1
        mask = (torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0) < length.unsqueeze(1)).long()
        decoder, _ = self._decoder_and_head()
        hidden = decoder(input_ids=self.vocab_ids[tokens], attention_mask=mask).last_hidden_state
        return hidden[torch.arange(tokens.size(0), device=tokens.device), length - 1].float()

    def item_embeddings(self):
        """Every item's :meth:`embed_targets` (its target, as written in training), ``[n_items, H]``
        (zeros for the padding item and items without a title); kept until the next training step."""
        if self._item_embeddings is None:
            titled = torch.nonzero(self.target_len > 0).flatten()
            out_ids = self.to_out[self.target_ids[titled]].clamp(min=0)  # positions after the end are masked
            step = self.item_encode_batch_size
            emb = torch.cat([self.embed_targets(out_ids[i : i + step]) for i in range(0, titled.numel(), step)])
            self._item_embeddings = torch.zeros(self.n_items, emb.size(1), device=emb.device)
            self._item_embeddings[titled.to(emb.device)] = emb
        return self._item_embeddings

    def train(self, mode=True):
        self._item_embeddings = None  # the adapters change: ground against fresh item embeddings
        return super().train(mode)

    @torch.no_grad()
    def grounded_scores(self, interaction):
        """BIGRec's grounding: ``-L2`` distance between the embedding of the greedily written text
        and every item's, ``[B, n_items]`` (``-inf`` for the padding item and untitled items), minus
        ``posthoc_tau * log prior`` of each item for post-hoc logit adjustment."""
        written = self.embed_targets(self.generate_free(interaction))
        scores = -torch.cdist(written, self.item_embeddings())
        if self.posthoc_tau:
            prior = self.counts.float().clamp(min=1) / self.counts.sum().clamp(min=1)
            scores = scores - self.posthoc_tau * prior.log().to(scores.device)
        return scores.masked_fill((self.target_len == 0).to(scores.device).unsqueeze(0), -float("inf"))

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        if self.inference == "grounding":
            return self.grounded_scores(interaction)
        leaves, scores = self.generate(interaction)
        return leaves_to_scores(self.trie, leaves, scores, self.n_items).to(self.device)

    def prior_title_log_likelihood(self, interaction, items):
        """The base LLM's log-likelihood of ``items``' titles after the prompts (LoRA off): how
        familiar the pretrained model finds each title (the prior long tail)."""
        if hasattr(self.backbone, "disable_adapter"):
            with self.backbone.disable_adapter():
                return -self.sequence_losses(interaction, items)
        return -self.sequence_losses(interaction, items)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state_dict(self):
        """Trainable tensors only (the LoRA adapters), keyed like :meth:`state_dict`."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory):
        """Write the LoRA adapter in PEFT format (``adapter/``)."""
        os.makedirs(directory, exist_ok=True)
        if hasattr(self.backbone, "peft_config"):
            self.backbone.save_pretrained(os.path.join(directory, "adapter"))

    def load_pretrained(self, directory):
        """Inverse of :meth:`save_pretrained`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = os.path.join(directory, "adapter", "adapter_model.safetensors")
        if os.path.isfile(adapter) and hasattr(self.backbone, "peft_config"):
            set_peft_model_state_dict(self.backbone, load_file(adapter))
