from recbole_eisam.evaluator.collector import TailCollector
from recbole_eisam.evaluator.tail_metrics import (
    TAIL_METRICS,
    HeadHit,
    HeadMRR,
    HeadNDCG,
    TailCoverage,
    TailHit,
    TailMRR,
    TailNDCG,
)

__all__ = ["TAIL_METRICS", "TailCollector", "HeadHit", "HeadMRR", "HeadNDCG", "TailCoverage", "TailHit", "TailMRR",
           "TailNDCG"]
