"""SentencePiece: a deterministic bounded sample of the corpus text, training, encoding.

The sample is a bottom-k by text hash: the same texts are chosen whatever order the runner
delivers them in, and memory is bounded by `tokenizer.sample_size` texts.
"""

from __future__ import annotations

import hashlib
import heapq
import io
from typing import Iterable, Optional

import apache_beam as beam
import sentencepiece as spm
from mmae.schemas.config import TokenizerConfig

# Special ids every mmae tokenizer has; the trainer relies on them (recorded in the manifest).
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}


def _text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class SampleTexts(beam.CombineFn):
    """Keep the `size` texts with the smallest hashes (distinct texts only)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def create_accumulator(self) -> dict[str, str]:
        return {}

    def _trim(self, accumulator: dict[str, str]) -> dict[str, str]:
        if len(accumulator) <= self.size:
            return accumulator
        return dict(heapq.nsmallest(self.size, accumulator.items()))

    def add_input(self, accumulator: dict[str, str], text: str) -> dict[str, str]:
        accumulator[_text_hash(text)] = text
        if len(accumulator) > 2 * self.size:
            accumulator = self._trim(accumulator)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[dict[str, str]]) -> dict[str, str]:
        merged: dict[str, str] = {}
        for accumulator in accumulators:
            merged.update(accumulator)
            if len(merged) > 2 * self.size:
                merged = self._trim(merged)
        return merged

    def extract_output(self, accumulator: dict[str, str]) -> list[str]:
        return [text for _, text in sorted(self._trim(accumulator).items())]


class MergeSamples(SampleTexts):
    """Partial samples (what `SampleTexts` accumulates, e.g. per download bundle) -> one sample."""

    def add_input(self, accumulator: dict[str, str], sample: dict[str, str]) -> dict[str, str]:
        return self.merge_accumulators([accumulator, sample])


def train_sentencepiece(texts: list[str], config: TokenizerConfig) -> bytes:
    """Train a SentencePiece model on `texts` (already sampled); return the serialized model."""
    if not texts:
        return b""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hard_vocab_limit=False,  # a small corpus gets fewer pieces instead of an error
        character_coverage=1.0 if len(texts) < 100_000 else 0.9995,
        pad_id=SPECIAL_IDS["pad"],
        unk_id=SPECIAL_IDS["unk"],
        bos_id=SPECIAL_IDS["bos"],
        eos_id=SPECIAL_IDS["eos"],
        control_symbols=["<mask>"],
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        num_threads=1,  # single-threaded training is reproducible bit for bit
        minloglevel=2,
    )
    return model.getvalue()


class Tokenizer:
    """A loaded SentencePiece model with the truncation policy applied."""

    def __init__(self, model: bytes, max_tokens: int) -> None:
        self.processor = spm.SentencePieceProcessor(model_proto=model)
        self.max_tokens = max_tokens

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)[: self.max_tokens]


def special_ids(model: bytes) -> dict[str, Optional[int]]:
    processor = spm.SentencePieceProcessor(model_proto=model)

    def known(index: int) -> Optional[int]:
        return index if index >= 0 else None

    mask = processor.piece_to_id("<mask>")
    return {
        "pad": known(processor.pad_id()),
        "unk": known(processor.unk_id()),
        "bos": known(processor.bos_id()),
        "eos": known(processor.eos_id()),
        "mask": mask if processor.id_to_piece(mask) == "<mask>" else None,
    }


class TrainTokenizer(beam.PTransform):
    """Partial samples of the cleaned texts (`SampleTexts` accumulators) -> one serialized
    SentencePiece model (or the given one); b"" when there is no text."""

    def __init__(self, config: TokenizerConfig, given_model: Optional[bytes]) -> None:
        super().__init__()
        self.config = config
        self.given_model = given_model

    def expand(self, texts):
        if self.given_model is not None:
            return texts.pipeline | "GivenModel" >> beam.Create([self.given_model])
        return (
            texts
            | "Sample" >> beam.CombineGlobally(MergeSamples(self.config.sample_size))
            | "Train" >> beam.Map(train_sentencepiece, self.config)
        )
