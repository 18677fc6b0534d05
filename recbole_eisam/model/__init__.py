"""Models of recbole-eisam: :class:`LLMRec`, an LLM-based sequential recommender that scores
items with the LLM's user state, and :class:`LLMRecGen`, one that writes the next item's title."""

from recbole_eisam.model.llmrec import LLMRec
from recbole_eisam.model.llmrec_gen import LLMRecGen

__all__ = ["LLMRec", "LLMRecGen"]
