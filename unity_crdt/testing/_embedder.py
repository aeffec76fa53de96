"""`ConceptEmbedder`: a deterministic embedder for tests, so ranking by meaning is checkable.

Each concept is one dimension; its words (synonyms, paraphrases) all count towards it, so
"automobile repair" and "fixing a car" land close together. Words outside every concept hash
into a few extra dimensions with a small weight. Vectors are unit length, so cosine similarity
is a plain dot product (`similarity`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["ConceptEmbedder"]

_WORD = re.compile(r"[a-z0-9]+")


class ConceptEmbedder:
    """A sync embedder: one dimension per concept plus `extra` hashed dimensions."""

    def __init__(
        self, concepts: Mapping[str, Sequence[str]], *, extra: int = 8, noise: float = 0.2
    ) -> None:
        self.names = sorted(concepts)
        self._word: dict[str, int] = {}
        for i, name in enumerate(self.names):
            for word in concepts[name]:
                self._word[word.lower()] = i
        self.extra = extra
        self.noise = noise
        self.dim = len(self.names) + extra
        self.calls = 0
        self.texts = 0

    def vector(self, text: str) -> list[float]:
        """The unit vector of one text."""
        v = [0.0] * self.dim
        for word in _WORD.findall(text.lower()):
            i = self._word.get(word)
            if i is None:
                h = hashlib.sha256(word.encode()).digest()
                v[len(self.names) + h[0] % self.extra] += self.noise
            else:
                v[i] += 1.0
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm else v

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        self.texts += len(texts)
        return [self.vector(t) for t in texts]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts under this embedder."""
        return sum(x * y for x, y in zip(self.vector(a), self.vector(b), strict=True))
