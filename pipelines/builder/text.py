"""Caption/text cleaning: unicode normalisation, whitespace, length caps."""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def clean_text(raw: str, max_chars: int) -> str:
    """NFKC-normalise, drop control/format characters, collapse whitespace, cut to max_chars."""
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        # Cut at the last word boundary when there is one reasonably close.
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars * 0.8 else cut
    return text


def word_count(text: str) -> int:
    return len(text.split())
