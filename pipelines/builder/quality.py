"""Quality rules for captions and texts (`data.quality`): checked on the cleaned text when a
row is read, before anything is fetched for it; a failed rule is a reject with its own reason.

In this order (the first that fails names the reject):
- `file_name_caption`: the caption is a file or camera name (IMG_2041.JPG);
- `boilerplate`: page furniture ("click here", "image 3"), a pattern list the user extends;
- `too_many_words`: more than `max_words`;
- `repetitive`: one word is most of the text, or word 3-grams repeat (spam, keyword lists);
- `low_alpha`: too few letters among the non-space characters (codes, prices, symbol runs);
- `wrong_language`: identified with at least `min_language_confidence` as a language not in
  `languages`, by py3langid (langid.py's model, 4.5 MB inside its PyPI wheel; nothing is
  downloaded; about 35 µs a caption on one core).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from mmae.schemas.config import QualityConfig

WORD = re.compile(r"\w+", re.UNICODE)


def applies(quality: QualityConfig, kind: str) -> bool:
    return quality.apply_to == "all" or quality.apply_to == kind


def is_default(quality: QualityConfig) -> bool:
    return quality == QualityConfig()


@functools.lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(pattern, re.IGNORECASE) for pattern in patterns]


MODEL_ARRAYS = ("ptc", "pc", "classes", "nextmove", "nextmove_row", "out_feat")


@functools.lru_cache(maxsize=1)
def _identifier():
    """py3langid's model. Its wheel ships it LZMA-compressed (68 MB of arrays in 4.5 MB), which
    takes ~0.8 s of CPU to unpack in every worker of every build; so the unpacked arrays are kept
    in the user's cache (`cache_dir()`) the first time, and mapped from there (0.1 s) after."""
    from py3langid import modelio
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    source = Path(MODEL_DIR) / MODEL_FILE
    arrays = _cached_model(source)
    if arrays is None:
        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return LanguageIdentifier(np.asarray(arrays["ptc"]), np.asarray(arrays["pc"]), arrays["classes"].tolist(),
                              modelio._to_array(arrays["nextmove"]), arrays["out_feat"].tolist(), norm_probs=True,
                              tk_row=modelio._to_array(arrays["nextmove_row"]))


def cache_dir() -> Path:
    """$MMAE_CACHE_DIR, else $XDG_CACHE_HOME/mmae, else ~/.cache/mmae."""
    if os.environ.get("MMAE_CACHE_DIR"):
        return Path(os.environ["MMAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmae"


def _cached_model(source: Path) -> Optional[dict[str, np.ndarray]]:
    """The model's arrays, memory-mapped from the cache (unpacked there first if missing); None
    when the cache cannot be written or read, and the model is then loaded as py3langid loads it."""
    try:
        stat = source.stat()
        folder = cache_dir() / f"langid-{stat.st_size}-{int(stat.st_mtime)}"
        if not (folder / "done").exists():
            _unpack(source, folder)
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in MODEL_ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    classes, states = len(arrays["classes"]), len(arrays["nextmove_row"])
    consistent = (arrays["ptc"].ndim == 2 and arrays["ptc"].shape[1] == classes == len(arrays["pc"])
                  and len(arrays["out_feat"]) == states and arrays["nextmove"].size % 256 == 0)
    return arrays if consistent else None  # a cache cut short or changed is not used


def _unpack(source: Path, folder: Path) -> None:
    """The model's arrays as .npy files, moved into place whole (two workers may race: one wins)."""
    import lzma
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".langid-", dir=folder.parent))
    try:
        with lzma.open(source) as compressed, np.load(compressed, allow_pickle=False) as model:
            for name in MODEL_ARRAYS:
                np.save(work / f"{name}.npy", model[name], allow_pickle=False)
        (work / "done").touch()
        try:
            work.rename(folder)
        except OSError:  # another worker's copy got there first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)


def problem(text: str, quality: QualityConfig) -> Optional[tuple[str, str]]:
    """(reason, detail) of the first rule `text` fails, or None."""
    word_rules = (quality.max_words, quality.max_top_word_share, quality.max_repeated_trigram_share)
    if not (quality.reject_file_names or quality.reject_boilerplate or quality.languages
            or quality.min_alpha_share is not None or any(rule is not None for rule in word_rules)):
        return None  # every rule off (the default): nothing is computed per row
    stripped = text.strip()
    if quality.reject_file_names and any(p.search(stripped) for p in _compiled(tuple(quality.file_name_patterns))):
        return "file_name_caption", stripped[:80]
    if quality.reject_boilerplate:
        for pattern in _compiled(tuple(quality.boilerplate)):
            if pattern.search(stripped):
                return "boilerplate", f"matches {pattern.pattern!r}"
    words = [word.lower() for word in WORD.findall(text)] if any(rule is not None for rule in word_rules) else []
    if quality.max_words is not None and len(words) > quality.max_words:
        return "too_many_words", f"{len(words)} words > {quality.max_words}"
    if quality.max_top_word_share is not None and len(words) >= 4:
        word, count = Counter(words).most_common(1)[0]
        if count / len(words) > quality.max_top_word_share:
            return "repetitive", f"{word!r} is {count} of {len(words)} words"
    if quality.max_repeated_trigram_share is not None and len(words) >= 8:
        trigrams = list(zip(words, words[1:], words[2:]))
        repeated = len(trigrams) - len(set(trigrams))
        if repeated / len(trigrams) > quality.max_repeated_trigram_share:
            return "repetitive", f"{repeated} of {len(trigrams)} word 3-grams repeat"
    if quality.min_alpha_share is not None:
        visible = [ch for ch in text if not ch.isspace()]
        letters = sum(ch.isalpha() for ch in visible)
        if visible and letters / len(visible) < quality.min_alpha_share:
            return "low_alpha", f"{letters} letters in {len(visible)} characters"
    if quality.languages:
        language, confidence = _identifier().classify(text)
        if language not in quality.languages and confidence >= quality.min_language_confidence:
            return "wrong_language", f"{language} ({confidence:.2f}); kept: {', '.join(quality.languages)}"
    return None
