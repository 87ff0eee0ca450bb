"""Memory retrieval: rank a user's memories (or a candidate pool) for a query.

:class:`BM25Retriever` is Okapi BM25 (``bm25s``, ``method="robertson"``, k1=1.5, b=0.75) over the memory values,
tokenised by ``bm25s`` with English stop words removed and NLTK's Porter stemmer when NLTK is installed -- the
same recipe as AlpsBench's ``nltk + bm25`` baseline, on a maintained implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _stemmer():
    try:
        from nltk.stem import PorterStemmer
    except ImportError:  # bm25s works without a stemmer; scores then differ slightly from the paper's recipe
        return None
    stem = PorterStemmer().stem
    return lambda words: [stem(w) for w in words]


class BM25Retriever:
    """BM25 over ``texts``. ``scores(query)`` -> `[len(texts)]` float array; ``rank(query, k)`` -> indices.

    Args:
        texts: the documents (memory values).
        k1, b: BM25 parameters.
        stem: use the Porter stemmer (NLTK) when available.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75, stem: bool = True):
        import bm25s

        if not texts:
            raise ValueError("BM25Retriever needs at least one document")
        self._bm25s = bm25s
        self._stem = _stemmer() if stem else None
        self.n = len(texts)
        corpus = self._tokens(list(texts))
        self.model = bm25s.BM25(k1=k1, b=b, method="robertson")
        self.model.index(corpus, show_progress=False)

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", stemmer=self._stem, return_ids=False,
                                    show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (zeros when no query term is indexed)."""
        q = self._tokens([query])[0]
        vocab = self.model.vocab_dict
        q = [t for t in q if t in vocab]
        if not q:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self.model.get_scores(q), dtype=np.float32)

    def rank(self, query: str, k: int | None = None) -> list[int]:
        """Document indices, best first (ties: earlier document first), at most ``k``."""
        s = self.scores(query)
        order = np.argsort(-s, kind="stable")
        return [int(i) for i in (order if k is None else order[:k])]


__all__ = ["BM25Retriever"]
