"""Decoding, filtering and resizing of single images."""

from __future__ import annotations

import io
import resource

import numpy as np

import pytest
from mmae.pipelines.builder.images import ImageReject, decoded_bytes, process_image
from mmae.schemas.config import ImageConfig
from PIL import Image

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


# --- every mode a web image can have --------------------------------------------------------------

WHITE = (255, 255, 255)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _centre(data: bytes) -> tuple[int, int, int]:
    stored = Image.open(io.BytesIO(process_image(data, ImageConfig(size=16, min_size=1, format="png")).data))
    assert stored.mode == "RGB"
    return stored.getpixel((8, 8))


def _close(a, b, tolerance=3) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def test_16_bit_greyscale_keeps_its_grey():
    image = Image.new("I;16", (32, 32), 0x8080)
    assert Image.open(io.BytesIO(_png(image))).mode.startswith("I")
    assert _close(_centre(_png(image)), (128, 128, 128))


def _transparent_variants() -> dict[str, bytes]:
    """One fully transparent 32x32 image per way a PNG or GIF can say so."""
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    la = Image.new("LA", (32, 32), (0, 0))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] * 256)
    grey = Image.new("L", (32, 32), 7)
    rgb = Image.new("RGB", (32, 32), (0, 0, 0))
    gif = io.BytesIO()
    palette.save(gif, format="GIF", transparency=0)
    webp = io.BytesIO()
    rgba.save(webp, format="WEBP", lossless=True)
    return {
        "RGBA": _png(rgba),
        "LA": _png(la),
        "P with tRNS": _png(palette, transparency=0),
        "L with tRNS": _png(grey, transparency=7),
        "RGB with tRNS": _png(rgb, transparency=(0, 0, 0)),
        "GIF": gif.getvalue(),
        "WebP": webp.getvalue(),
    }


@pytest.mark.parametrize("kind", list(_transparent_variants()))
def test_transparency_is_composited_on_white_for_every_kind(kind):
    assert _centre(_transparent_variants()[kind]) == WHITE


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, WHITE),
    ("L", 100, (100, 100, 100)),
    ("P", None, (200, 10, 10)),
    ("RGB", (10, 200, 10), (10, 200, 10)),
    ("I", 0x4000, (64, 64, 64)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_modes_decode_to_the_right_rgb(mode, value, expected):
    if mode == "P":
        image = Image.new("P", (32, 32), 1)
        image.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    else:
        image = Image.new(mode, (32, 32), value)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG"))
    assert _close(_centre(buffer.getvalue()), expected, tolerance=6)


def test_jpeg_with_missing_data_is_rejected_even_with_an_end_marker():
    data = jpeg_bytes(256, 256, colour=(120, 60, 200))
    cut = data[: len(data) // 2] + b"\xff\xd9"
    with pytest.raises(ImageReject) as error:
        process_image(cut, ImageConfig(size=32, min_size=16))
    assert error.value.reason == "decode_error"


def test_decoding_threads_share_one_memory_budget():
    import threading

    from mmae.pipelines.builder.images import DecodeBudget

    budget = DecodeBudget(100)
    with pytest.raises(ImageReject) as error:
        with budget.reserve(101):
            pass
    assert error.value.reason == "too_many_pixels"
    holding, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with budget.reserve(60):
            holding.set()
            release.wait()

    def second():
        holding.wait()
        with budget.reserve(60):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    holding.wait()
    assert not second_in.wait(0.3)  # 60 + 60 > 100: the second image waits for the first
    release.set()
    for thread in threads:
        thread.join()
    assert second_in.is_set() and budget.peak == 60 and budget.used == 0


def test_an_image_that_alone_exceeds_the_decode_budget_is_rejected_unread():
    big = Image.new("RGBA", (8000, 8000), (0, 0, 0, 0))
    data = _png(big, compress_level=1)
    del big
    assert len(data) < 2_000_000  # small on the wire, 256 MB of pixels, ~770 MB while flattening
    with pytest.raises(ImageReject) as error:
        process_image(data, ImageConfig(size=32, max_decode_mb=256))
    assert error.value.reason == "too_many_pixels" and "max_decode_mb" in error.value.detail


# --- the plain-JPEG path and Pillow's general path ----------------------------------------------


def _photo(width: int, height: int) -> Image.Image:
    """Structure in every direction, so a turned or shifted result would differ."""
    import numpy as np

    rng = np.random.default_rng(width * 7 + height)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1).astype(np.int16)
    pixels += rng.integers(-20, 20, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, orientation: int | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, size", [
    ("center_crop", 64), ("center_crop", 200), ("center_crop", 256), ("keep_ratio", 64),
    ("keep_ratio_largest", 100), ("border", 64), ("no", 64),
])
@pytest.mark.parametrize("source", [(512, 512), (640, 480), (333, 500), (512, 770), (1030, 512)])
def test_plain_jpegs_come_out_as_pillows_path_makes_them(mode, size, source):
    # An EXIF block that says "upright" sends the same JPEG down Pillow's general path.
    image = _photo(*source)
    plain = process_image(_jpeg(image), ImageConfig(size=size, resize_mode=mode, min_size=8))
    general = process_image(_jpeg(image, orientation=1), ImageConfig(size=size, resize_mode=mode, min_size=8))
    assert plain.data == general.data
    assert (plain.width, plain.height, plain.original_width, plain.original_height) == (
        general.width, general.height, general.original_width, general.original_height)


