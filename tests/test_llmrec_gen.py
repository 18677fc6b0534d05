"""LLMRecGen: the title trie, constrained beam search, per-sample sequence losses, one EISAM
step against -G, and a short training run that learns a next-item rule (tiny random causal
Llama saved by the test; no downloads)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_dataset
from recbole.data import data_preparation
from test_eisam_step import add, f32, grad_of, norm, rel_err, train_counts
from torch.func import functional_call

from recbole_eisam.bench.gpu import CHARS
from recbole_eisam.model import LLMRecGen
from recbole_eisam.model.title_trie import TitleTrie, constrained_beam_search, leaves_to_scores
from recbole_eisam.quick_start import build_dataset, load_config, run

END = 99


def save_tiny_causal_llama(folder, hidden=32, seed=0):
    """A 2-layer random Llama *with* its language-model head and a character-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recbole_eisam.bench.gpu import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def causal_llm(tmp_path_factory):
    return save_tiny_causal_llama(tmp_path_factory.mktemp("tiny_causal_llama"))


def gen_config(data_path, llm, root, **overrides):
    config = {
        "data_path": data_path, "checkpoint_dir": str(root / "saved"), "show_progress": False,
        "device": "cpu", "use_gpu": False, "seed": 2020, "log_wandb": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]},
        "llm_path": llm, "llm_gguf_file": None, "llm_num_layers": None, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "max_history_items": 4, "max_item_tokens": 40, "prompt_template": "H:{history}\nN:",
        "gen_end_token": "\n", "num_beams": 10, "topk": [10], "metrics": ["Hit", "NDCG", "MRR", "TailNDCG"],
        "MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 16, "eval_batch_size": 16, "epochs": 1,
        "train_sample_num": 32, "stopping_step": 2,
    }
    return {**config, **overrides}


def build(config_dict, dataset="tiny"):
    config = load_config("LLMRecGen", dataset, config_dict=config_dict)
    data = build_dataset(config)
    train, valid, test = data_preparation(config, data)
    torch.manual_seed(0)
    return LLMRecGen(config, train.dataset), config, (train, valid, test)


