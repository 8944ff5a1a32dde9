"""Small schema-v1 datasets written directly (no Beam), with uneven shards and many row groups."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from mmae.pipelines.shards import write_shard
from PIL import Image


def tiny_jpeg(index: int, side: int = 16) -> bytes:
    image = Image.new("RGB", (side, side), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    image.putpixel((index % side, (index // side) % side), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def row(kind: str, index: int, source: str | None = None) -> dict:
    has_image = kind != "text"
    has_text = kind != "image"
    data = tiny_jpeg(index) if has_image else None
    return {
        "id": f"{kind[0]}{index:07d}",
        "source": source or f"{kind}-src",
        "kind": kind,
        "url": f"http://x/{kind}/{index}.jpg" if has_image else None,
        "caption": f"caption {index}" if has_text else None,
        "tokens": [5 + (index + offset) % 90 for offset in range(3 + index % 9)] if has_text else None,
        "image": data,
        "image_format": "jpeg" if has_image else None,
        "width": 16 if has_image else None,
        "height": 16 if has_image else None,
        "original_width": 16 if has_image else None,
        "original_height": 16 if has_image else None,
        "image_sha256": hashlib.sha256(data).hexdigest() if has_image else None,
        "label": f"class{index % 3}" if kind == "paired" else None,
    }


def write_dataset(root: Path, shard_rows: dict[str, list[int]], rows_per_group: int = 8,
                  sources: dict[str, list[str]] | None = None) -> Path:
    """shard_rows: kind -> rows per shard (uneven on purpose). Rows of a kind are numbered globally;
    `sources` optionally cycles source names over a kind's rows."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for kind, sizes in shard_rows.items():
        start = 0
        for number, size in enumerate(sizes):
            names = (sources or {}).get(kind)
            rows = [row(kind, index, names[index % len(names)] if names else None)
                    for index in range(start, start + size)]
            start += size
            # write_shard sorts by id; numbering keeps each shard's ids contiguous.
            entries.append(write_shard(str(root), kind, number, len(sizes), rows, rows_per_group))
    manifest = {
        "schema_version": "1",
        "rows": {kind: sum(sizes) for kind, sizes in shard_rows.items()},
        "shards": entries,
        "rejects": [],
        "rejected": 0,
        "tokenizer": None,
        "config": {"sources": [{"name": name, "kind": kind} for kind, names in (sources or {}).items()
                               for name in names]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def corrupt_row_group(path: Path, group: int, column: str) -> set[str]:
    """Overwrite one column chunk of one row group with junk; return that row group's ids."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    ids = set(parquet.read_row_group(group, columns=["id"]).column("id").to_pylist())
    chunk = parquet.metadata.row_group(group).column(parquet.schema_arrow.get_field_index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\x07" * chunk.total_compressed_size
    path.write_bytes(bytes(data))
    return ids
