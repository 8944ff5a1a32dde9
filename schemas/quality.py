"""`data.quality`: the rules a caption or text must pass, and the pattern lists they start from
(the rules themselves run in `mmae.pipelines.builder.quality`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from .sections import Section


# Captions that are not descriptions: what a web page's alt text often holds instead. Matched
# (case-insensitive, anywhere) against the cleaned caption; extend with quality.boilerplate.
BOILERPLATE = [
    r"^(click|tap) (here|to)\b", r"\bclick here\b", r"^(image|photo|picture|thumbnail|untitled|no image)"
    r"( \d+)?$", r"\b(read|see|learn) more\b", r"^(loading|placeholder)\b", r"\ball rights reserved\b",
    r"^(stock photo|shutterstock|getty images|alamy|istock)\b", r"^(logo|icon|banner|avatar)$",
]
# A caption that is a file name or a camera's: IMG_2041.JPG, DSC01234, photo (3).png, 1234567.jpg.
FILE_NAMES = [
    r"^[\w\-. ()]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic)$", r"^(img|dsc|dscn|dcim|pxl|mvimg|wp|screenshot)"
    r"[ _-]?\d+", r"^\d{4,}$",
]


class QualityConfig(Section):
    """Rules a caption, text or image must pass (texts are checked after cleaning, before anything
    is fetched; near-duplicate images once downloaded); each failed rule is a reject with its own
    reason. Every rule is off until set."""

    max_words: Optional[int] = Field(None, ge=1, description="more words: too_many_words")
    max_top_word_share: Optional[float] = Field(
        None, gt=0, le=1, description="texts of 4+ words whose most frequent word is more than this share of "
        "its words (\"buy buy buy cheap buy\"): repetitive")
    max_repeated_trigram_share: Optional[float] = Field(
        None, gt=0, le=1, description="texts of 8+ words whose word 3-grams repeat more than this share: repetitive")
    min_alpha_share: Optional[float] = Field(
        None, gt=0, le=1, description="fewer letters among the non-space characters: low_alpha (codes, numbers, "
        "symbol runs)")
    reject_file_names: bool = Field(False, description="captions that are file or camera names (IMG_2041.JPG): "
                                    "file_name_caption")
    file_name_patterns: list[str] = Field(default_factory=lambda: list(FILE_NAMES),
                                          description="regular expressions for reject_file_names")
    reject_boilerplate: bool = Field(False, description="captions that are page furniture (\"click here\", "
                                     "\"image 3\"): boilerplate")
    boilerplate: list[str] = Field(default_factory=lambda: list(BOILERPLATE),
                                   description="regular expressions for reject_boilerplate (extend the list)")
    languages: list[str] = Field(
        default_factory=list, description="keep these languages only (ISO 639-1, e.g. [en, de]), identified by "
        "py3langid's model inside its wheel; empty = any. A text identified with less than min_language_confidence "
        "is kept (short captions are often unclear): wrong_language")
    min_language_confidence: float = Field(0.8, gt=0, le=1)
    apply_to: Literal["all", "paired", "text"] = Field("all", description="captions of paired rows, text-only "
                                                       "rows, or both")
    near_duplicate_texts: Optional[float] = Field(
        None, gt=0, lt=1, description="a text-only row whose word 3-grams have about this Jaccard similarity (or "
        "more) with an earlier text's is near_duplicate (MinHash + LSH; first in input order wins). 0.7 finds "
        "one changed word in 40 about 9 times in 10; null = off")
    near_duplicate_captions: bool = Field(
        False, description="with near_duplicate_texts: paired rows whose captions are near-duplicates are "
        "near_duplicate too, whatever their images (for captions that are templates, leave it off)")

    near_duplicate_images: Optional[int] = Field(
        None, ge=0, le=32, description="an image whose perceptual hash (64-bit DCT pHash of the stored pixels, "
        "mirrored and 2.5%/5% centre crops too) is within this many bits of an earlier image's of the same kind "
        "(and caption, for paired rows) is near_duplicate; also fills the image_phash column. 8 finds re-encoded, "
        "resized, flipped and slightly cropped copies (docs/BENCHMARKS.md); null = off")

    @field_validator("file_name_patterns", "boilerplate")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a regular expression ({error})") from None
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        if any(not (2 <= len(code) <= 3 and code.isalpha() and code.islower()) for code in value):
            raise ValueError("languages are ISO 639-1 codes in lower case, e.g. [en, de]")
        return value