def first(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


# ------------------------------------------------------------------ the trie and the search
SEQS = [[], [5, 6, END], [5, 6, 7, END], [5, END], [8, END], [5, 6, END], [9, 5, END]]  # item 0: padding


def fake_step(vocab=100, seed=0):
    """A decoder whose next-token log-probabilities are a fixed random function of the prefix."""

    def log_probs(prefix):
        g = torch.Generator().manual_seed(hash((seed,) + tuple(prefix)) % (2**31))
        return torch.log_softmax(torch.randn(vocab, generator=g) * 3, dim=0)

    def step(state, tokens, origin):
        if tokens is None:  # state: the number of rows, B prompts times W beams
            prefixes = [[] for _ in range(state)]
        else:
            prefixes = [state[o] + [int(t)] for o, t in zip(origin.tolist(), tokens.tolist())]
        return torch.stack([log_probs(p) for p in prefixes]), prefixes

    return step, log_probs


def test_trie_holds_exactly_the_tokenised_titles_and_prefix_titles_terminate():
    trie = TitleTrie(SEQS)
    paths = {tuple(p): sorted(items) for p, items in trie.sequences()}
    assert paths == {(5, 6, END): [1, 5], (5, 6, 7, END): [2], (5, END): [3], (8, END): [4], (9, 5, END): [6]}
    # a title that is a prefix of another ends at its own leaf, reached by the end token
    leaf1, leaf2, leaf3 = (int(trie.leaf_of_item[i]) for i in (1, 2, 3))
    assert len({leaf1, leaf2, leaf3}) == 3 and trie.leaf_of_item[5] == leaf1 and trie.leaf_of_item[0] == -1
    node = torch.zeros(1, dtype=torch.long)
    for token in (5, 6):
        node = trie.step(node, torch.tensor([token]))
    tokens, _, valid = trie.children(node)
    assert sorted(tokens[valid].tolist()) == [7, END]
    assert int(trie.step(node, torch.tensor([8]))) == -1  # off the trie


def test_node_priors_multiply_to_the_title_prior():
    counts = torch.tensor([0, 3, 1, 0, 7, 2, 5])
    trie = TitleTrie(SEQS, counts=counts)
    n = counts.double().clamp(min=1)
    n[0] = 0
    for item, seq in enumerate(SEQS[1:], start=1):
        nodes = trie.path_nodes[item, : len(seq)]
        tokens, _, valid = trie.children(nodes)
        prior = trie.children_prior(nodes)
        picked = (tokens == torch.tensor(seq).unsqueeze(1)) & valid
        total = prior[picked].sum()
        shared = n[[i for i, s in enumerate(SEQS) if s == seq]].sum()
        assert math.isclose(float(total), math.log(shared / n.sum()), rel_tol=1e-5)


@pytest.mark.parametrize("prior_tau", [0.0, 1.0])
def test_beam_search_with_enough_beams_is_the_exhaustive_ranking(prior_tau):
    counts = torch.tensor([0, 3, 1, 0, 7, 2, 5])
    trie = TitleTrie(SEQS, counts=counts)
    step, log_probs = fake_step()
    B, W = 3, 8
    banned = torch.zeros(B, len(SEQS), dtype=torch.bool)
    banned[1, 4] = True  # prompt 1 may not end on item 4
    banned[2, [1, 5]] = True  # prompt 2: both items of the shared title (5, 6, END)
    leaves, scores = constrained_beam_search(step, B * W, trie, B, W, banned=banned, prior_tau=prior_tau)
    n = counts.double().clamp(min=1)
    n[0] = 0
    for b in range(B):
        expected = {}
        for item, seq in enumerate(SEQS):
            if not seq or all(banned[b, i] for i, s in enumerate(SEQS) if s == seq):
                continue
            shared = n[[i for i, s in enumerate(SEQS) if s == seq]].sum()
            ll = sum(float(log_probs(seq[:k])[seq[k]]) for k in range(len(seq)))
            expected[tuple(seq)] = ll - prior_tau * math.log(shared / n.sum())
        got = {}
        for leaf, score in zip(leaves[b].tolist(), scores[b].tolist()):
            if leaf >= 0:
                items = trie.items_of(leaf).tolist()
                got[tuple(SEQS[items[0]])] = score
        assert got.keys() == expected.keys()
        assert all(math.isclose(got[k], expected[k], rel_tol=1e-5, abs_tol=1e-5) for k in got)
    matrix = leaves_to_scores(trie, leaves, scores, len(SEQS))
    assert matrix[0, 1] == matrix[0, 5] and torch.isfinite(matrix[0, 1])  # a shared title scores both items
    assert matrix[1, 4] == -math.inf and matrix[2, 1] == -math.inf and matrix[2, 5] == -math.inf


def test_every_beam_is_a_real_title_with_few_beams():
    trie = TitleTrie(SEQS)
    step, _ = fake_step(seed=3)
    leaves, scores = constrained_beam_search(step, 4 * 2, trie, 4, 2)
    real = {int(trie.leaf_of_item[i]) for i in range(1, len(SEQS))}
    assert set(leaves.flatten().tolist()) <= real
    assert torch.isfinite(scores).all()


# ------------------------------------------------------------------ the model
@pytest.fixture
def tiny_gen(tmp_path, causal_llm):
    data_path = write_tiny_dataset(str(tmp_path / "data"), n_users=12, n_items=16)
    return gen_config(data_path, causal_llm, tmp_path)


def out_log_probs(model, logits):
    """Log-probabilities over the model's output vocabulary, indexed by token id."""
    logp = torch.full_like(logits, -math.inf)
    logp[..., model.vocab_ids] = torch.log_softmax(logits[..., model.vocab_ids].float(), -1)
    return logp


@pytest.mark.parametrize("vocab", ["catalog", "full"])
def test_per_sample_loss_is_the_hand_summed_token_cross_entropy(tiny_gen, vocab):
    model, _, (train, _, _) = build(dict(tiny_gen, gen_vocab=vocab))
    if vocab == "full":
        assert len(model.vocab_ids) == model.tokenizer.vocab_size or len(model.vocab_ids) >= 98
    else:
        assert len(model.vocab_ids) < 40  # the characters of "Movie Number 12 (1962)" titles, and the end token
    batch = first(train)
    with torch.no_grad():
        losses, target = model.calculate_sample_losses(batch)
    ids, _, lens = model.prompt_builder(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    for j in range(4):
        prompt = ids[j, : lens[j]].tolist()
        title = model.tokenizer(" " + model.item_texts[int(target[j])], add_special_tokens=False)["input_ids"]
        tokens = title + [model.end_token_id]
        assert model.target_ids[target[j], : model.target_len[target[j]]].tolist() == tokens
        logp = out_log_probs(model, model.backbone(input_ids=torch.tensor([prompt + tokens])).logits[0])
        hand = -sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(tokens))
        assert math.isclose(losses[j].item(), hand.item(), rel_tol=1e-5)
    model.loss_reduction = "mean"
    mean = model.calculate_sample_losses(batch)[0]
    assert torch.allclose(mean, losses / model.target_len[target], rtol=1e-6)


def test_train_time_logit_adjustment_is_the_per_node_adjusted_softmax(tiny_gen):
    model, _, (train, _, _) = build(tiny_gen)
    batch = first(train)
    tau = 0.7
    adjusted, target = model.calculate_sample_losses(batch, tau=tau)
    ids, _, lens = model.prompt_builder(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    for j in range(3):
        item = int(target[j])
        prompt = ids[j, : lens[j]].tolist()
        tokens = model.target_ids[item, : model.target_len[item]].tolist()
        logits = model.backbone(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
        hand = 0.0
        for k, tok in enumerate(tokens):
            node = model.trie.path_nodes[item, k : k + 1]
            children, _, valid = model.trie.children(node)
            allowed = children[0][valid[0]]  # output indices
            z = logits[len(prompt) - 1 + k][model.vocab_ids[allowed]] + tau * model.trie.children_prior(node)[0][valid[0]]
            hand -= torch.log_softmax(z, 0)[allowed == model.to_out[tok]].item()
        assert math.isclose(adjusted[j].item(), hand, rel_tol=1e-5)


def test_full_sort_never_generates_history_items_and_matches_teacher_forcing(tiny_gen):
    model, _, (_, _, test) = build(tiny_gen)
    model.eval()
    inter = first(test)
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
        assert scores.shape == (len(inter), model.n_items)
        seq = inter[model.ITEM_SEQ]
        for row, history in zip(torch.isfinite(scores), seq):  # W beams, each a real allowed item
            allowed = model.n_items - 1 - len(set(history.tolist()) - {0})
            assert int(row.sum()) == min(model.num_beams, allowed)
        assert not torch.isfinite(scores.gather(1, seq)).any()
        best = scores.argmax(1)
        assert torch.allclose(scores.max(1).values, -model.sequence_losses(inter, best), atol=1e-4)


def independent_losses(model, params, batch):
    """Per-sample title NLL from HF's causal-LM logits on each unpadded sequence, LoRA at ``params``."""
    ids, _, lens = model.prompt_builder(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    out = []
    for j in range(len(batch)):
        item = int(batch[model.POS_ITEM_ID][j])
        tokens = model.target_ids[item, : model.target_len[item]].tolist()
        prompt = ids[j, : lens[j]].tolist()
        logits = functional_call(model.backbone, params, (), {"input_ids": torch.tensor([prompt + tokens])}).logits[0]
        logp = out_log_probs(model, logits)
        out.append(-sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(tokens)))
    return torch.stack(out)


def test_eisam_step_equals_minus_G(tmp_path, causal_llm):
    from recbole_eisam.trainer import EISAMTrainer

    data_path = write_tiny_dataset(str(tmp_path / "data"), n_users=6, n_items=16)
    rho, lam = 0.5, 0.7
    keys = gen_config(data_path, causal_llm, tmp_path, train_batch_size=100000, train_sample_num=None,
                      learner="sgd", learning_rate=1.0, train_method="eisam", eisam_lambda=lam, eisam_rho=rho,
                      eisam_weight="power", eisam_alpha=0.5, eisam_weight_norm="max")
    model, config, (train, _, _) = build(keys)
    batch = first(train)
    assert len(batch) == len(train.dataset)
    trainer = EISAMTrainer(config, model)
    trainer.setup_item_weights(train.dataset)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n.removeprefix("backbone."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer._train_epoch(train, 0)
    delta = {n.removeprefix("backbone."): p.detach() - before[n.removeprefix("backbone.")]
             for n, p in model.named_parameters() if n in names}

    n = train_counts(batch, model.n_items).double()
    raw = (n + 1.0) ** -0.5
    w = f32(raw / raw[n > 0].max())[batch[model.POS_ITEM_ID]]
    target_w = w.float()

    def L(p):
        return independent_losses(model, p, batch).mean()

    def Lw(p):
        return (target_w * independent_losses(model, p, batch)).mean()

    g = grad_of(L, before)
    g_w = grad_of(Lw, before)
    g_w_e = grad_of(Lw, add(before, g_w, (rho / norm(g_w)).float()))
    G = {k: g[k] - lam * g_w[k] + lam * g_w_e[k] for k in g}
    assert rel_err(delta, G) < 1e-4
    assert rel_err(delta, g) > 1e-3  # the sharpness term matters


def test_short_training_learns_a_next_item_rule(tmp_path):
    """16 items with two-letter titles, each user's sequence walks a fixed cycle (the next item
    is the successor of the last one): after a short training run the model writes the right
    next title first for most test users (chance is 1/16; a label shift or a broken mask fails)."""
    llm = save_tiny_causal_llama(tmp_path / "llama", hidden=32)
    folder = tmp_path / "data" / "rule"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnop"
    titles = [letters[i] + letters[(i * 7) % 16] for i in range(16)]
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(120):
        start, length = int(rng.integers(16)), int(rng.integers(6, 10))
        rows += [f"u{u}\ti{(start + t) % 16}\t{t}" for t in range(length)]
    (folder / "rule.inter").write_text("\n".join(rows) + "\n")
    (folder / "rule.item").write_text("item_id:token\tmovie_title:token_seq\n" + "\n".join(
        f"i{i}\t{t}" for i, t in enumerate(titles)) + "\n")
    config = gen_config(str(tmp_path / "data"), llm, tmp_path, lora_r=16, lora_alpha=32, lora_target_modules="all-linear",
                        max_history_items=1, num_beams=5, topk=[1, 5], metrics=["Hit", "NDCG"], valid_metric="Hit@1",
                        eval_mask_history=False, train_sample_num=None, epochs=12, train_batch_size=32,
                        learning_rate=0.003, eval_step=100, stopping_step=100, seed=1)
    result = run("LLMRecGen", "rule", config_dict=config)
    assert result["test_result"]["hit@1"] >= 0.8, result["test_result"]


@pytest.mark.parametrize("key,value,fragment", [
    ("eisam_scope", "head", "eisam_scope=head perturbs a head"),
    ("metrics", ["Hit", "TailMRR"], "['TailMRR'] need the target's rank among all items"),
    ("num_beams", 5, "num_beams 5 is smaller than the largest topk 10"),
    ("gen_inference", "sample", "gen_inference must be 'beam' or 'grounding', got 'sample'"),
])
def test_refusals_name_the_key(tiny_gen, key, value, fragment):
    with pytest.raises(ValueError) as info:
        build(dict(tiny_gen, **{key: value}))
    assert fragment in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("method", ["eisam", "logit_adjust", "logit_adjust_posthoc", "reweight", "imbsam"])
def test_every_method_runs_end_to_end(tiny_gen, method):
    result = run("LLMRecGen", "tiny", config_dict=dict(tiny_gen, train_method=method))
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0 and 0.0 <= result["test_result"]["tailndcg@10"] <= 1.0


def test_prior_scores_are_the_models_own_title_likelihoods(tiny_gen, tmp_path):
    """The prior long-tail study's ``--scorer=model``: each item's score is LLMRecGen's
    log-likelihood per token of its target after its prompt with an empty history."""
    from recbole_eisam.analysis import prior_longtail as pl

    result = pl.run_study("LLMRecGen", "tiny", config_dict=tiny_gen, scorer="model", out=str(tmp_path / "study"))
    items = result["items"]
    assert np.isfinite(items["prior_score"]).all() and items["prior_score"].nunique() > 1
    assert "LLMRecGen's log-likelihood per token" in (tmp_path / "study" / "prior_longtail.md").read_text()
    model, _, _ = build(tiny_gen)
    ids, _, lens = model.prompt_builder(torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    prompt = ids[0, : lens[0]].tolist()
    assert model.tokenizer.decode(prompt) == "H:\nN:"
    for item in (1, 5, 9):
        tokens = model.target_ids[item, : model.target_len[item]].tolist()
        with torch.no_grad():
            logp = out_log_probs(model, model.backbone(input_ids=torch.tensor([prompt + tokens])).logits[0])
        hand = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(tokens)) / len(tokens)
        assert items["prior_score"].iloc[item - 1] == pytest.approx(hand.item(), abs=1e-5)  # rows: internal ids 1..
    with pytest.raises(ValueError, match="needs a model that writes titles"):
        pl.run_study("SASRec", "tiny", config_dict=tiny_gen, scorer="model")


# ------------------------------------------------------------------ grounding (BIGRec's two steps)
def test_free_writing_is_greedy_decoding_without_the_cache(tiny_gen):
    model, _, (_, _, test) = build(tiny_gen)
    model.eval()
    inter = first(test)[:3]
    written = model.generate_free(inter)
    end = int(model.to_out[model.end_token_id])
    ids, _, lens = model.prompt_builder(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN])
    for j in range(3):
        sequence = ids[j, : lens[j]].tolist()
        expected = []
        with torch.no_grad():
            while len(expected) < model.target_ids.size(1):
                logp = out_log_probs(model, model.backbone(input_ids=torch.tensor([sequence])).logits[0, -1])
                token = int(model.to_out[int(logp.argmax())])
                expected.append(token)
                if token == end:
                    break
                sequence.append(int(model.vocab_ids[token]))
        if expected[-1] != end:
            expected.append(end)
        row = written[j].tolist()
        assert row[: row.index(end) + 1] == expected


def test_grounding_ranks_every_item_by_distance_to_the_written_text(tiny_gen, monkeypatch):
    model, _, (_, _, test) = build(dict(tiny_gen, gen_inference="grounding"))
    model.eval()
    inter = first(test)
    titled = model.target_len > 0
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
        assert scores.shape == (len(inter), model.n_items)
        assert torch.isfinite(scores[:, titled]).all() and not torch.isfinite(scores[:, ~titled]).any()
        # an item's embedding: the last hidden state at its end token, its target fed alone
        tokens = model.target_ids[7, : model.target_len[7]]
        hand = model._decoder_and_head()[0](input_ids=tokens.unsqueeze(0)).last_hidden_state[0, -1]
        assert torch.allclose(model.item_embeddings()[7], hand, atol=1e-5)
        # writing item 7's target exactly puts item 7 first, at distance 0
        target7 = model.to_out[tokens].unsqueeze(0).expand(len(inter), -1)
        monkeypatch.setattr(model, "generate_free", lambda interaction, max_tokens=None: target7)
        scores = model.full_sort_predict(inter)
        assert (scores.argmax(1) == 7).all() and torch.allclose(scores[:, 7], torch.zeros(len(inter)), atol=1e-3)
        model.posthoc_tau = 1.0  # post-hoc logit adjustment: minus tau log prior of each item
        prior = model.counts.float().clamp(min=1) / model.counts.sum()
        adjusted = model.full_sort_predict(inter)
        assert torch.allclose(adjusted[:, titled], (scores - prior.log())[:, titled], atol=1e-4)
    model.train()
    assert model._item_embeddings is None  # the adapters move on: embeddings are recomputed


def test_grounding_runs_end_to_end_with_full_rank_metrics(tiny_gen):
    config = dict(tiny_gen, gen_inference="grounding", train_method="logit_adjust_posthoc",
                  metrics=["Hit", "NDCG", "MRR", "TailMRR", "HeadMRR", "TailNDCG"])
    result = run("LLMRecGen", "tiny", config_dict=config)
    assert 0.0 < result["test_result"]["tailmrr"] <= 1.0 and 0.0 < result["test_result"]["headmrr"] <= 1.0


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_length_groups_give_the_same_losses_and_gradients(tiny_gen, tau):
    model, _, (train, _, _) = build(tiny_gen)
    batch = first(train)
    lengths = model.teacher_forcing_inputs(batch, batch[model.POS_ITEM_ID])[1].sum(1)
    assert lengths.unique().numel() > 3  # groups of different widths
    results = {}
    for buckets in (1, 4):
        model.prompt_length_buckets = buckets
        model.zero_grad()
        losses = model.calculate_sample_losses(batch, tau)[0]
        losses.sum().backward()
        results[buckets] = (losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(results[1][0], results[4][0], rtol=1e-5, atol=1e-5)
    assert results[1][1].keys() == results[4][1].keys() and results[1][1]
    for name, grad in results[1][1].items():
        assert torch.allclose(grad, results[4][1][name], rtol=1e-4, atol=1e-5), name
