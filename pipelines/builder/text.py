"""Caption/text cleaning: unicode normalisation, whitespace, length caps."""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
# Format characters that change how a word is written: the zero-width non-joiner (Persian,
# Indic scripts) and joiner (emoji sequences, Indic conjuncts). Other format characters
# (zero-width space, bidi overrides, soft hyphens) are dropped.
_KEPT_FORMAT = {"\u200c", "\u200d"}


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category[0] != "C":
        return ch
    if category == "Cc":
        return " "  # tabs, newlines, NUL: word boundaries
    return ch if ch in _KEPT_FORMAT else ""


def clean_text(raw: str, max_chars: int) -> str:
    """NFKC-normalise, turn control characters into spaces, drop invisible format characters
    (keeping the joiners words need), collapse whitespace, cut to max_chars."""
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(_clean_char(ch) for ch in text)
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        # Cut at the last word boundary when there is one reasonably close.
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars * 0.8 else cut
    return text


def word_count(text: str) -> int:
    return len(text.split())
