"""`mmae build`: the Beam pipeline. `pipeline.py` wires the composites; each stage has its module:
plan (chunks), read, dedup, download (+ fetch, images), staging, tokenizer, write, finalize,
output (fresh / resume / retry), progress."""
