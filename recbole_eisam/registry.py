"""The one place that touches RecBole's registries.

After :func:`register` (run by ``import recbole_eisam``), plain RecBole calls find this
package's parts:

* ``recbole.utils.get_model("LLMRec")`` returns :class:`recbole_eisam.model.LLMRec` (and
  ``"LLMRecGen"`` :class:`recbole_eisam.model.LLMRecGen`);
* ``recbole.utils.get_trainer(ModelType.SEQUENTIAL, "LLMRec")`` returns
  :class:`recbole_eisam.trainer.EISAMTrainer` (also reachable as ``recbole.trainer.EISAMTrainer``);
* ``HeadHit``, ``TailHit``, ``HeadNDCG``, ``TailNDCG`` and ``TailCoverage`` are accepted in a
  ``metrics:`` list like RecBole's own metrics;
* RecBole's trainers collect evaluation data with :class:`TailCollector`;
* :func:`trainer_class` gives every model its trainer, ``EISAMTrainer`` where RecBole's
  would be the plain ``Trainer``.

It also installs RecBole's fixes (:mod:`recbole_eisam.patches`). Registering twice is
harmless: every step sets the same objects again.
"""

import sys

import recbole.evaluator.register as metric_register
import recbole.trainer
import recbole.trainer.trainer as trainer_module
from recbole.trainer import TraditionalTrainer, Trainer
from recbole.utils import get_trainer

from recbole_eisam import patches
from recbole_eisam.errors import EISAMError
from recbole_eisam.evaluator import TAIL_METRICS, TailCollector
from recbole_eisam.model import llmrec, llmrec_gen
from recbole_eisam.trainer import EISAMTrainer

_registered = False


def register():
    """Install the plugin into RecBole's registries (idempotent)."""
    global _registered
    patches.apply()

    # models: get_model() imports recbole.model.<family>.<name.lower()> and reads <name>
    sys.modules["recbole.model.sequential_recommender.llmrec"] = llmrec
    sys.modules["recbole.model.sequential_recommender.llmrecgen"] = llmrec_gen

    # trainers: get_trainer() looks up recbole.trainer.<Model>Trainer first
    recbole.trainer.EISAMTrainer = EISAMTrainer
    recbole.trainer.LLMRecTrainer = EISAMTrainer
    recbole.trainer.LLMRecGenTrainer = EISAMTrainer

    # metrics: the evaluator and Config read these three dicts
    for metric in TAIL_METRICS:
        name = metric.__name__.lower()
        metric_register.metrics_dict[name] = metric
        metric_register.metric_information[name] = metric.metric_need
        metric_register.metric_types[name] = metric.metric_type

    # the collector every RecBole trainer builds in __init__
    trainer_module.Collector = TailCollector
    _registered = True


def is_registered():
    """Whether :func:`register` has run in this process."""
    return _registered


def trainer_class(config):
    """RecBole's trainer for the model, with the plain ``Trainer`` replaced by ``EISAMTrainer``.

    ``EISAMTrainer`` with ``train_method: erm`` trains exactly like RecBole's ``Trainer``.
    Traditional models (Pop...) also get it, with one epoch as RecBole's
    ``TraditionalTrainer`` gives them (their "training" is one counting pass), so their
    checkpoints are safe too. Models with another dedicated trainer (knowledge-aware...)
    keep it and support ``erm`` only.
    """
    cls = get_trainer(config["MODEL_TYPE"], config["model"])
    if cls is TraditionalTrainer:
        config["epochs"] = 1
        cls = EISAMTrainer
    if cls is Trainer:
        cls = EISAMTrainer
    method = config["train_method"] or "erm"
    if method != "erm" and not issubclass(cls, EISAMTrainer):
        raise EISAMError(
            f"train_method '{method}' needs EISAMTrainer, but model '{config['model']}' uses "
            f"RecBole's {cls.__name__}; use train_method=erm for this model."
        )
    return cls
