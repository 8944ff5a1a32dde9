"""`mmae build`: the Beam pipeline. `pipeline.py` wires the composites; each stage has its module:
plan (chunks), read (+ readers/ per format, sources, tablefiles, lines, webdataset, text), dedup,
download (+ fetch over connections, fileread, inline, images), staging, tokenizer, write,
finalize, output (fresh / resume / retry), replace (setting a finished build aside, journaled),
progress. `records` holds what crosses stages (typed keys, rows and rejects), `schemes` the URL
schemes. docs/ARCHITECTURE.md tells the whole flow."""
