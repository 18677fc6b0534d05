"""recbole-eisam: Efficient Item-wise Sharpness-Aware Minimization for RecBole.

``import recbole_eisam`` registers the LLM sequential recommender ``LLMRec``, the EISAM
trainer family and the tail-aware metrics inside RecBole's own registries.
"""

__version__ = "0.1.0"

from recbole_eisam.registry import register

register()

__all__ = ["register", "__version__"]
