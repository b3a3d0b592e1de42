"""A summarizer agent: extractive summaries by word frequency (deterministic, offline)."""

from __future__ import annotations

import re
from collections import Counter

from pydantic import BaseModel

from agentmesh import capability

_STOP = {
    "a",
    "an",
    "and",
    "are",
    "as",
    "by",
    "for",
    "from",
    "in",
    "is",
    "it",
    "of",
    "on",
    "or",
    "so",
    "that",
    "the",
    "their",
    "to",
    "with",
    "without",
    "who",
    "can",
    "its",
    "out",
}


class Summary(BaseModel):
    text: str
    words: int


@capability(version="1.2.0", tags=["nlp", "en"], idempotent=True)
async def summarize(text: str, max_words: int = 40) -> Summary:
    """Summarize a text in at most `max_words` words.

    Args:
        text: The text to summarize.
        max_words: Upper bound on the summary's length in words.
    """
    split = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    sentences = list(dict.fromkeys(s for s in split if s))
    freq = Counter(w for w in re.findall(r"[a-z']+", text.lower()) if w not in _STOP)

    def score(sentence: str) -> float:
        words = [w for w in re.findall(r"[a-z']+", sentence.lower()) if w not in _STOP]
        return sum(freq[w] for w in words) / (len(words) or 1)

    ranked = sorted(range(len(sentences)), key=lambda i: -score(sentences[i]))
    chosen: list[int] = []
    count = 0
    for i in ranked:
        n = len(sentences[i].split())
        if count + n > max_words and chosen:
            continue
        chosen.append(i)
        count += n
    words = " ".join(sentences[i] for i in sorted(chosen)).split()[:max_words]
    return Summary(text=" ".join(words), words=len(words))
