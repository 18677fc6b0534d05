"""One EISAM step against G computed independently from per-sample losses.

Tiny SASRec, dropout 0, SGD with learning rate 1 and one full batch (every training sample):
the parameter change of one step is exactly -G. The reference G is built here with
``torch.func.functional_call`` and plain autograd from the per-sample cross-entropy, with
item frequencies counted from the batch itself (its targets, plus each user's first item,
the history of the rows of length 1), never with the trainer's helpers. The tests with
dropout > 0 draw the reference's masks from the random state the trainer's step began with.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from recbole_eisam import patches

patches.apply()

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.dataloader import TrainDataLoader  # noqa: E402
from recbole.utils import get_model, init_seed  # noqa: E402

from recbole_eisam.trainer import EISAMTrainer  # noqa: E402

PROPS = ["properties/overall.yaml", "properties/eisam.yaml"]
RHO = 0.5  # large enough that theta + e differs clearly from theta


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("step")
    data_path = write_tiny_dataset(str(root / "data"))
    config = Config(
        model="SASRec",
        dataset="tiny",
        config_file_list=PROPS,
        config_dict={
            "data_path": data_path,
            "checkpoint_dir": str(root / "saved"),
            "show_progress": False,
            "MAX_ITEM_LIST_LENGTH": 10,
            "hidden_size": 8,
            "inner_size": 16,
            "n_layers": 1,
            "n_heads": 1,
            "hidden_dropout_prob": 0.0,
            "attn_dropout_prob": 0.0,
            "train_batch_size": 100000,  # one full batch
            "learner": "sgd",
            "learning_rate": 1.0,
            "metrics": ["Hit", "NDCG"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "device": "cpu",
            "use_gpu": False,
            "eisam_rho": RHO,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    batch = next(iter(train_data))
    assert len(batch) == len(train_data.dataset)  # one batch holds every training sample
    return config, train_data, batch


def make_trainer(setup, dtype=torch.float32, **keys):
    config, train_data, _ = setup
    base = {"train_method": "erm", "eisam_lambda": 1.0, "eisam_weight": "power", "eisam_alpha": 0.5, "eisam_rho": RHO,
            "eisam_weight_norm": "max", "base_loss": None, "imbsam_split": "eta", "imbsam_eta": 20,
            "gradient_accumulation_steps": 1, "learning_rate": 1.0, "clip_grad_norm": None,
            "reweight_beta": None, "reweight_eisam_weight": False, "logit_adjust_tau": None,
            "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}
    for key, value in {**base, **keys}.items():
        config[key] = value
    init_seed(config["seed"], True)
    model = get_model("SASRec")(config, train_data._dataset).to(dtype)
    trainer = EISAMTrainer(config, model)
    trainer.setup_item_weights(train_data.dataset)
    return trainer, model


def one_step(trainer, model, train_data):
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer._train_epoch(train_data, 0)
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}, before


# ------------------------------------------------------------------ independent reference


def f32(x):
    """The trainer keeps weight vectors in float32: round the reference's the same way."""
    return x.float().to(x.dtype)


def train_counts(batch, n_items):
    """Every training interaction of the full batch: the targets, and each user's first item
    (the one-item history of that user's first row, never a target)."""
    first = batch["item_id_list"][batch["item_length"] == 1, 0]
    return torch.bincount(batch["item_id"], minlength=n_items) + torch.bincount(first, minlength=n_items)


def losses(model, params, e_out, batch, tau=0.0, beta=0.0, seed=None):
    """Per-sample CE with the backbone (and the input lookup) at ``params`` and the output
    layer ``e_out``: logits = forward(params) @ e_out^T, on the logit-adjusted loss
    (logits + tau log prior) or the re-weighted one; dropout masks from ``seed``'s state."""
    if seed is not None:
        torch.random.set_rng_state(seed)
    seq_output = functional_call(model, params, (batch["item_id_list"], batch["item_length"]))
    logits = seq_output @ e_out.T
    target = batch["item_id"]
    n = train_counts(batch, logits.size(1)).to(logits.dtype)
    if tau:
        logits = logits + tau * f32(torch.log(n.clamp(min=1) / n.sum()))
    loss = F.cross_entropy(logits, target, reduction="none")
    if beta:
        r = n.clamp(min=1) ** -beta
        loss = loss * f32(r / ((n * r).sum() / n.sum()))[target]
    return loss


def batch_losses(model, params, batch, tau=0.0, beta=0.0, seed=None):
    """Per-sample CE of the batch at ``params`` (tied input / output item embedding)."""
    return losses(model, params, params["item_embedding.weight"], batch, tau, beta, seed)


def grad_of(fn, params):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(fn(leaves), list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def add(params, direction, scale=1.0):
    return {k: params[k] + scale * direction[k] for k in params}


def norm(direction):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in direction.values()))


