"""``eisam_scope: head``: one step against G computed independently, with e on the head only.

Tiny SASRec (dropout 0, SGD with learning rate 1, one full batch): the parameter change of
one head-scope step is exactly -G, where (docs/EISAM.md, "Where the perturbation lives")

    G = grad L(theta) - lambda grad L_w(theta) + lambda grad L_w(theta with head + e)
    e = rho g_w / ||g_w||,  g_w = the gradient of L_w w.r.t. the head only.

SASRec's item embedding E is tied (input lookup and output layer): the head is its OUTPUT
use, so the reference below gives the loss two separate arguments, E_in for the lookup and
E_out for the logits, and perturbs E_out only. Item frequencies come from the batch itself
(never the trainer's helpers); the reference uses torch.func.functional_call and autograd.
LLMRec's test runs with head and LoRA dropout: the head at theta + e must see the masks
of the head at theta.
"""


import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from recbole_eisam import patches

patches.apply()

import test_eisam_step  # noqa: E402  (its trainer builder and one-step helper)
from recbole.utils import get_model  # noqa: E402

from recbole_eisam.trainer import EISAMTrainer  # noqa: E402
from recbole_eisam.trainer.losses import get_head_split, head_split_reason  # noqa: E402
from recbole_eisam.trainer.update import HeadScope, eisam_step  # noqa: E402

RHO = 0.5
E = "item_embedding.weight"


setup = test_eisam_step.setup  # the tiny SASRec, one full batch, SGD lr 1 (a module fixture)


def make_trainer(setup, dtype=torch.float32, **keys):
    """test_eisam_step's trainer (SGD lr 1, no clipping), with EISAM in head scope by default."""
    return test_eisam_step.make_trainer(setup, dtype, **{"train_method": "eisam", "eisam_scope": "head", **keys})


one_step = test_eisam_step.one_step


# ------------------------------------------------------------------ independent reference


def f32(x):
    return x.float().to(x.dtype)  # the trainer keeps weight vectors in float32


losses = test_eisam_step.losses  # per-sample CE with the output layer given apart


def leaves(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def grad(value, p):
    grads = torch.autograd.grad(value, list(p.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(p.items(), grads)}


def power_weights(batch, n_items, dtype, alpha=0.5, c=1.0):
    return test_eisam_step.power_weights(batch, n_items, alpha, c, dtype)


def head_G(model, theta, batch, w, lam, rho=RHO, **kw):
    """G with e on the output use of E only (the formula, written out)."""
    p = leaves(theta)
    g = grad(losses(model, p, p[E], batch, **kw).mean(), p)  # grad L, both uses of E
    if lam == 0:
        return g
    wj = w[batch["item_id"]]
    p = leaves(theta)
    g_lw = grad((wj * losses(model, p, p[E], batch, **kw)).mean(), p)  # grad L_w, both uses
    e_out = theta[E].detach().clone().requires_grad_(True)
    p = {k: v.detach() for k, v in theta.items()}
    (g_w,) = torch.autograd.grad((wj * losses(model, p, e_out, batch, **kw)).mean(), [e_out])  # head only
    e = (rho / torch.linalg.vector_norm(g_w.double())).to(g_w.dtype) * g_w
    p = leaves(theta)
    g_lw_e = grad((wj * losses(model, p, p[E] + e, batch, **kw)).mean(), p)  # at head + e
    return {k: g[k] - lam * g_lw[k] + lam * g_lw_e[k] for k in g}


def norm(d):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))


def rel_err(delta, G):
    return (norm({k: delta[k].double() + G[k].double() for k in G}) / norm(G)).item()


# ------------------------------------------------------------------ SASRec


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_head_step_equals_minus_G(setup, dtype, tol):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, dtype, eisam_lambda=0.7)
    assert trainer.head_split.head_names == [E]
    delta, before = one_step(trainer, model, train_data)
    w = power_weights(batch, model.n_items, dtype)
    G = head_G(model, before, batch, w, lam=0.7)
    assert rel_err(delta, G) < tol
    assert trainer.epoch_stats["mean_sharpness"] > 0
    # a different update from ERM and from full-scope EISAM
    assert rel_err(delta, head_G(model, before, batch, w, lam=0.0)) > 1e-4
    trainer_all, model_all = make_trainer(setup, dtype, eisam_lambda=0.7, eisam_scope="all")
    delta_all, _ = one_step(trainer_all, model_all, train_data)
    assert rel_err(delta, {k: -v for k, v in delta_all.items()}) > 1e-4


