"""Caption/text cleaning: unicode normalisation, whitespace, length caps."""

from __future__ import annotations

import re
import unicodedata
from typing import Iterator

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


PIECE_CHARS = 4096  # raw characters cleaned at a time


def _pieces(raw: str) -> Iterator[str]:
    """`raw` in pieces of about PIECE_CHARS, each cut before a character that starts a new
    grapheme-ish unit (not a combining mark), so normalising piece by piece equals normalising
    the whole."""
    start = 0
    while start < len(raw):
        end = min(start + PIECE_CHARS, len(raw))
        while end < len(raw) and end - start < 2 * PIECE_CHARS and unicodedata.combining(raw[end]):
            end += 1
        yield raw[start:end]
        start = end


def clean_text(raw: str, max_chars: int) -> str:
    """NFKC-normalise, turn control characters into spaces, drop invisible format characters
    (keeping the joiners words need), collapse whitespace, cut to max_chars. The work (and the
    memory) is bounded by max_chars, not by the input: a 50 MB caption is cleaned only as far
    as the part that is kept."""
    parts: list[str] = []
    kept = 0
    for piece in _pieces(raw):
        piece = unicodedata.normalize("NFKC", piece)
        piece = "".join(_clean_char(ch) for ch in piece)
        parts.append(piece)
        kept += len(piece) - piece.count(" ")
        if kept > max_chars + 1:  # enough non-space text for the cut below, whatever the spacing
            break
    text = _WHITESPACE.sub(" ", "".join(parts)).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        # Cut at the last word boundary when there is one reasonably close.
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars * 0.8 else cut
    return text


def word_count(text: str) -> int:
    return len(text.split())