def sharpness_G(model, params, batch, w, lam, rho=RHO, **loss_kw):
    """G = grad L(theta) - lam grad L_w(theta) + lam grad L_w(theta + e), e = rho g_w / ||g_w||."""
    target = batch["item_id"]

    def L(p):
        return batch_losses(model, p, batch, **loss_kw).mean()

    def Lw(p):
        return (w[target] * batch_losses(model, p, batch, **loss_kw)).mean()

    g = grad_of(L, params)
    if lam == 0:
        return g
    g_w = grad_of(Lw, params)
    e_scale = rho / norm(g_w)
    g_w_e = grad_of(Lw, add(params, g_w, e_scale.to(g_w[next(iter(g_w))].dtype)))
    return {k: g[k] - lam * g_w[k] + lam * g_w_e[k] for k in g}


def rel_err(delta, G):
    num = torch.sqrt(sum(((delta[k].double() + G[k].double()) ** 2).sum() for k in G))
    return (num / norm(G)).item()


def power_weights(batch, n_items, alpha=0.5, c=1.0, dtype=torch.float64, norm="max"):
    n = train_counts(batch, n_items).to(dtype)
    raw = (n + c) ** -alpha
    if norm == "max":
        return f32(raw / raw[n > 0].max())
    return f32(raw / ((n * raw).sum() / n.sum()))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("norm", ["max", "mean"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_eisam_step_equals_minus_G(setup, dtype, tol, norm):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, dtype, train_method="eisam", eisam_lambda=0.7, eisam_weight_norm=norm)
    delta, before = one_step(trainer, model, train_data)
    w = power_weights(batch, model.n_items, dtype=dtype, norm=norm)
    G = sharpness_G(model, before, batch, w, lam=0.7)
    assert rel_err(delta, G) < tol
    # the sharpness term matters: plain ERM is far from this step
    assert rel_err(delta, grad_of(lambda p: batch_losses(model, p, batch).mean(), before)) > 1e-3
    assert trainer.epoch_stats["mean_sharpness"] > 0


@pytest.mark.parametrize("keys", [dict(train_method="eisam", eisam_lambda=0.0), dict(train_method="erm"),
                                  dict(train_method="logit_adjust_posthoc")])
def test_lambda_zero_is_erm(setup, keys):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, **keys)
    delta, before = one_step(trainer, model, train_data)
    G = grad_of(lambda p: batch_losses(model, p, batch).mean(), before)
    assert rel_err(delta, G) < 1e-10


def test_sam_preset_is_sam(setup):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, train_method="sam", eisam_lambda=1.0, eisam_weight="log")
    delta, before = one_step(trainer, model, train_data)

    def L(p):
        return batch_losses(model, p, batch).mean()

    g = grad_of(L, before)
    G = grad_of(L, add(before, g, RHO / norm(g)))  # SAM: grad L(theta + rho g/||g||)
    assert rel_err(delta, G) < 1e-10
    # a tuned lambda mixes the plain and the perturbed gradient: (1 - lambda) g + lambda g(theta + e)
    trainer, model = make_trainer(setup, torch.float64, train_method="sam", eisam_lambda=0.3)
    delta, before = one_step(trainer, model, train_data)
    assert rel_err(delta, {k: 0.7 * g[k] + 0.3 * G[k] for k in g}) < 1e-10


@pytest.mark.parametrize("split", ["eta", "head_ratio"])
def test_imbsam_preset_is_imbsam(setup, split):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, train_method="imbsam", imbsam_split=split, imbsam_eta=4)
    delta, before = one_step(trainer, model, train_data)
    target = batch["item_id"]
    n = train_counts(batch, model.n_items)
    if split == "eta":  # ImbSAM's official split: fewer than eta training interactions
        tail = n < 4
    else:
        order = sorted(range(1, model.n_items), key=lambda i: (-int(n[i]), i))
        tail = torch.ones(model.n_items, dtype=torch.bool)
        tail[order[: math.ceil(0.2 * (model.n_items - 1))]] = False
    is_tail = tail[target].double()
    assert 0 < is_tail.mean() < 1

    def L_head(p):
        return ((1 - is_tail) * batch_losses(model, p, batch)).sum() / len(target)

    def L_tail(p):
        return (is_tail * batch_losses(model, p, batch)).sum() / len(target)

    g_tail = grad_of(L_tail, before)
    g_head = grad_of(L_head, before)
    g_tail_e = grad_of(L_tail, add(before, g_tail, RHO / norm(g_tail)))
    G = {k: g_head[k] + g_tail_e[k] for k in g_head}  # ImbSAM (Zhou et al. 2023)
    assert rel_err(delta, G) < 1e-10


