"""Shard schema v1: the Arrow schema of one row of `OUT/{paired,image,text}/part-*.parquet`.

Column names and types are part of the contract (docs/ARCHITECTURE.md); extra columns are allowed
but these may never change meaning.
"""

from __future__ import annotations

import re

import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"mmae.schema_version"
KINDS = ("paired", "image", "text")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # hash of source name + source key
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # paired | image | text
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),  # cleaned text (caption or text-only document)
        pa.field("tokens", pa.list_(pa.int32())),  # SentencePiece ids, no padding
        pa.field("image", pa.binary()),  # encoded bytes (JPEG/WebP/PNG)
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("image_sha256", pa.string()),  # of the stored bytes
        pa.field("label", pa.string()),  # only filled when the source names a label column
        # 64-bit DCT perceptual hash of the stored pixels (mmae.pipelines.builder.neardup), filled
        # when data.quality.near_duplicate_images is set. Added after v1's first datasets: a shard
        # without it is still valid (OPTIONAL_COLUMNS).
        pa.field("image_phash", pa.uint64()),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

OPTIONAL_COLUMNS = frozenset({"image_phash"})

# Every input row that does not become a shard row becomes one of these.
REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # file:line (or file path) of the input row
        pa.field("url", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # machine-readable, e.g. http_404
        pa.field("detail", pa.string()),  # human-readable context
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

# Reject reasons the build can emit. Readers should accept unknown reasons too.
REJECT_REASONS = {
    "missing_column": "the row lacks the url/caption/text column the source names",
    "invalid_utf8": "the row's text is not valid UTF-8",
    "bad_row": "the row cannot be parsed (malformed JSON, wrong column count, an unclosed quote, a damaged "
    "row group)",
    "row_too_long": "the input line is longer than data.max_row_bytes (skipped without being held)",
    "empty_caption": "caption/text is empty after cleaning",
    "too_few_words": "fewer words than text.min_words",
    "too_many_words": "more words than data.quality.max_words",
    "repetitive": "one word is most of the text, or its word 3-grams repeat (data.quality)",
    "low_alpha": "too few letters among the characters (data.quality.min_alpha_share)",
    "file_name_caption": "the caption is a file or camera name, e.g. IMG_2041.JPG (data.quality.reject_file_names)",
    "boilerplate": "the caption is page furniture, e.g. 'click here' (data.quality.boilerplate)",
    "wrong_language": "identified as a language not in data.quality.languages",
    "duplicate": "same url within a source, same image (+caption), or same text",
    "near_duplicate": "the text (or caption) is a near-duplicate of an earlier one (data.quality.near_duplicate_texts), "
    "or the image's perceptual hash is within data.quality.near_duplicate_images bits of an earlier image's",
    "bad_url": "the url is not text, holds control characters, or has no scheme we can fetch",
    "url_not_allowed": "the url names a local file or object store the source does not allow "
    "(allow_local_files, allow_object_stores)",
    "not_a_file": "a local path names a FIFO, device or folder, not a regular file",
    "bad_caption": "the caption/text is not text (an object, list, number or boolean)",
    "bad_label": "the label is an object or list",
    "private_address": "the host resolves to a private/loopback/link-local address",
    "opt_out": "an X-Robots-Tag header opts the image out (noai, noimageai, ...)",
    "timeout": "the download exceeded download.timeout_s",
    "redirect_loop": "redirects loop or exceed the limit",
    "connection_error": "the connection failed (refused, reset, DNS)",
    "not_found": "a local/fsspec path does not exist",
    "too_large": "the body exceeds download.max_bytes",
    "not_image": "the server answered with a non-image content type",
    "decode_error": "the bytes do not decode as a complete image (zero-byte, truncated)",
    "too_many_pixels": "width*height exceeds image.max_pixels, or decoding would need more than "
    "image.max_decode_mb (decompression bomb guard)",
    "too_small": "the shorter side is below image.min_size",
    "aspect_ratio": "the aspect ratio exceeds image.max_aspect_ratio",
}
# plus http_<status> for HTTP errors, e.g. http_404, http_500.


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]+\b")
MAX_DETAIL = 500


def reject_detail(text: str) -> str:
    """A reject's detail as stored: one line, at most MAX_DETAIL characters, and the same in two
    identical builds (object addresses, which differ from run to run, are left out)."""
    text = _ADDRESS.sub(lambda found: f"<{found.group(1)}>" if found.group(1) else "", text)
    return " ".join(text.split())[:MAX_DETAIL]
