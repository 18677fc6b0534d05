"""The prior long-tail study on a tiny random Llama model and the tiny dataset."""

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_eisam.analysis import prior_longtail as pl


def _tiny_lm(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def _reference_score(model, tokenizer, prompt, text):
    """One title at a time, no padding: the log-likelihood written out token by token."""
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    title = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + title])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(np.mean([logp[len(prefix) + t - 1, title[t]].item() for t in range(len(title))]))


@pytest.fixture
def lm():
    words = ["Title:", "Movie", "Number"] + [str(i) for i in range(1, 61)] + [f"({1950 + i})" for i in range(1, 61)]
    return _tiny_lm(words)


def test_batched_scores_equal_one_by_one(lm):
    model, tokenizer = lm
    texts = ["Movie Number 1 (1951)", "Movie 7", "", "Number 12 (1962) Movie Number 3"]
    scores = pl.prior_scores(texts, model, tokenizer, prompt="Title:", batch_size=3)
    assert math.isnan(scores[2])
    for i in (0, 1, 3):
        assert scores[i] == pytest.approx(_reference_score(model, tokenizer, "Title:", texts[i]), abs=1e-4)
    assert len({round(s, 6) for s in scores[[0, 1, 3]]}) == 3  # a real function of the text


def test_top_share_mask():
    mask = pl.top_share_mask([0.5, np.nan, 0.9, 0.5, -1.0], 0.4)  # ceil(0.4 * 5) = 2
    assert mask.tolist() == [True, False, True, False, False]


def test_study_scores_every_item_and_partitions_users(tiny_data, tiny_config_dict, lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_path, name = tiny_data
    inter = pd.read_csv(os.path.join(data_path, name, f"{name}.inter"), sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    last = inter.sort_values("timestamp").groupby("user_id").tail(1)  # leave-one-out test targets
    rng = np.random.default_rng(0)
    rows = []
    for user, target in zip(last["user_id"], last["item_id"]):
        topk = [f"i{i}" for i in rng.permutation(60)[:10] + 1]
        rows.append((user, target, " ".join(topk)))
    frame = pd.DataFrame(rows, columns=["user_id", "target_item_id", "topk_item_ids"])
    erm = tmp_path / "erm.tsv"
    frame.to_csv(erm, sep="\t", index=False)
    config = dict(tiny_config_dict, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]})
    out = str(tmp_path / "study")
    result = pl.run_study("SASRec", name, config_dict=config, llm=lm, topk_files={"erm": [str(erm), str(erm)]},
                          prompt="Title:", out=out)

    items = result["items"]
    n_items = inter["item_id"].nunique()  # RecBole keeps the items that occur in interactions
    assert len(items) == n_items and set(items["item_id"]) == set(inter["item_id"])  # one score per item
    assert np.isfinite(items["prior_score"]).all()
    assert items["prior_head"].sum() == math.ceil(0.2 * n_items) == items["is_head"].sum()
    expected = _reference_score(lm[0], lm[1], "Title:", items["text"].iloc[4])
    assert items["prior_score"].iloc[4] == pytest.approx(expected, abs=1e-4)
    assert -1 <= result["spearman_rho"] <= 1

    table = result["tables"]["erm"]
    assert len(table) == 4 and table["users"].sum() == 2 * len(frame)  # two files pooled
    # recompute the cells by hand: every test row lands in exactly one cell
    lookup = items.set_index("item_id")
    hits = 0
    for _, cell in table.iterrows():
        sel = [
            (lookup.loc[t, "prior_head"] == (cell["prior"] == "head")) and (lookup.loc[t, "is_head"] == (cell["data"] == "head"))
            for t in frame["target_item_id"]
        ]
        sub = frame[sel]
        assert cell["users"] == 2 * len(sub)
        hits += len(sub)
        if len(sub):
            manual = np.mean([1 / math.log2(r.split().index(t) + 2) if t in r.split() else 0.0
                              for t, r in zip(sub["target_item_id"], sub["topk_item_ids"])])
            assert cell["ndcg"] == pytest.approx(manual)
    assert hits == len(frame)
    for filename in ("prior_scores.tsv", "prior_longtail.md", "prior_longtail.json"):
        assert os.path.isfile(os.path.join(out, filename))

    # the saved scores are reused without the LM
    again = pl.run_study("SASRec", name, config_dict=config, llm=None, scores_file=os.path.join(out, "prior_scores.tsv"),
                         topk_files={"erm": [str(erm)]})
    np.testing.assert_allclose(again["items"]["prior_score"], items["prior_score"], rtol=1e-6)
