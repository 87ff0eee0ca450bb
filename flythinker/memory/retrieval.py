"""Memory retrieval: rank a user's memories (or a candidate pool) for a query.

:class:`BM25Retriever` is BM25 (``bm25s``, k1=1.5, b=0.75) over the memory values: ``method="lucene"`` by default
(its IDF stays positive, which a user's handful of memories needs: Robertson's IDF is 0 for a term in half the
documents), ``"robertson"`` for the Okapi variant of AlpsBench's baseline (``rank_bm25.BM25Okapi``).
Text is tokenised the way ``bm25s.tokenize`` does it (lower case, ``\\b\\w\\w+\\b`` tokens), without the
179 English stop words of ``bm25s`` (``STOPWORDS_EN_PLUS``, NLTK's list size), and stemmed with NLTK's Porter
stemmer when NLTK is installed -- AlpsBench's ``nltk + bm25`` baseline recipe on a maintained BM25 (the paper
tokenised with NLTK's ``word_tokenize``). Tokenisation is memoised per text, so scoring many pools drawn from one
memory bank tokenises each memory once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@functools.lru_cache(maxsize=1)
def _stem_fn():
    try:
        from nltk.stem import PorterStemmer
    except ImportError:  # bm25s works without a stemmer; scores then differ slightly from the paper's recipe
        return None
    return functools.lru_cache(maxsize=1 << 18)(PorterStemmer().stem)


@functools.lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS)


@functools.lru_cache(maxsize=1 << 17)
def tokenize(text: str, stem: bool = True) -> tuple[str, ...]:
    """Lower-cased word tokens of ``text`` without English stop words, Porter-stemmed when ``stem`` (and NLTK)."""
    stop = _stopwords()
    words = [w for w in _TOKEN.findall(text.lower()) if w not in stop]
    fn = _stem_fn() if stem else None
    return tuple(fn(w) for w in words) if fn else tuple(words)


class BM25Retriever:
    """BM25 over ``texts``. ``scores(query)`` -> `[len(texts)]` float array; ``rank(query, k)`` -> indices.

    Args:
        texts: the documents (memory values).
        k1, b: BM25 parameters.
        stem: Porter-stem tokens (NLTK) when available.
        method: ``bm25s`` variant (``lucene``, ``robertson``, ``atire``, ``bm25l``, ``bm25+``).
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75, stem: bool = True,
                 method: str = "lucene"):
        import bm25s

        if not texts:
            raise ValueError("BM25Retriever needs at least one document")
        self.stem = stem
        self.n = len(texts)
        self.model = bm25s.BM25(k1=k1, b=b, method=method)
        self.model.index([list(tokenize(t, stem)) for t in texts], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (zeros when no query term is indexed)."""
        vocab = self.model.vocab_dict
        q = [t for t in tokenize(query, self.stem) if t in vocab]
        if not q:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self.model.get_scores(q), dtype=np.float32)

    def rank(self, query: str, k: int | None = None) -> list[int]:
        """Document indices, best first (ties: earlier document first), at most ``k``."""
        s = self.scores(query)
        order = np.argsort(-s, kind="stable")
        return [int(i) for i in (order if k is None else order[:k])]


__all__ = ["BM25Retriever", "tokenize"]