@pytest.mark.parametrize(
    "keys,kw", [(dict(train_method="eisam_la"), dict(tau=1.0)), (dict(train_method="eisam_rw", reweight_beta=0.5),
                                                                  dict(beta=0.5))]
)
def test_head_step_on_an_adjusted_base_loss(setup, keys, kw):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, **keys)
    delta, before = one_step(trainer, model, train_data)
    w = power_weights(batch, model.n_items, torch.float64)
    G = head_G(model, before, batch, w, lam=1.0, **kw)
    assert rel_err(delta, G) < 1e-10


def test_head_scope_lambda_zero_is_erm(setup):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64, eisam_lambda=0.0)
    delta, before = one_step(trainer, model, train_data)  # dispatched to the plain step
    G = head_G(model, before, batch, None, lam=0.0)
    assert rel_err(delta, G) < 1e-10
    # the head step itself with lambda = 0 is ERM too
    trainer, model = make_trainer(setup, torch.float64, eisam_lambda=0.0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    eisam_step(trainer, [batch], HeadScope(trainer), torch.amp.GradScaler("cuda", enabled=False))
    delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}
    assert rel_err(delta, G) < 1e-10


def test_head_step_gradient_accumulation_equals_full_batch(setup):
    _, _, batch = setup
    trainer, model = make_trainer(setup, torch.float64, gradient_accumulation_steps=3)
    micro = test_eisam_step.three_micro_batches(setup)
    delta, before = one_step(trainer, model, micro)
    assert trainer.epoch_stats["steps"] == 1
    G = head_G(model, before, batch, power_weights(batch, model.n_items, torch.float64), lam=1.0)
    assert rel_err(delta, G) < 1e-10


def test_head_step_runs_the_backbone_once(setup):
    _, _, batch = setup
    calls = {"forward": 0, "backward": 0}
    # all: pass 1 = one forward and two backwards (g_w, then the objective), pass 2 = one of each
    for scope, expected in (("head", (1, 1)), ("all", (2, 3))):
        trainer, model = make_trainer(setup, torch.float32, eisam_scope=scope)
        calls.update(forward=0, backward=0)
        model.LayerNorm.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
        model.LayerNorm.register_full_backward_hook(
            lambda *a: calls.__setitem__("backward", calls["backward"] + 1)
        )
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        trainer._step([batch], torch.amp.GradScaler("cuda", enabled=False))
        assert (calls["forward"], calls["backward"]) == expected, scope
        for k, p in model.named_parameters():  # the step moved every parameter, none is left perturbed
            assert not torch.equal(p.detach(), before[k]), k


def test_zero_head_gradient_gives_erm(setup):
    _, train_data, batch = setup
    trainer, model = make_trainer(setup, torch.float64)
    trainer.item_weight = torch.zeros_like(trainer.item_weight)  # L_w = 0: g_w = 0, e = 0
    delta, before = one_step(trainer, model, train_data)
    assert trainer.epoch_stats["zero_norm_steps"] == 1
    assert rel_err(delta, head_G(model, before, batch, None, lam=0.0)) < 1e-10


def test_scope_validation(setup):
    config, _, _ = setup
    with pytest.raises(ValueError, match="eisam_scope must be one of all, head"):
        make_trainer(setup, eisam_scope="backbone")
    config["eisam_scope"] = "head"
    model = get_model("SASRec")(config, setup[1]._dataset)
    assert head_split_reason(model) is None and get_head_split(model).head_names == [E]


# ------------------------------------------------------------------ LLMRec (tiny random Llama)


