"""Text cleaning and the SentencePiece sample/training."""

from __future__ import annotations

from mmae.pipelines.builder.text import clean_text
from mmae.pipelines.builder.tokenizer import (
    SPECIAL_IDS,
    SampleTexts,
    Tokenizer,
    special_ids,
    train_sentencepiece,
)
from mmae.schemas.config import TokenizerConfig


def test_clean_text():
    assert clean_text("  a\u00a0red\tcircle \n\n on\x00 white  ", 100) == "a red circle on white"
    assert clean_text("ﬁne ｆｕｌｌｗｉｄｔｈ", 100) == "fine fullwidth"  # NFKC
    assert clean_text("\u200b \t", 100) == ""
    assert clean_text("one two three four five", 15) == "one two three"  # cut at a word boundary
    assert clean_text("abcdefghijklmnop", 5) == "abcde"


def test_joiners_that_change_meaning_are_kept():
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # "I want", with a zero-width non-joiner
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji sequence
    assert clean_text(persian, 100) == persian
    assert clean_text(f"a {family} at home", 100) == f"a {family} at home"
    assert clean_text("zero\u200bwidth \u202eright-to-left", 100) == "zerowidth right-to-left"


def test_sample_is_order_independent_and_bounded():
    texts = [f"text number {i}" for i in range(1000)]
    combine = SampleTexts(50)

    def run(order):
        halves = [combine.create_accumulator(), combine.create_accumulator()]
        for index, text in enumerate(order):
            halves[index % 2] = combine.add_input(halves[index % 2], text)
        return combine.extract_output(combine.merge_accumulators(halves))

    forward, backward = run(texts), run(list(reversed(texts)))
    assert forward == backward and len(forward) == 50


def test_training_is_deterministic_and_has_specials():
    texts = [f"{c} {s} at the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
             for p in ("top left", "center", "bottom right")] * 20
    model = train_sentencepiece(texts, TokenizerConfig(vocab_size=200))
    assert model == train_sentencepiece(texts, TokenizerConfig(vocab_size=200))
    assert special_ids(model) == SPECIAL_IDS
    tokenizer = Tokenizer(model, max_tokens=3)
    assert len(tokenizer.encode("red circle at the center")) == 3
    full = Tokenizer(model, max_tokens=64)
    assert full.processor.decode(full.encode("red circle at the center")) == "red circle at the center"


def test_no_text_no_model():
    assert train_sentencepiece([], TokenizerConfig()) == b""


def test_default_tokenizer_learns_words_on_a_small_corpus():
    import random

    from mmae.pipelines.demo.corpus import _scene, caption_for

    rng = random.Random(0)
    texts = sorted({caption_for(_scene(rng), rng) for _ in range(2000)})
    model = train_sentencepiece(texts, TokenizerConfig())
    pieces = Tokenizer(model, 64).processor.encode("two yellow diamonds at the top left", out_type=str)
    assert pieces == ["▁two", "▁yellow", "▁diamonds", "▁at", "▁the", "▁top", "▁left"]
