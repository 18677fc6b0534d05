"""The training methods of the EISAM trainer family: what each ``train_method`` name means.

Every method is one setting of the same update (docs/EISAM.md): which sharpness term it
adds (none, SAM's uniform one, ImbSAM's tail-only one, EISAM's item-weighted one), which
base loss ``l_j`` it is built on (plain, logit-adjusted or re-weighted cross-entropy), and
whether the prediction is logit-adjusted after training (post hoc).
"""

from dataclasses import dataclass

#: the base losses l_j a method can train on
BASE_LOSSES = ("ce", "logit_adjust", "reweight")


@dataclass(frozen=True)
class TrainMethod:
    """One ``train_method``.

    Attributes:
        sharpness: ``None`` (no sharpness term: lambda = 0), ``"uniform"`` (SAM),
            ``"imbsam"`` (w = 1 on ImbSAM's tail items, 0 elsewhere) or ``"item"``
            (EISAM's ``eisam_weight`` family).
        base_loss: the loss ``l_j`` the method is built on (one of :data:`BASE_LOSSES`).
        posthoc: predictions are ``logits - tau * log prior`` (trained on ``base_loss``).
        summary: one line for the help and the docs.
    """

    sharpness: str
    base_loss: str
    posthoc: bool
    summary: str

    @property
    def composes(self):
        """Whether ``base_loss`` may be chosen by the key of that name (the plain sharpness
        methods); every other method is defined by its base loss."""
        return self.sharpness is not None and self.base_loss == "ce"


TRAIN_METHODS = {
    "erm": TrainMethod(None, "ce", False, "plain training on the cross-entropy"),
    "sam": TrainMethod("uniform", "ce", False, "SAM: every sample's sharpness (Foret et al. 2021)"),
    "imbsam": TrainMethod(
        "imbsam", "ce", False, "ImbSAM: sharpness of the tail items' samples only (Zhou et al. 2023)"
    ),
    "eisam": TrainMethod("item", "ce", False, "EISAM: sharpness weighted by the target item's w(n_i)"),
    "reweight": TrainMethod(None, "reweight", False, "loss weights ~ n_i^-beta, no sharpness term"),
    "logit_adjust": TrainMethod(
        None, "logit_adjust", False, "logit-adjusted loss: train on logits + tau log prior (Menon et al. 2021)"
    ),
    "logit_adjust_posthoc": TrainMethod(
        None, "ce", True, "post-hoc logit adjustment: plain training, predict with logits - tau log prior"
    ),
    "eisam_la": TrainMethod("item", "logit_adjust", False, "EISAM on the logit-adjusted loss"),
    "eisam_rw": TrainMethod("item", "reweight", False, "EISAM on the re-weighted loss"),
}
