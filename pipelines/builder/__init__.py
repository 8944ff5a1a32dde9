"""`mmae build`: the Beam pipeline. `pipeline.py` wires the composites; each stage has its module:
plan (chunks), read (+ sources, lines, text), dedup, download (+ fetch, images), staging, tokenizer,
write, finalize, output (fresh / resume / retry), replace (setting a finished build aside, journaled),
progress."""
