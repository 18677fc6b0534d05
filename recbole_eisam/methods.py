"""The one table of methods: what each name means to the trainer, the benchmark, the speed
benchmark and the report.

Every method is a setting of the same update (docs/EISAM.md): which sharpness term it adds
(none, SAM's uniform one, ImbSAM's tail-only one, EISAM's item-weighted one), which base loss
``l_j`` it is built on (plain, logit-adjusted or re-weighted cross-entropy), and whether the
prediction is logit-adjusted after training (post hoc). Most methods are a ``train_method``
of their own; the benchmark's ablations run another method with a few keys changed, and reuse
that method's validation-chosen values instead of being tuned.
"""

from dataclasses import dataclass

#: the base losses l_j a method can train on
BASE_LOSSES = ("ce", "logit_adjust", "reweight")
#: the roles a method plays in the benchmark and its report, in report order
ROLES = ("reference", "baseline", "eisam", "ablation")


@dataclass(frozen=True)
class Method:
    """One named method.

    Attributes:
        role: ``reference`` (ERM), ``baseline`` (a published long-tail method), ``eisam``
            (EISAM on one of the base losses) or ``ablation`` (EISAM with one part changed).
        summary: one line for the help, the docs and the report.
        sharpness: ``None`` (no sharpness term: lambda = 0), ``"uniform"`` (SAM),
            ``"imbsam"`` (w = 1 on ImbSAM's tail items, 0 elsewhere) or ``"item"``
            (EISAM's ``eisam_weight`` family). Only for a ``train_method``.
        base_loss: the loss ``l_j`` the method is built on (one of :data:`BASE_LOSSES`).
        posthoc: predictions are ``logits - tau * log prior`` (trained on ``base_loss``).
        runs: for an ablation, the ``train_method`` it runs and the keys it changes; ``None``
            for a method that is a ``train_method`` itself.
        inherit_from: the method whose validation-chosen values an ablation reuses.
        inherit_keys: which of those values (``None``: all of them).
    """

    role: str
    summary: str
    sharpness: str = None
    base_loss: str = "ce"
    posthoc: bool = False
    runs: dict = None
    inherit_from: str = None
    inherit_keys: tuple = None

    @property
    def composes(self):
        """Whether the ``base_loss`` key may choose this method's loss (the plain sharpness
        methods); every other method is defined by its base loss."""
        return self.sharpness is not None and self.base_loss == "ce"

    def inherited(self, chosen):
        """The values this ablation takes from ``chosen``, its source's chosen values."""
        return {k: v for k, v in chosen.items() if self.inherit_keys is None or k in self.inherit_keys}


METHODS = {
    "erm": Method("reference", "plain training on the cross-entropy"),
    "sam": Method("baseline", "SAM: every sample's sharpness (Foret et al. 2021)", sharpness="uniform"),
    "imbsam": Method(
        "baseline", "ImbSAM: sharpness of the items with < imbsam_eta samples only (Zhou et al. 2023)",
        sharpness="imbsam",
    ),
    "reweight": Method("baseline", "loss weights ~ n_i^-beta, no sharpness term", base_loss="reweight"),
    "logit_adjust": Method(
        "baseline", "logit-adjusted loss: train on logits + tau log prior (Menon et al. 2021)",
        base_loss="logit_adjust",
    ),
    "logit_adjust_posthoc": Method(
        "baseline", "post-hoc logit adjustment: plain training, predict with logits - tau log prior", posthoc=True
    ),
    "eisam": Method("eisam", "EISAM: sharpness weighted by the target item's w(n_i)", sharpness="item"),
    "eisam_la": Method("eisam", "EISAM on the logit-adjusted loss", sharpness="item", base_loss="logit_adjust"),
    "eisam_rw": Method("eisam", "EISAM on the re-weighted loss", sharpness="item", base_loss="reweight"),
    "eisam_head": Method(
        "ablation", "EISAM with e on the head only (one backbone pass per step), EISAM's chosen values",
        runs={"train_method": "eisam", "eisam_scope": "head"}, inherit_from="eisam",
    ),
    "eisam_noweight": Method(
        "ablation", "EISAM with uniform w (SAM with lambda), EISAM's chosen rho and lambda",
        runs={"train_method": "eisam", "eisam_weight": "uniform"}, inherit_from="eisam",
        inherit_keys=("eisam_rho", "eisam_lambda"),
    ),
    "reweight_only": Method(
        "ablation", "EISAM's frequency weighting as loss weights, no sharpness term",
        runs={"train_method": "reweight", "reweight_eisam_weight": True}, inherit_from="eisam",
        inherit_keys=("eisam_weight", "eisam_alpha", "eisam_c", "eisam_gamma"),
    ),
}

#: the methods ``train_method`` accepts (every method that is not an ablation)
TRAIN_METHODS = {name: m for name, m in METHODS.items() if m.runs is None}
REFERENCE_METHOD = "erm"


def overrides(name):
    """The configuration keys that select method ``name``."""
    method = METHODS[name]
    return dict(method.runs) if method.runs is not None else {"train_method": name}


def names(role):
    """The methods of one role, in table order."""
    return tuple(name for name, m in METHODS.items() if m.role == role)
