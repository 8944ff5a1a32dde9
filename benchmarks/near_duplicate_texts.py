"""Precision and recall of `data.quality.near_duplicate_texts` on real paragraphs.

    .venv/bin/python benchmarks/near_duplicate_texts.py [--threshold 0.7] [--limit 3000]

The paragraphs are the docstrings that ship with numpy, pyarrow, pydantic and the standard
library (no download), cut at blank lines, 30 to 200 words, exact copies dropped. For each
original, copies an editor or a scraper makes:
  one_word        one word replaced
  three_words     three words replaced
  whitespace      spaces and line breaks changed (exact after cleaning: duplicate, not near)
  trailing        a short phrase appended ("Read more on our site.")
  sentence_drop   the last sentence removed (paragraphs of 3+ sentences)
Recall = the share of copies that share a band with their original. The originals themselves
are not all distinct (docstrings are templated), so pairs of originals that share a band are
counted by their own Jaccard similarity: below threshold - 0.2 they are false positives, and
the share of originals that one would reject wrongly is printed. Nothing here is a test split: the threshold's
default was not chosen on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import pkgutil
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmae.pipelines.builder import neardup  # noqa: E402
from mmae.pipelines.builder.text import clean_text  # noqa: E402

SKIP = ("test", "f2py", "__main__", "distutils", "conftest", "setup", "idlelib", "antigravity", "this")
PACKAGES = ["numpy", "pyarrow", "pydantic", "json", "email", "http", "logging", "argparse", "collections",
            "asyncio", "unittest", "xml", "concurrent", "importlib", "multiprocessing"]


def paragraphs(limit: int) -> list[str]:
    found: dict[str, None] = {}
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except ImportError:
            continue
        modules = [package]
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{name}."):
            if any(part in info.name for part in SKIP) or len(modules) > 200:
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    modules.append(importlib.import_module(info.name))
            except (Exception, SystemExit):  # noqa: BLE001 - a module that does not import here gives no docstrings
                continue
        for module in modules:
            for _, member in inspect.getmembers(module):
                doc = getattr(member, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for block in re.split(r"\n\s*\n", doc):
                    text = clean_text(block, 10_000)
                    if 30 <= len(text.split()) <= 200 and ">>>" not in text:
                        found.setdefault(text)
    texts = sorted(found)
    random.Random(0).shuffle(texts)
    return texts[:limit]


def variants(text: str, draw: random.Random) -> dict[str, str]:
    words = text.split()

    def replaced(count: int) -> str:
        changed = list(words)
        for position in draw.sample(range(len(words)), count):
            changed[position] = draw.choice(["zebra", "quartz", "lantern", "violet", "harbor"])
        return " ".join(changed)

    out = {"one_word": replaced(1), "three_words": replaced(3),
           "whitespace": re.sub(" ", lambda _: draw.choice([" ", "  ", "\n", " \t "]), text),
           "trailing": text + " Read more on our site."}
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if len(sentences) >= 3:
        out["sentence_drop"] = " ".join(sentences[:-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--limit", type=int, default=3000, help="originals (default 3000)")
    args = parser.parse_args()
    texts = paragraphs(args.limit)
    started = time.perf_counter()
    keys = [set(neardup.band_keys(text, "text", args.threshold)) for text in texts]
    per_text = (time.perf_counter() - started) / len(texts)
    owners: dict[bytes, list[int]] = defaultdict(list)
    for number, bands in enumerate(keys):
        for key in bands:
            owners[key].append(number)
    pairs = {tuple(sorted((a, b))) for members in owners.values() for a in members for b in members if a < b}
    draw = random.Random(1)
    found: dict[str, list[bool]] = defaultdict(list)
    similarity: dict[str, list[float]] = defaultdict(list)
    for text, bands in zip(texts, keys):
        for kind, copy in variants(text, draw).items():
            cleaned = clean_text(copy, 10_000)
            if kind == "whitespace":
                found[kind].append(cleaned == text)  # the exact dedup catches it first
                continue
            found[kind].append(bool(bands & set(neardup.band_keys(cleaned, "text", args.threshold))))
            a, b = neardup.shingles(text), neardup.shingles(cleaned)
            similarity[kind].append(len(a & b) / len(a | b))
    bands, rows = neardup.bands_for(args.threshold)
    print(f"threshold {args.threshold}: {bands} bands x {rows} rows of {neardup.PERMUTATIONS} MinHash values; "
          f"{len(texts):,} originals; {1e3 * per_text:.2f} ms per text for the band keys")
    print("| copy | mean Jaccard | recall |\n|---|---:|---:|")
    for kind, hits in found.items():
        mean = sum(similarity[kind]) / len(similarity[kind]) if similarity[kind] else 1.0
        note = " (exact after cleaning)" if kind == "whitespace" else ""
        print(f"| {kind}{note} | {mean:.2f} | {100 * sum(hits) / len(hits):.1f}% of {len(hits):,} |")
    total = [hit for kind, hits in found.items() if kind != "whitespace" for hit in hits]
    print(f"all near copies: recall {100 * sum(total) / len(total):.1f}%")
    # The originals are not all distinct: docstrings are often templated. So a flagged pair of
    # originals is judged by its own Jaccard: below threshold - 0.2 it is a false positive.
    shingled = [neardup.shingles(text) for text in texts]
    similar = {pair: len(shingled[pair[0]] & shingled[pair[1]]) / len(shingled[pair[0]] | shingled[pair[1]])
               for pair in pairs}
    false = [pair for pair, value in similar.items() if value < args.threshold - 0.2]
    print(f"pairs of originals that share a band: {len(pairs):,} of {len(texts) * (len(texts) - 1) // 2:,}; "
          f"by their Jaccard: >= {args.threshold}: {sum(v >= args.threshold for v in similar.values()):,}, "
          f"{args.threshold - 0.2:.1f}-{args.threshold}: {sum(args.threshold - 0.2 <= v < args.threshold for v in similar.values()):,}, "
          f"< {args.threshold - 0.2:.1f} (false positives): {len(false):,} "
          f"({100 * len({b for _, b in false}) / len(texts):.2f}% of originals rejected wrongly)")
    for a, b in sorted(false)[:3]:
        print(f"  false positive, Jaccard {similar[(a, b)]:.2f}: {texts[a][:60]!r} / {texts[b][:60]!r}")

if __name__ == "__main__":
    main()