@pytest.mark.parametrize(
    "keys,kw",
    [
        (dict(train_method="eisam_la", logit_adjust_tau=1.0), dict(tau=1.0)),
        (dict(train_method="eisam_rw", reweight_beta=0.5), dict(beta=0.5)),
        (dict(train_method="eisam", base_loss="logit_adjust", logit_adjust_tau=0.5), dict(tau=0.5)),
    ],
)
def test_sharpness_on_an_adjusted_base_loss(setup, keys, kw):
    """EISAM on the logit-adjusted / re-weighted loss: L and L_w are both built from it."""
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, eisam_lambda=1.0, **keys)
    delta, before = one_step(trainer, model, train_data)
    w = power_weights(batch, model.n_items)
    G = sharpness_G(model, before, batch, w, lam=1.0, **kw)
    assert rel_err(delta, G) < 1e-10
    assert rel_err(delta, sharpness_G(model, before, batch, w, lam=1.0)) > 1e-4  # the base loss matters


@pytest.mark.parametrize("method,kw", [("reweight", dict(beta=1.0)), ("logit_adjust", dict(tau=1.0))])
def test_reweight_and_logit_adjust_methods(setup, method, kw):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, train_method=method)
    delta, before = one_step(trainer, model, train_data)
    G = grad_of(lambda p: batch_losses(model, p, batch, **kw).mean(), before)
    assert rel_err(delta, G) < 1e-10


def test_logit_adjusted_loss_adds_the_prior():
    """Menon et al.: the loss form trains on logits + tau log prior. With all-zero logits the
    loss of a popular target is then lower than a rare one's (the prior does its work),
    the sign that makes the model learn less of the prior."""
    from recbole_eisam.trainer import log_prior, per_sample_losses

    counts = torch.tensor([0, 90, 10])
    prior = log_prior(counts)
    loss = per_sample_losses(torch.zeros(2, 3), torch.tensor([1, 2]), prior, tau=1.0)
    expected = -torch.log_softmax(prior, dim=0)[[1, 2]]
    assert torch.allclose(loss, expected)
    assert loss[0] < loss[1]


def test_reweight_with_eisams_weighting(setup):
    """reweight_only's setting: ERM on the loss weighted by EISAM's own w(n) (power, alpha 1)."""
    _, train_data, batch = setup
    trainer, model = make_trainer(
        setup, torch.float64, train_method="reweight", reweight_eisam_weight=True, eisam_alpha=1.0
    )
    delta, before = one_step(trainer, model, train_data)
    w = power_weights(batch, model.n_items, alpha=1.0, norm="mean")  # loss weights keep the loss's scale
    G = grad_of(lambda p: (w[batch["item_id"]] * batch_losses(model, p, batch)).mean(), before)
    assert rel_err(delta, G) < 1e-10
    plain = grad_of(lambda p: batch_losses(model, p, batch).mean(), before)
    assert rel_err(delta, plain) > 1e-3  # the weights change the step


def three_micro_batches(setup):
    """The full batch of ``setup`` as a loader of 3 micro-batches, the last one smaller."""
    config, train_data, _ = setup
    config["train_batch_size"] = math.ceil(len(train_data.dataset) / 3) + 1
    try:
        micro = TrainDataLoader(config, train_data.dataset, None, shuffle=True)
    finally:
        config["train_batch_size"] = 100000
    assert len(micro) == 3
    return micro


def test_gradient_accumulation_equals_full_batch(setup):
    config, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, train_method="eisam", gradient_accumulation_steps=3)
    n = len(train_data.dataset)
    micro = three_micro_batches(setup)
    delta, before = one_step(trainer, model, micro)
    assert trainer.epoch_stats["steps"] == 1 and trainer.epoch_stats["samples"] == n
    G = sharpness_G(model, before, batch, power_weights(batch, model.n_items), lam=1.0)
    assert rel_err(delta, G) < 1e-10


def test_restoration_is_exact(setup):
    _, train_data, _ = setup
    trainer, model = make_trainer(setup, torch.float32, train_method="eisam")
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    delta, before = one_step(trainer, model, train_data)
    assert trainer.epoch_stats["mean_sharpness"] != 0  # theta + e was visited
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # bit-identical: e removed exactly


def test_clip_grad_norm_applies_to_G(setup):
    _, train_data, batch = setup
    trainer, model = make_trainer(
        setup, torch.float64, train_method="eisam", clip_grad_norm={"max_norm": 0.01, "norm_type": 2}
    )
    delta, before = one_step(trainer, model, train_data)
    G = sharpness_G(model, before, batch, power_weights(batch, model.n_items), lam=1.0)
    scale = 0.01 / (norm(G).item() + 1e-6)
    assert scale < 1
    assert rel_err(delta, {k: v * scale for k, v in G.items()}) < 1e-8


