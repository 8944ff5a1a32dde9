"""The data side of mmae; never imports torch.

- `pipelines.builder` — `mmae build`: the Beam pipeline, one module per stage, wired in `pipeline.py`;
- `pipelines.inspect` — `mmae stats` / `mmae validate`: what is in a built dataset;
- `pipelines.demo`    — `mmae demo` / `mmae demo-data`: the synthetic corpus and loopback servers;
- `pipelines.shards`  — writing Parquet files atomically, shared by the build and the tools;
- `pipelines.localfiles` — reading a local file a stranger named: regular files only (the build's
  URL lists and image folders, `mmae embed`'s folders and text files);
- `pipelines.outputs` — where a command may write: never into a dataset or onto its inputs.
"""

import logging
import os

# img2dataset (the benchmarks' baseline) imports albumentations, which checks PyPI for a newer
# release on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class _OptionalGcpNoise(logging.Filter):
    """Beam warns, on import and again when a pipeline runs, that optional GCP client libraries
    (apitools, bigquery) are missing; they are used only on Dataflow. The one message is dropped
    from the root logger it is written to, for the commands and the Python API alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "apitools not found" in str(record.msg))


class _OwnRecordCoder(logging.Filter):
    """Beam notes each time it encodes one of the build's typed records (records.py, NamedTuples)
    with its deterministic fallback coder: the type's reference and its fields, which is what a
    group key needs. About our own records that is the design, not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Using fallback deterministic coder")
                    and "mmae.pipelines.builder.records." in record.getMessage())


logging.getLogger().addFilter(_OptionalGcpNoise())
logging.getLogger("apache_beam.coders.coder_impl").addFilter(_OwnRecordCoder())
