"""Turn a route's name and description into short texts worth embedding on their own.

A description such as "Requests about banking: freeze account, pin change, pay bill." reads as a
topic plus a list of intents. A sentence embedding of the whole is a blur of all of them, so each
listed intent is embedded alone as well and a route scores by its best-matching phrases.

Words count too: `terms` and `bm25_table` give a lexical (BM25) view of the same texts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# A comma list is split into phrases only when every item is this short; longer comma-separated
# text is prose ("by genre and, optionally, director") and stays whole.
MAX_LIST_ITEM_WORDS = 6
# An item ending in a conjunction means the commas were prose punctuation, not a list.
_CONJUNCTIONS = frozenset({"and", "or", "but", "nor"})
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|;\s*")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def humanize(name: str) -> str:
    """A route name as words: "RentalCars" -> "rental cars", "auto_and_commute" -> "auto and
    commute"."""
    return " ".join(_CAMEL.sub(" ", name).replace("_", " ").replace("-", " ").split()).lower()


def split_phrases(description: str) -> list[str]:
    """The clauses and list items of a description, in order, without duplicates."""
    out: list[str] = []
    for raw in _SENTENCE_SPLIT.split(description):
        sentence = raw.strip().rstrip(".;!?").strip()
        if not sentence:
            continue
        head, sep, tail = sentence.partition(":")
        if not sep:
            out.append(sentence)
            continue
        items = [item.strip() for item in tail.split(",") if item.strip()]
        if _is_list(items):
            out.extend(items)
        elif tail.strip():
            out.append(tail.strip())
        else:
            out.append(head.strip())
    return list(dict.fromkeys(p for p in out if p))


def _is_list(items: list[str]) -> bool:
    words = [item.split() for item in items]
    return bool(words) and all(
        len(w) <= MAX_LIST_ITEM_WORDS and w[-1].lower() not in _CONJUNCTIONS for w in words
    )


# Common English function words (the usual NLTK list): they say nothing about a route.
_STOPWORD_TEXT = """i me my myself we our ours ourselves you your yours yourself yourselves he him
    his himself she her hers herself it its itself they them their theirs themselves what which
    who whom this that these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between
    into through during before after above below to from up down in out on off over under again
    further then once here there when where why how all any both each few more most other some
    such no nor not only own same so than too very s t can will just don should now d ll m o re
    ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn
    weren won wouldn"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ing", "ed", "es", "s")
# BM25's usual constants: term-frequency saturation and document-length normalisation.
BM25_K1 = 1.2
BM25_B = 0.75


def terms(text: str) -> list[str]:
    """Lower-case content words, crudely stemmed ("bookings" -> "booking" -> "book")."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def _stem(word: str) -> str:
    # One suffix, and only when a stem of three letters or more is left: "flights" -> "flight",
    # "booking" -> "book", but "gas" stays; no plural "s" after s or u ("status", "address").
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word[-2] in "su":
                return word
            return word[: -len(suffix)]
    return word


def bm25_table(documents: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
    """term -> (documents,) BM25 weight of the term in each document (Okapi BM25; idf over the
    documents given, so a term found in every route's text weighs almost nothing). A text's
    score for each document is the sum of the rows of its distinct terms."""
    return Bm25(documents).table()


class Bm25:
    """Okapi BM25 over a few documents (one per route), kept as term counts so that a score can
    also be computed with part of one document taken out (leave-one-out, `row(minus=...)`)."""

    def __init__(self, documents: Sequence[str]) -> None:
        self.counts = [Counter(terms(d)) for d in documents]
        self.lengths = np.asarray([sum(c.values()) for c in self.counts], dtype=np.float64)
        self.df: Counter[str] = Counter()
        for c in self.counts:
            self.df.update(c.keys())

    def table(self) -> dict[str, npt.NDArray[np.float64]]:
        """term -> (documents,) weight: what `bm25_table` returns."""
        n = len(self.counts)
        avg = max(float(self.lengths.sum()) / max(n, 1), 1.0)
        table: dict[str, npt.NDArray[np.float64]] = {}
        for j, doc in enumerate(self.counts):
            norm = BM25_K1 * (1 - BM25_B + BM25_B * self.lengths[j] / avg)
            for term, tf in doc.items():
                row = table.setdefault(term, np.zeros(n))
                row[j] = tf * (BM25_K1 + 1) / (tf + norm)
        for term, row in table.items():
            row *= _idf(n, self.df[term])
        return table

    def row(
        self, query: Sequence[str], minus: tuple[int, Counter[str]] | None = None
    ) -> npt.NDArray[np.float64]:
        """(documents,) score of the distinct `query` terms, as `lexical_scores` sums them;
        `minus=(doc, counts)` takes those term counts out of that document first."""
        n = len(self.counts)
        lengths = self.lengths
        owner, removed = minus if minus is not None else (-1, Counter[str]())
        if minus is not None:
            lengths = lengths.copy()
            lengths[owner] -= sum(removed.values())
        avg = max(float(lengths.sum()) / max(n, 1), 1.0)
        norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / avg)
        out = np.zeros(n)
        for term in set(query):
            df = self.df.get(term, 0)
            if not df:
                continue
            tf = np.asarray([c.get(term, 0) for c in self.counts], dtype=np.float64)
            if minus is not None and removed.get(term):
                had = tf[owner] > 0
                tf[owner] = max(tf[owner] - removed[term], 0.0)
                df -= int(had and tf[owner] == 0)
            if not df:
                continue
            out += _idf(n, df) * tf * (BM25_K1 + 1) / (tf + norm)
        return out


def _idf(n: int, df: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))
