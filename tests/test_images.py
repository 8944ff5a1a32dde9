"""Decoding, filtering and resizing of single images."""

from __future__ import annotations

import io
import resource

import pytest
from PIL import Image

from pipelines.builder.images import ImageReject, process_image
from schemas.config import ImageConfig
from tests.conftest import jpeg_bytes


def reason_of(data: bytes, **overrides) -> str:
    with pytest.raises(ImageReject) as caught:
        process_image(data, ImageConfig(**overrides))
    return caught.value.reason


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, source_size, expected",
    [
        ("center_crop", (640, 480), (64, 64)),
        ("keep_ratio", (640, 480), (85, 64)),
        ("keep_ratio_largest", (640, 480), (64, 48)),
        ("border", (640, 480), (64, 64)),
        ("no", (640, 480), (640, 480)),
        ("center_crop", (40, 30), (64, 64)),  # upscaled, as img2dataset does
    ],
)
def test_resize_modes(mode, source_size, expected):
    result = process_image(jpeg_bytes(*source_size), ImageConfig(size=64, resize_mode=mode))
    assert (result.width, result.height) == expected
    assert (result.original_width, result.original_height) == source_size
    decoded = Image.open(io.BytesIO(result.data))
    assert decoded.size == expected and decoded.format == "JPEG"


def test_colour_survives_draft_decoding():
    # A large JPEG goes through the reduced-scale decode; the result must still be the same colour.
    result = process_image(jpeg_bytes(2000, 1600, colour=(40, 80, 220)), ImageConfig(size=64))
    pixel = Image.open(io.BytesIO(result.data)).convert("RGB").getpixel((32, 32))
    assert all(abs(a - b) < 20 for a, b in zip(pixel, (40, 80, 220)))


@pytest.mark.parametrize("fmt", ["webp", "png"])
def test_output_formats(fmt):
    result = process_image(jpeg_bytes(), ImageConfig(format=fmt))
    assert Image.open(io.BytesIO(result.data)).format == fmt.upper()
    assert result.format == fmt


def test_transparent_png_is_flattened_on_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    result = process_image(encode(image, "PNG"), ImageConfig(size=32))
    assert Image.open(io.BytesIO(result.data)).convert("RGB").getpixel((5, 5)) >= (250, 250, 250)


def test_sha256_is_of_the_stored_bytes():
    import hashlib

    result = process_image(jpeg_bytes(), ImageConfig())
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()


def test_rejects():
    assert reason_of(b"") == "decode_error"
    assert reason_of(b"<html>nope</html>") == "decode_error"
    large = jpeg_bytes(640, 480)
    assert reason_of(large[: len(large) // 2]) == "decode_error"  # truncated
    assert reason_of(jpeg_bytes(8, 8)) == "too_small"
    assert reason_of(jpeg_bytes(400, 50)) == "aspect_ratio"
    assert reason_of(jpeg_bytes(400, 300), max_pixels=100_000) == "too_many_pixels"


def test_decompression_bomb_is_rejected_without_decoding(bomb):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert reason_of(bomb) == "too_many_pixels"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # decoding it would take 2.7 GB
