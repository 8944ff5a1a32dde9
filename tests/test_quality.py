"""data.quality: each rule's reject reason, defaults that change nothing, and a whole build in
which the filtered captions are rejected before anything is fetched for them."""

from __future__ import annotations

import json

import numpy as np

import pyarrow.parquet as pq
import pytest
from mmae.pipelines.builder.quality import problem
from mmae.schemas.config import ConfigError, QualityConfig
from mmae.schemas.loading import load_config

from tests.conftest import write_jsonl

ALL_ON = QualityConfig(max_words=12, max_top_word_share=0.5, max_repeated_trigram_share=0.3, min_alpha_share=0.5,
                       reject_file_names=True, reject_boilerplate=True, languages=["en"])

CASES = [
    ("a red car parked in front of an old house", None),
    ("the quick brown fox jumps over the lazy dog", None),
    ("a dog", None),  # too short for the language model to be sure: kept
    ("IMG_2041.JPG", "file_name_caption"),
    ("DSC01234", "file_name_caption"),
    ("photo (3).png", "file_name_caption"),
    ("Click here to see more", "boilerplate"),
    ("Image 3", "boilerplate"),
    ("one two three four five six seven eight nine ten eleven twelve thirteen", "too_many_words"),
    ("buy buy buy cheap buy now", "repetitive"),
    ("red car red car red car red car red car", "repetitive"),
    ("$$$ 1234 5678 9999 !!!", "low_alpha"),
    ("ein rotes Auto steht auf der Strasse vor dem alten Haus", "wrong_language"),
]


@pytest.mark.parametrize("text, reason", CASES)
def test_each_rule_has_its_reason(text, reason):
    found = problem(text, ALL_ON)
    assert (found[0] if found else None) == reason, found


@pytest.mark.parametrize("text, _", CASES)
def test_every_rule_is_off_by_default(text, _):
    assert problem(text, QualityConfig()) is None


def test_the_pattern_lists_are_the_users_to_extend():
    extended = QualityConfig(reject_boilerplate=True, boilerplate=[*QualityConfig().boilerplate, r"^sponsored\b"])
    assert problem("Sponsored: a red car", extended)[0] == "boilerplate"
    assert problem("Sponsored: a red car", QualityConfig(reject_boilerplate=True)) is None
    with pytest.raises(ConfigError, match="is not a regular expression"):
        load_config(None, ["data.sources=[{name: a, kind: text, path: a.txt}]", "data.quality.boilerplate=['(']"])
    with pytest.raises(ConfigError, match="ISO 639-1"):
        load_config(None, ["data.sources=[{name: a, kind: text, path: a.txt}]", "data.quality.languages=[English]"])


def test_a_build_rejects_filtered_captions_before_fetching_them(http_server, tmp_path):
    from mmae import api

    write_jsonl(tmp_path / "pairs.jsonl", [
        {"url": f"{http_server}/img/red.jpg", "caption": "a red square on a plain white ground"},
        # Would be http_404 if it were fetched: the rule decides first, so nothing is requested.
        {"url": f"{http_server}/status/404", "caption": "IMG_2041.JPG"},
        {"url": f"{http_server}/img/blue.jpg", "caption": "Click here to see more"},
    ])
    (tmp_path / "texts.txt").write_text("\n".join([
        "three green circles on a white background",
        "buy buy buy cheap buy now",
        "$$$ 1234 5678 9999 !!!",
        "ein rotes Auto steht auf der Strasse vor dem alten Haus",
        "a blue triangle at the top left of the picture",
    ]) + "\n")
    out = tmp_path / "out"
    sources = [{"name": "pairs", "kind": "paired", "path": str(tmp_path / "pairs.jsonl")},
               {"name": "texts", "kind": "text", "path": str(tmp_path / "texts.txt")}]
    quality = ALL_ON.model_dump(mode="json")
    report = api.build(None, [f"data.output={out}", f"data.sources={json.dumps(sources)}",
                              f"data.quality={json.dumps(quality)}", "data.download.allowed_networks=[127.0.0.1/32]",
                              "data.image.size=32", "data.tokenizer.vocab_size=40"])
    assert report["balanced"] and report["written"] == {"paired": 1, "image": 0, "text": 2}
    rejects = {row["key"]: row["reason"] for path in sorted((out / "rejects").glob("*.parquet"))
               for row in pq.read_table(path).to_pylist()}
    assert rejects == {"pairs.jsonl:2": "file_name_caption", "pairs.jsonl:3": "boilerplate",
                       "texts.txt:2": "repetitive", "texts.txt:3": "low_alpha", "texts.txt:4": "wrong_language"}
    stats = api.stats(str(out))
    shown = {row["reason"]: row for row in stats["reject_examples"]}
    assert shown["file_name_caption"]["examples"] == "pairs.jsonl:2: IMG_2041.JPG"
    assert "file or camera name" in shown["file_name_caption"]["meaning"]


def test_apply_to_limits_the_rules_to_one_kind():
    assert problem("IMG_1.JPG", QualityConfig(reject_file_names=True, apply_to="text")) is not None
    from mmae.pipelines.builder.quality import applies

    assert applies(QualityConfig(apply_to="text"), "text") and not applies(QualityConfig(apply_to="text"), "paired")


def test_the_language_model_is_unpacked_once_into_the_cache_and_mapped_after(tmp_path, monkeypatch):
    from pathlib import Path

    from mmae.pipelines.builder import quality
    from py3langid.langid import MODEL_DIR, MODEL_FILE

    monkeypatch.setenv("MMAE_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["a small dog runs on the beach", "un petit chien court sur la plage", "ein kleiner Hund am Strand"]
    quality._identifier.cache_clear()
    try:
        first = [quality._identifier().classify(text) for text in texts]
        (folder,) = (tmp_path / "cache").iterdir()
        assert (folder / "done").exists() and sorted(path.name for path in folder.glob("*.npy")) == sorted(
            f"{name}.npy" for name in quality.MODEL_ARRAYS)
        quality._identifier.cache_clear()
        assert [quality._identifier().classify(text) for text in texts] == first
        assert [language for language, _ in first] == ["en", "fr", "de"]
        # A damaged cache is not trusted: the model is loaded from the wheel as py3langid loads it.
        (folder / "ptc.npy").write_bytes(b"not an array")
        quality._identifier.cache_clear()
        assert [quality._identifier().classify(text) for text in texts] == first
        # Nor one whose arrays do not fit together (a valid .npy of the wrong shape).
        np.save(folder / "ptc.npy", np.zeros((3, 2), dtype=np.float16))
        assert quality._cached_model(Path(MODEL_DIR) / MODEL_FILE) is None
        quality._identifier.cache_clear()
        assert [quality._identifier().classify(text) for text in texts] == first
        # A cache that cannot be written is no error either.
        monkeypatch.setenv("MMAE_CACHE_DIR", str(tmp_path / "file"))
        (tmp_path / "file").write_text("in the way")
        quality._identifier.cache_clear()
        assert [quality._identifier().classify(text) for text in texts] == first
    finally:
        quality._identifier.cache_clear()
