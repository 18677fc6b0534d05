"""Tools that measure: the method grid (:mod:`~recbole_eisam.bench.benchmark`), the speed and
memory of each method (:mod:`~recbole_eisam.bench.speed`) and of LLMRec's fast-path choices
(:mod:`~recbole_eisam.bench.fastpath`). Each runs as ``python -m recbole_eisam.bench.<name>``."""
