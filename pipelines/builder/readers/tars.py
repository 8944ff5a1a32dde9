"""WebDataset tars: one record per sample, its image left in the tar (a `locator` the download
stage reads by offset), its caption from the txt member, its label from json or cls."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from .. import webdataset
from .rows import RowProblem, error_text, label_value
from ..records import new_record, reject
from ..sources import SourceFile
from mmae.schemas.config import SourceConfig


def read_tar(source: SourceConfig, source_file: SourceFile) -> Iterator[dict[str, Any]]:
    """One WebDataset tar: a record per sample, its image left in the tar (`locator`)."""
    for sample in webdataset.samples(source_file.path):
        record = new_record(source.name, source.kind, f"{source_file.relative}#{sample.key}")
        record["url"] = f"{source_file.path}#{sample.key}"
        if sample.problems:
            yield reject(record, "bad_row", "; ".join(sample.problems))
            continue
        image = sample.image
        if image is None:
            found = ", ".join(sorted(set(sample.texts) | set(sample.images)) + sample.not_read) or "nothing"
            yield reject(record, "missing_column", f"no {'/'.join(webdataset.IMAGE_EXTENSIONS)} member (has {found})")
            continue
        record["locator"] = {"tar": source_file.path, "offset": image[1], "size": image[2]}
        try:
            if source.kind == "paired":
                if "txt" not in sample.texts:
                    yield reject(record, "missing_column", "no txt member (the caption)")
                    continue
                record["caption"] = sample.texts["txt"].decode("utf-8-sig")
            if source.label_column:
                record["label"] = _sample_label(sample, source.label_column)
        except UnicodeDecodeError as error:
            yield reject(record, "invalid_utf8", str(error))
            continue
        except RowProblem as problem:
            yield reject(record, problem.reason, problem.detail)
            continue
        except Exception as error:  # noqa: BLE001 - e.g. a json member nested too deep: this sample's
            yield reject(record, "bad_row", error_text(error))
            continue
        yield record


def _sample_label(sample: "webdataset.Sample", column: str) -> Optional[str]:
    """The label: `column` of the sample's json member, else its cls member."""
    if "json" in sample.texts:
        try:
            extra = json.loads(sample.texts["json"])
        except (ValueError, RecursionError) as error:
            raise RowProblem("bad_row", f"json member: {error}") from None
        if isinstance(extra, dict) and column in extra:
            return label_value(extra[column], column)
    if "cls" in sample.texts:
        return sample.texts["cls"].decode("utf-8").strip()
    return None
