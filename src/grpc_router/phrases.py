"""Turn a route's name and description into short texts worth embedding on their own.

A description such as "Requests about banking: freeze account, pin change, pay bill." reads as a
topic plus a list of intents. A sentence embedding of the whole is a blur of all of them, so each
listed intent is embedded alone as well and a route scores by its best-matching phrases.
"""

from __future__ import annotations

import re

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