def test_exif_orientation_is_applied():
    # Stored sideways with "rotate 90 clockwise to view" (6): the output is the upright picture.
    upright = _photo(96, 64)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    result = process_image(_jpeg(sideways, orientation=6), ImageConfig(size=64, resize_mode="keep_ratio_largest"))
    assert (result.width, result.height) == (64, 43) and (result.original_width, result.original_height) == (64, 96)
    out = Image.open(io.BytesIO(result.data)).convert("RGB")
    reference = upright.resize((64, 43))
    import numpy as np

    error = np.abs(np.asarray(out, dtype=int) - np.asarray(reference, dtype=int)).mean()
    assert error < 12, error


def test_greyscale_jpeg_becomes_rgb_on_the_plain_path():
    result = process_image(_jpeg(Image.new("L", (128, 128), 90)), ImageConfig(size=32))
    stored = Image.open(io.BytesIO(result.data))
    assert stored.mode == "RGB" and _close(stored.getpixel((16, 16)), (90, 90, 90))


def test_an_exif_block_after_fill_bytes_is_still_seen():
    # JPEG allows 0xFF fill bytes before a marker; the orientation behind them still counts.
    upright = _photo(96, 64)
    data = _jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6)
    filled = data[:2] + b"\xff\xff\xff" + data[2:]
    assert process_image(filled, ImageConfig(size=64, resize_mode="keep_ratio_largest")).width == 64
    assert process_image(filled, ImageConfig(size=64, resize_mode="keep_ratio_largest")).data == \
        process_image(data, ImageConfig(size=64, resize_mode="keep_ratio_largest")).data


# --- every mode and kind of transparency, against a reference ----------------------------------

_GREY = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16x16: 16 grey levels per row
_CLEAR = _GREY == 48  # the pixels a transparency marks (a whole column)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _mode_cases():
    """(name, encoded image, expected RGB pixels): each expected array computed from _GREY
    directly, transparent pixels white, never through Pillow's conversions."""
    grey = _GREY
    clear = np.where(_CLEAR, 255, grey)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    rgb_clear = np.where(_CLEAR[..., None], 255, rgb)
    as_rgb = lambda single: np.repeat(single[..., None], 3, axis=-1)  # noqa: E731
    sixteen = Image.frombytes("I;16", (16, 16), (grey.astype("<u2") * 257).tobytes())
    thirty_two = Image.frombytes("I", (16, 16), (grey.astype("<i4") << 23).tobytes())
    floats = Image.frombytes("F", (16, 16), (grey.astype("<f4") / 255).tobytes())
    alpha = Image.frombytes("L", (16, 16), np.where(_CLEAR, 0, 255).astype(np.uint8).tobytes())
    grey_image = Image.frombytes("L", (16, 16), grey.tobytes())
    rgb_image = Image.frombytes("RGB", (16, 16), rgb.astype(np.uint8).tobytes())
    p_image = Image.frombytes("P", (16, 16), (grey // 16).astype(np.uint8).tobytes())
    p_image.putpalette([c for level in range(16) for c in (level * 16,) * 3])
    yield "L png", _encoded(grey_image, "PNG"), as_rgb(grey)
    yield "L tRNS png", _encoded(grey_image, "PNG", transparency=48), as_rgb(clear)
    yield "LA png", _encoded(Image.merge("LA", (grey_image, alpha)), "PNG"), as_rgb(clear)
    yield "I;16 png", _encoded(sixteen, "PNG"), as_rgb(grey)
    yield "I;16 tRNS png", _encoded(sixteen, "PNG", transparency=48 * 257), as_rgb(clear)
    yield "I 32-bit tiff", _encoded(thirty_two, "TIFF"), as_rgb(grey)
    yield "F tiff", _encoded(floats, "TIFF"), as_rgb(grey)
    yield "RGB png", _encoded(rgb_image, "PNG"), rgb
    yield "RGB tRNS png", _encoded(rgb_image, "PNG", transparency=(48, 207, 24)), rgb_clear
    yield "RGBA png", _encoded(Image.merge("RGBA", (*rgb_image.split(), alpha)), "PNG"), rgb_clear
    yield "RGBA webp", _encoded(Image.merge("RGBA", (*rgb_image.split(), alpha)), "WEBP", lossless=True), rgb_clear
    yield "P png", _encoded(p_image, "PNG"), as_rgb(grey)
    yield "P tRNS png", _encoded(p_image, "PNG", transparency=3), as_rgb(clear)
    yield "P gif", _encoded(p_image, "GIF", transparency=3), as_rgb(clear)
    yield "1 png", _encoded(grey_image.point(lambda value: 255 if value >= 128 else 0).convert("1"), "PNG"), \
        as_rgb(np.where(grey >= 128, 255, 0))
    yield "CMYK tiff", _encoded(rgb_image.convert("CMYK"), "TIFF"), np.asarray(rgb_image.convert("CMYK").convert("RGB"))


@pytest.mark.parametrize("name,data,expected", list(_mode_cases()), ids=[case[0] for case in _mode_cases()])
def test_every_mode_and_transparency_comes_out_faithful(name, data, expected):
    config = ImageConfig(size=16, min_size=1, resize_mode="no", format="png")
    out = np.asarray(Image.open(io.BytesIO(process_image(data, config).data)).convert("RGB"), dtype=np.int16)
    difference = np.abs(out - np.asarray(expected, dtype=np.int16)).max()
    assert difference <= 1, f"{name}: off by up to {difference}"


def test_the_decode_budget_covers_deep_samples():
    """The working copies of a float image while it is scaled to 8 bits fit in what is reserved."""
    import tracemalloc

    floats = Image.frombytes("F", (512, 512), (np.random.default_rng(0).random((512, 512), dtype=np.float32)).tobytes())
    tracemalloc.start()
    from mmae.pipelines.builder.images import _flatten
    _flatten(floats)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pillow_image = 512 * 512 * 4
    assert numpy_peak + pillow_image + 512 * 512 * 12 <= decoded_bytes(512, 512, "F")
