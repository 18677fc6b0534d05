from recbole_eisam.evaluator.collector import TailCollector
from recbole_eisam.evaluator.tail_metrics import (
    TAIL_METRICS,
    HeadHit,
    HeadNDCG,
    TailCoverage,
    TailHit,
    TailNDCG,
)

__all__ = ["TAIL_METRICS", "TailCollector", "HeadHit", "HeadNDCG", "TailCoverage", "TailHit", "TailNDCG"]
