"""Near-duplicate texts: MinHash signatures, LSH bands, and a build that rejects the later copy
(`data.quality.near_duplicate_texts`)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
from mmae.pipelines.builder import neardup

from tests.conftest import write_jsonl

WORDS = ("river stone market window garden yellow quiet letter morning station coffee paper bridge winter "
         "orange silver forest engine planet candle harbor pencil ladder castle meadow violin tunnel rocket "
         "blanket mirror island feather basket lantern button saddle thunder marble jacket spider walnut").split()


def paragraph(seed: int, words: int = 40) -> list[str]:
    draw = random.Random(seed)
    return [draw.choice(WORDS) for _ in range(words)]


def jaccard(a: str, b: str) -> float:
    first, second = neardup.shingles(a), neardup.shingles(b)
    return len(first & second) / len(first | second)


def test_signatures_estimate_jaccard_similarity():
    base = paragraph(1, 60)
    for changed in (1, 5, 15):
        other = list(base)
        for position in range(0, changed * 4, 4):
            other[position] = "zebra"
        a, b = " ".join(base), " ".join(other)
        agree = float(np.mean(neardup.signature(a) == neardup.signature(b)))
        assert abs(agree - jaccard(a, b)) < 0.12, (changed, agree, jaccard(a, b))
    assert (neardup.signature("Same  text here") == neardup.signature("same text HERE")).all()


def test_bands_follow_the_threshold():
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = neardup.bands_for(threshold)
        assert bands * rows <= neardup.PERMUTATIONS
        assert neardup.found_probability(min(1.0, threshold + 0.15), threshold) > 0.9
        assert neardup.found_probability(max(0.0, threshold - 0.3), threshold) < 0.05


def test_distinct_texts_share_no_band_and_one_changed_word_does():
    texts = [" ".join(paragraph(seed)) for seed in range(400)]
    seen: dict[bytes, int] = {}
    for number, text in enumerate(texts):
        for key in neardup.band_keys(text, "text", 0.7):
            assert seen.setdefault(key, number) == number, "two unrelated paragraphs share a band"
    found = 0
    for seed in range(200):
        words = paragraph(seed)
        changed = list(words)
        changed[20] = "zebra"
        found += bool(set(neardup.band_keys(" ".join(words), "text", 0.7)) &
                      set(neardup.band_keys(" ".join(changed), "text", 0.7)))
    assert found >= 180  # J ~ 0.86 with 40 words: found with probability ~0.98
    assert not set(neardup.band_keys(texts[0], "text", 0.7)) & set(neardup.band_keys(texts[0], "paired", 0.7))
    # Texts without a single word (symbols, emoji) are not all one text.
    symbols = ["!!!", "😀😀", "$$$ %%%", "→ ← ↑"]
    keys = [set(neardup.band_keys(text, "text", 0.7)) for text in symbols]
    assert all(not keys[i] & keys[j] for i in range(len(keys)) for j in range(i + 1, len(keys)))


def test_a_build_rejects_later_near_duplicates_and_never_fetches_them(http_server, tmp_path):
    from mmae import api

    first, second = paragraph(7), paragraph(8)
    one_word = list(first)
    one_word[17] = "zebra"
    appended = [*second, "read", "more", "here"]
    (tmp_path / "texts.txt").write_text("\n".join([
        " ".join(first),
        " ".join(second),
        "   ".join(first),          # an exact copy once whitespace is cleaned: duplicate, not near
        " ".join(one_word),         # one word of 40 changed
        " ".join(paragraph(9)),     # unrelated
        " ".join(appended),         # three words added at the end
    ]) + "\n")
    caption = " ".join(paragraph(10, 30))
    write_jsonl(tmp_path / "pairs.jsonl", [
        {"url": f"{http_server}/img/red.jpg", "caption": caption},
        # Would be http_404 if it were fetched: the near-duplicate caption decides first.
        {"url": f"{http_server}/status/404", "caption": caption.replace(caption.split()[12], "zebra", 1)},
        {"url": f"{http_server}/img/blue.jpg", "caption": " ".join(paragraph(11, 30))},
    ])
    out = tmp_path / "out"
    sources = [{"name": "texts", "kind": "text", "path": str(tmp_path / "texts.txt")},
               {"name": "pairs", "kind": "paired", "path": str(tmp_path / "pairs.jsonl")}]
    report = api.build(None, [f"data.output={out}", f"data.sources={json.dumps(sources)}",
                              "data.quality.near_duplicate_texts=0.7", "data.quality.near_duplicate_captions=true",
                              "data.download.allowed_networks=[127.0.0.1/32]", "data.image.size=32",
                              "data.tokenizer.vocab_size=60"],
                       beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert report["balanced"] and report["written"] == {"paired": 2, "image": 0, "text": 3}
    rejects = {row["key"]: (row["reason"], row["detail"]) for path in sorted((out / "rejects").glob("*.parquet"))
               for row in pq.read_table(path).to_pylist()}
    assert {key: reason for key, (reason, _) in rejects.items()} == {
        "texts.txt:3": "duplicate", "texts.txt:4": "near_duplicate", "texts.txt:6": "near_duplicate",
        "pairs.jsonl:2": "near_duplicate"}
    kept = {row["caption"]: row["id"] for path in sorted((out / "text").glob("*.parquet"))
            for row in pq.read_table(path).to_pylist()}
    assert rejects["texts.txt:4"][1] == f"near-duplicate of {kept[' '.join(first)]} (shares a MinHash band)"
    assert rejects["texts.txt:6"][1] == f"near-duplicate of {kept[' '.join(second)]} (shares a MinHash band)"
    stats = api.stats(str(out))
    shown = {row["reason"]: row for row in stats["reject_examples"]}
    assert shown["near_duplicate"]["rows"] == 3 and "near-duplicate of an earlier" in shown["near_duplicate"]["meaning"]


def test_near_duplicates_are_off_by_default(http_server, tmp_path):
    from mmae import api

    words = paragraph(3)
    changed = list(words)
    changed[10] = "zebra"
    (tmp_path / "texts.txt").write_text(" ".join(words) + "\n" + " ".join(changed) + "\n")
    out = tmp_path / "out"
    sources = [{"name": "texts", "kind": "text", "path": str(tmp_path / "texts.txt")}]
    report = api.build(None, [f"data.output={out}", f"data.sources={json.dumps(sources)}",
                              "data.tokenizer.vocab_size=40"])
    assert report["written"]["text"] == 2


# --- near-duplicate images -----------------------------------------------------------------------

def scene(seed: int, width: int = 160, height: int = 120):
    """A picture of a few random shapes on a gradient (PIL RGB), different for every seed."""
    from PIL import Image, ImageDraw

    draw = random.Random(seed)
    top, bottom = (np.array([draw.randrange(256) for _ in range(3)]) for _ in range(2))
    ramp = np.linspace(0, 1, height)[:, None, None]
    image = Image.fromarray((top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(draw.randint(4, 10)):
        x, y = draw.randrange(-40, width), draw.randrange(-40, height)
        box = [x, y, x + draw.randrange(20, 100), y + draw.randrange(20, 100)]
        colour = tuple(draw.randrange(256) for _ in range(3))
        (pen.ellipse if draw.random() < 0.5 else pen.rectangle)(box, fill=colour)
    return image


def encoded(image, quality: int = 90, fmt: str = "JPEG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def copies(image) -> dict[str, object]:
    from PIL import Image

    width, height = image.size
    return {"jpeg_q30": Image.open(__import__("io").BytesIO(encoded(image, 30))).convert("RGB"),
            "half_size": image.resize((width // 2, height // 2)),
            "mirrored": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            "cropped_4pct": image.crop((int(width * .04), int(height * .02), width - int(width * .03), height))}


def distance(first: list[int], second: list[int]) -> int:
    return min(bin(a ^ b).count("1") for a in first for b in second)


def test_image_hashes_survive_copies_and_tell_pictures_apart():
    hashes = [neardup.image_hashes(scene(seed)) for seed in range(40)]
    # One picture is colours of the same brightness: too flat in grey to hash, so never compared.
    assert [seed for seed, found in enumerate(hashes) if found is None] == [29]
    hashes = [found for found in hashes if found is not None]
    for seed in range(10):
        for name, copy in copies(scene(seed)).items():
            assert distance(hashes[seed], neardup.image_hashes(copy)) <= 8, (seed, name)
    apart = [distance(hashes[i], hashes[j]) for i in range(len(hashes)) for j in range(i + 1, len(hashes))]
    assert min(apart) > 8
    from PIL import Image
    assert neardup.image_hashes(Image.new("RGB", (64, 64), (30, 200, 90))) is None  # flat: nothing to compare


def test_find_duplicates_compares_image_hashes_within_a_band_group():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from mmae.pipelines.builder.dedup import FindDuplicates, HashPacker
    from mmae.pipelines.builder.records import ChunkKey, Packed

    original = neardup.image_hashes(scene(1))
    close = [value ^ 0b111 for value in original]      # 3 bits apart: always a shared band
    far = [value ^ ((1 << 64) - 1) for value in original]  # every bit flipped
    ids = ["%020x" % number for number in range(4)]
    elements = []
    for chunk, rows in ((0, [(original, ids[0]), (far, ids[1])]), (1, [(close, ids[2]), (original, ids[3])])):
        packer = HashPacker(1)
        for index, (hashes, row_id) in enumerate(rows):
            packer.add_keys(*neardup.image_band_keys(hashes, "image", None), index, row_id)
        elements += [(bucket, Packed(ChunkKey(0, 0, chunk), neardup.IMAGE_NEAR, packed)) for bucket, packed in packer.items()]
    with TestPipeline() as pipeline:
        found = pipeline | beam.Create(elements) | FindDuplicates(max_distance=8)
        assert_that(found, equal_to([(ChunkKey(0, 0, 1), [(0, f"near-duplicate of {ids[0]} (image hash 3 of 64 bits apart)"),
                                                       (1, f"near-duplicate of {ids[0]} (image hash 0 of 64 bits apart)")])]))


def test_a_build_rejects_near_duplicate_images(tmp_path):
    import pyarrow as pa
    from mmae import api
    from PIL import Image

    pictures = {seed: scene(seed) for seed in (1, 2, 3)}
    made = copies(pictures[1])
    rows = [("one", encoded(pictures[1]), "a"),
            ("two", encoded(pictures[2]), "b"),
            ("one re-encoded", encoded(made["jpeg_q30"], 95), "c"),
            ("one mirrored", encoded(made["mirrored"], fmt="PNG"), "d"),
            ("three", encoded(pictures[3]), "e"),
            ("two cropped", encoded(copies(pictures[2])["cropped_4pct"]), "f"),
            ("grey", encoded(Image.new("RGB", (90, 90), (128, 128, 128)), fmt="PNG"), "g"),
            ("grey, one level lighter", encoded(Image.new("RGB", (90, 90), (129, 129, 129)), fmt="PNG"), "h")]
    pq.write_table(pa.table({"name": [name for name, _, _ in rows], "jpg": [data for _, data, _ in rows]}),
                   tmp_path / "images.parquet", row_group_size=3)
    # Paired rows: the same picture with another caption is another pair; with the same caption, a copy.
    pq.write_table(pa.table({"caption": ["picture one", "picture one again", "picture one"],
                             "jpg": [encoded(pictures[1]), encoded(made["half_size"]), encoded(made["half_size"])]}),
                   tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    sources = [{"name": "images", "kind": "image", "path": str(tmp_path / "images.parquet"), "image_column": "jpg",
                "label_column": "name"},
               {"name": "pairs", "kind": "paired", "path": str(tmp_path / "pairs.parquet"), "image_column": "jpg"}]
    report = api.build(None, [f"data.output={out}", f"data.sources={json.dumps(sources)}", "data.image.size=64",
                              "data.image.min_size=16", "data.quality.near_duplicate_images=8",
                              "data.tokenizer.vocab_size=30", "data.chunk_rows=2"],
                       beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert report["balanced"] and report["written"] == {"paired": 2, "image": 5, "text": 0}
    rejects = {row["key"]: (row["reason"], row["detail"]) for path in sorted((out / "rejects").glob("*.parquet"))
               for row in pq.read_table(path).to_pylist()}
    assert {key: reason for key, (reason, _) in rejects.items()} == {
        "images.parquet:3": "near_duplicate", "images.parquet:4": "near_duplicate", "images.parquet:6": "near_duplicate",
        "pairs.parquet:3": "near_duplicate"}
    kept = {row["label"]: row for path in sorted((out / "image").glob("*.parquet")) for row in pq.read_table(path).to_pylist()}
    assert set(kept) == {"one", "two", "three", "grey", "grey, one level lighter"}
    assert rejects["images.parquet:3"][1].startswith(f"near-duplicate of {kept['one']['id']} (image hash ")
    assert rejects["images.parquet:6"][1].startswith(f"near-duplicate of {kept['two']['id']} (image hash ")
    stored = Image.open(__import__("io").BytesIO(kept["one"]["image"])).convert("RGB")
    assert distance([kept["one"]["image_phash"]], neardup.image_hashes(stored)) <= 2  # of the stored pixels
    assert kept["grey"]["image_phash"] is None
