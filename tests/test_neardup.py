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
