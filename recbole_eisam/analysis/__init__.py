"""Analysis tools: the benchmark report and the prior long-tail study.

* :mod:`recbole_eisam.analysis.topk`: per-user metrics from the top-K TSV files written
  by ``quick_start.run(save_topk=...)`` and the per-item training statistics (frequency,
  popularity rank, head / tail) they are read against;
* :mod:`recbole_eisam.analysis.report`: ``results.csv`` -> ``REPORT.md`` and PNG plots
  (``python -m recbole_eisam.analysis.report --out=DIR``);
* :mod:`recbole_eisam.analysis.prior_longtail`: the LLM's prior familiarity with each item
  against its training frequency (``python -m recbole_eisam.analysis.prior_longtail``).

The benchmark grid itself is :mod:`recbole_eisam.bench.benchmark`.
"""
