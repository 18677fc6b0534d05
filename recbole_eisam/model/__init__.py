"""Models of recbole-eisam: :class:`LLMRec`, an LLM-based sequential recommender."""

from recbole_eisam.model.llmrec import LLMRec

__all__ = ["LLMRec"]