def test_llmrec_head_step_equals_minus_G(llm_head_config):
    from test_llmrec import build

    from recbole_eisam.quick_start import load_config

    model, (train, _, _), _ = build(llm_head_config)
    model.train()
    batch = next(iter(train))
    names = [n for n, _ in model.named_head_parameters()]
    assert get_head_split(model).head_names == names
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and set(names) < set(trainable)

    cfg = load_config("LLMRec", "tiny", config_dict=llm_head_config)
    trainer = EISAMTrainer(cfg, model)
    trainer.setup_item_weights(train.dataset)
    theta = {n: p.detach().clone() for n, p in trainable.items()}
    state = torch.random.get_rng_state()
    trainer._step([batch], torch.amp.GradScaler("cuda", enabled=False))
    delta = {n: trainable[n].detach() - theta[n] for n in trainable}

    class Score(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, h):
            return self.m.score(h)

    scorer = Score(model)
    target = batch[model.POS_ITEM_ID]
    feat = train.dataset.inter_feat
    first = feat[model.ITEM_SEQ][feat[model.ITEM_SEQ_LEN] == 1, 0]  # each user's first item
    counts = (torch.bincount(feat[model.ITEM_ID], minlength=model.n_items)
              + torch.bincount(first, minlength=model.n_items)).double()
    raw = (counts + 1.0) ** -0.5  # power weights, the rarest training item's weight 1
    wj = (raw / raw[counts > 0].max()).float()[target]

    def per_sample(p, head, fresh=False):
        torch.random.set_rng_state(state)  # the masks of the trainer's pass 1, backbone and head
        hidden = functional_call(model, p, (batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]))
        if fresh:  # draw pass 1's head masks, so that the head below draws new ones
            scorer(hidden.detach())
        logits = functional_call(scorer, {f"m.{k}": v for k, v in head.items()}, (hidden,))
        return F.cross_entropy(logits, target, reduction="none")

    lam = 0.7
    p = leaves(theta)
    g = grad(per_sample(p, {k: p[k] for k in names}).mean(), p)
    p = leaves(theta)
    g_lw = grad((wj * per_sample(p, {k: p[k] for k in names})).mean(), p)
    frozen = {k: v.detach() for k, v in theta.items()}
    head = {k: theta[k].detach().clone().requires_grad_(True) for k in names}
    g_w = torch.autograd.grad((wj * per_sample(frozen, head)).mean(), list(head.values()))
    scale = RHO / torch.sqrt(sum((x.double() ** 2).sum() for x in g_w))
    e = {k: (x * scale.float()) for k, x in zip(names, g_w)}
    p = leaves(theta)
    g_lw_e = grad((wj * per_sample(p, {k: p[k] + e[k] for k in names})).mean(), p)
    G = {k: g[k] - lam * g_lw[k] + lam * g_lw_e[k] for k in g}
    assert rel_err(delta, G) < 1e-5
    assert any("lora_" in k and G[k].abs().sum() > 0 for k in G)  # the backbone is trained too
    # the head's dropout matters: a pass 2 that drew fresh head masks would be far from this step
    p = leaves(theta)
    g_fresh = grad((wj * per_sample(p, {k: p[k] + e[k] for k in names}, fresh=True)).mean(), p)
    assert rel_err(delta, {k: g[k] - lam * g_lw[k] + lam * g_fresh[k] for k in g}) > 1e-3


@pytest.fixture
def llm_head_config(tiny_config_dict, tmp_path):
    test_llmrec = pytest.importorskip("test_llmrec")
    folder = test_llmrec.save_tiny_llama(tmp_path / "tiny_llama")
    return test_llmrec.tiny_llm_config(
        tiny_config_dict, folder, tmp_path / "llm_cache",
        train_batch_size=32, train_sample_num=0, learner="sgd", learning_rate=1.0, clip_grad_norm=None,
        train_method="eisam", eisam_scope="head", eisam_lambda=0.7, eisam_rho=RHO, eisam_weight="power",
        eisam_alpha=0.5, eisam_c=1.0, eisam_weight_norm="max", head_dropout=0.5, lora_dropout=0.3,
    )
