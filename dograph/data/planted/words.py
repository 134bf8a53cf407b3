"""Word salad: words drawn independently from a corpus's word frequencies (the noise scenario).

A *word* is a maximal run of non-whitespace characters (``str.split()``), punctuation attached,
so the salad has the corpus's own unigram distribution over the strings a tokenizer sees. Words
are joined by single spaces; nothing but their frequencies can be learned, since each is drawn
independently of the ones before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class WordStatistics:
    """A corpus's unigram counts and its documents' lengths in words, gathered one document at a time."""

    counts: Counter[str] = field(default_factory=Counter)
    document_words: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, documents: Iterable[str]) -> WordStatistics:
        statistics = cls()
        for text in documents:
            statistics.add(text)
        return statistics

    def add(self, text: str) -> None:
        words = text.split()
        self.counts.update(words)
        if words:
            self.document_words.append(len(words))


class WordSalad:
    """Documents of i.i.d. words from ``statistics``; document lengths drawn from the corpus's own.

    The vocabulary is ordered by (count desc, word) so the draw depends on the counts alone.
    """

    def __init__(self, statistics: WordStatistics, seed: int) -> None:
        if not statistics.counts:
            raise ValueError("no words to draw from")
        ordered = sorted(statistics.counts.items(), key=lambda item: (-item[1], item[0]))
        self.words = [word for word, _ in ordered]
        self.word_bytes = np.array([len(word.encode("utf-8")) for word in self.words], dtype=np.int64)
        counts = np.array([count for _, count in ordered], dtype=np.float64)
        self.cumulative = np.cumsum(counts / counts.sum())
        self.lengths = np.array(statistics.document_words, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def _draw(self, n: int) -> np.ndarray:
        picks = np.searchsorted(self.cumulative, self.rng.random(n), side="right")
        return np.minimum(picks, len(self.words) - 1)  # guards the last cumulative value rounding below 1

    def documents(self, total_bytes: int) -> Iterator[str]:
        """Documents whose UTF-8 sizes add up to ``total_bytes`` to within half a word (the last one is cut)."""
        left = total_bytes
        while left > 0:
            picks = self._draw(int(self.rng.choice(self.lengths)))
            sizes = np.cumsum(self.word_bytes[picks] + 1) - 1  # bytes of the first k words and their spaces
            if sizes[-1] <= left:
                yield " ".join(self.words[i] for i in picks)
                left -= int(sizes[-1])
                continue
            keep = int(np.searchsorted(sizes, left, side="right"))  # words that fit
            below = int(sizes[keep - 1]) if keep else 0
            if int(sizes[keep]) - left < left - below:
                keep += 1  # one word more lands closer to the target than stopping short
            if keep:
                yield " ".join(self.words[i] for i in picks[:keep])
            return
