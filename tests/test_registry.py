"""After `import recbole_eisam`, plain RecBole lookups find the plugin's parts."""

import importlib

import recbole.evaluator.register as metric_register
import recbole.trainer.trainer as trainer_module
from recbole.utils import ModelType, get_model, get_trainer

import recbole_eisam
from recbole_eisam.evaluator import TailCollector
from recbole_eisam.model import LLMRec
from recbole_eisam.trainer import EISAMTrainer


def _snapshot():
    return (
        get_model("LLMRec"),
        get_trainer(ModelType.SEQUENTIAL, "LLMRec"),
        dict(metric_register.metrics_dict),
        dict(metric_register.metric_information),
        trainer_module.Collector,
    )


def test_lookups_return_plugin_parts():
    assert get_model("LLMRec") is LLMRec
    assert get_trainer(ModelType.SEQUENTIAL, "LLMRec") is EISAMTrainer
    assert get_trainer(ModelType.SEQUENTIAL, "EISAM") is EISAMTrainer
    for name in ["headhit", "tailhit", "headndcg", "tailndcg", "tailcoverage"]:
        assert name in metric_register.metrics_dict
        assert name in metric_register.metric_types
    assert trainer_module.Collector is TailCollector
    # RecBole's own parts are untouched
    assert get_model("SASRec").__module__ == "recbole.model.sequential_recommender.sasrec"
    assert get_trainer(ModelType.SEQUENTIAL, "SASRec").__name__ == "Trainer"


def test_registering_twice_is_harmless():
    before = _snapshot()
    recbole_eisam.register()
    importlib.reload(recbole_eisam)
    after = _snapshot()
    assert before[:2] == after[:2]
    assert before[2].keys() == after[2].keys()
    assert before[3] == after[3]
    assert after[4] is TailCollector