def test_non_finite_norm_skips_step(setup, caplog):
    _, train_data, _ = setup
    trainer, model = make_trainer(setup, torch.float32, train_method="eisam")
    trainer.item_weight = trainer.item_weight * 1e30  # finite grads whose fp32 norm overflows
    delta, _ = one_step(trainer, model, train_data)
    assert trainer.epoch_stats["skipped_steps"] == 1
    assert all(torch.count_nonzero(d) == 0 for d in delta.values())


# ------------------------------------------------------------------ dropout: one mask per sample


def dropout_trainer(setup, **keys):
    """A float64 EISAM trainer on SASRec with dropout 0.5 (hidden and attention)."""
    return make_trainer(setup, torch.float64, train_method="eisam", eisam_lambda=1.0,
                        hidden_dropout_prob=0.5, attn_dropout_prob=0.5, **keys)


def step_from(trainer, model, batches, state):
    """One optimizer step on ``batches`` from the torch random state ``state``: the change of
    every parameter."""
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.random.set_rng_state(state)
    trainer._step(batches, torch.amp.GradScaler("cuda", enabled=False))
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}, before


def test_both_passes_see_the_same_dropout_masks(setup):
    """With dropout 0.5, the step equals -G where every forward of the reference (at theta
    and at theta + e) draws its masks from the state the step began with."""
    _, _, batch = setup
    trainer, model = dropout_trainer(setup)
    state = torch.random.get_rng_state()
    delta, before = step_from(trainer, model, [batch], state)
    w = power_weights(batch, model.n_items)
    G = sharpness_G(model, before, batch, w, lam=1.0, seed=state)
    assert rel_err(delta, G) < 1e-10
    # fresh masks at theta + e (the second forward drawing on from the first) give another step
    model.train()
    torch.random.set_rng_state(state)
    batch_losses(model, before, batch)  # the masks of pass 1
    fresh = torch.random.get_rng_state()
    g = grad_of(lambda p: batch_losses(model, p, batch, seed=state).mean(), before)
    g_w = grad_of(lambda p: (w[batch["item_id"]] * batch_losses(model, p, batch, seed=state)).mean(), before)
    shifted = add(before, g_w, RHO / norm(g_w))
    g_w_e = grad_of(lambda p: (w[batch["item_id"]] * batch_losses(model, p, batch, seed=fresh)).mean(), shifted)
    mixed = {k: g[k] - g_w[k] + g_w_e[k] for k in g}
    assert rel_err(delta, mixed) > 1e-3


def micro_losses(model, params, micro, counts, seed):
    """Per-sample CE of each micro-batch in turn, the random state set once before the first:
    each micro-batch draws the masks it draws in the trainer's pass 1."""
    torch.random.set_rng_state(seed)
    out = []
    for mb in micro:
        logits = functional_call(model, params, (mb["item_id_list"], mb["item_length"])) @ params[
            "item_embedding.weight"].T
        out.append(F.cross_entropy(logits, mb["item_id"], reduction="none"))
    return torch.cat(out)


def test_dropout_masks_with_gradient_accumulation(setup):
    """Each micro-batch's second forward reuses that micro-batch's first-pass masks."""
    _, _, batch = setup
    trainer, model = dropout_trainer(setup, gradient_accumulation_steps=3)
    micro = [mb for mb in three_micro_batches(setup)]
    state = torch.random.get_rng_state()
    delta, before = step_from(trainer, model, micro, state)
    counts = train_counts(batch, model.n_items)
    w = power_weights(batch, model.n_items)
    wj = torch.cat([w[mb["item_id"]] for mb in micro])

    def L(p):
        return micro_losses(model, p, micro, counts, state).mean()

    def Lw(p):
        return (wj * micro_losses(model, p, micro, counts, state)).mean()

    g, g_w = grad_of(L, before), grad_of(Lw, before)
    g_w_e = grad_of(Lw, add(before, g_w, RHO / norm(g_w)))
    G = {k: g[k] - g_w[k] + g_w_e[k] for k in g}
    assert rel_err(delta, G) < 1e-10


def test_sharpness_term_starts_at_eisam_start_epoch(setup):
    """eisam_start_epoch: 1 defers the sharpness term: epoch 0 steps on the base loss alone,
    epoch 1 takes the EISAM step."""
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, train_method="eisam_la", eisam_start_epoch=1)
    delta, before = one_step(trainer, model, train_data)  # epoch 0
    assert rel_err(delta, grad_of(lambda p: batch_losses(model, p, batch, tau=1.0).mean(), before)) < 1e-10
    assert "sharpness" not in trainer.epoch_stats or trainer.epoch_stats["mean_sharpness"] == 0
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer._train_epoch(train_data, 1)
    delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}
    G = sharpness_G(model, before, batch, power_weights(batch, model.n_items), lam=1.0, tau=1.0)
    assert rel_err(delta, G) < 1e-10
