"""`mmae stats DATASET`: what is in a built dataset, without reading image bytes.

    mmae stats build/demo/shards                 # tables in the terminal
    mmae stats build/demo/shards --json          # one JSON object on stdout
    mmae stats build/demo/shards --html report.html --samples 24

Every figure comes from polars lazy scans with column projection, or from Parquet footers
(bytes per image); the `image` column is read only for the HTML gallery's sampled rows.
"""

from __future__ import annotations

from typing import Any, Optional

import polars as pl

from pipelines.dataset import Dataset, column_bytes, scan
from schemas.shard import KINDS

IMAGE_SIZE_COLUMNS = ("width", "height", "original_width", "original_height")
TOP_TOKENS = 20


def _distribution(frame: pl.LazyFrame, column: str) -> dict[str, Optional[float]]:
    row = frame.select(
        pl.col(column).count().alias("count"),
        pl.col(column).min().alias("min"),
        pl.col(column).mean().alias("mean"),
        pl.col(column).quantile(0.5, "nearest").alias("p50"),
        pl.col(column).quantile(0.95, "nearest").alias("p95"),
        pl.col(column).max().alias("max"),
    ).collect().row(0, named=True)
    return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in row.items()}


def _histogram(frame: pl.LazyFrame, column: str) -> dict[str, list]:
    counts = frame.group_by(column).agg(pl.len().alias("n")).sort(column).collect()
    return {"values": counts[column].to_list(), "counts": counts["n"].to_list()}


def compute_stats(dataset: Dataset) -> dict[str, Any]:
    manifest = dataset.manifest
    data_urls = dataset.shard_urls()
    image_urls = dataset.shard_urls("paired") + dataset.shard_urls("image")
    text_urls = dataset.shard_urls("paired") + dataset.shard_urls("text")
    stats: dict[str, Any] = {"dataset": dataset.root, "schema_version": manifest.get("schema_version")}

    # Rows per kind and per source.
    base = scan(data_urls, ["kind", "source"])
    per_source = base.group_by("kind", "source").agg(pl.len().alias("rows")).sort("kind", "source").collect()
    stats["rows"] = {kind: int(per_source.filter(pl.col("kind") == kind)["rows"].sum()) for kind in KINDS}
    stats["rows_by_source"] = per_source.to_dicts()

    # Rejects by reason (and per source).
    reject_urls = dataset.reject_urls()
    if reject_urls:
        rejects = scan(reject_urls, ["source", "reason"])
        by_reason = rejects.group_by("reason").agg(pl.len().alias("n")).sort("n", descending=True).collect()
        stats["rejected"] = dict(zip(by_reason["reason"].to_list(), by_reason["n"].to_list()))
        stats["rejected_by_source"] = (
            rejects.group_by("source", "reason").agg(pl.len().alias("n")).sort("source", "reason").collect().to_dicts()
        )
    else:
        stats["rejected"], stats["rejected_by_source"] = {}, []

    # Token lengths: overall, per kind, share cut at max_tokens; histogram for the report.
    if text_urls:
        lengths = scan(text_urls, ["kind", "tokens"]).select(
            "kind", pl.col("tokens").list.len().alias("length")
        ).filter(pl.col("length").is_not_null())
        stats["tokens"] = _distribution(lengths, "length")
        stats["tokens_by_kind"] = {
            kind: _distribution(lengths.filter(pl.col("kind") == kind), "length")
            for kind in ("paired", "text") if stats["rows"][kind]
        }
        max_tokens = dataset.max_tokens
        if max_tokens:
            at_cap = lengths.select((pl.col("length") >= max_tokens).mean()).collect().item()
            stats["tokens"]["max_tokens"] = max_tokens
            stats["tokens"]["truncated_share"] = round(at_cap or 0.0, 4)
        stats["token_length_histogram"] = _histogram(lengths, "length")
        stats["tokenizer"] = _tokenizer_coverage(dataset, scan(text_urls, ["tokens"]))
    else:
        stats["tokens"], stats["tokens_by_kind"], stats["tokenizer"] = {}, {}, None

    # Image sizes, bytes per image (from footers), duplicates left across kinds.
    if image_urls:
        images = scan(image_urls, ["kind", *IMAGE_SIZE_COLUMNS, "image_sha256"])
        stats["image"] = {column: _distribution(images, column) for column in IMAGE_SIZE_COLUMNS}
        stats["image_size_histogram"] = {
            "width": _histogram(images, "width"), "height": _histogram(images, "height"),
            "original_width": _histogram(images, "original_width"),
        }
        total, rows = 0, 0
        for url in image_urls:
            column_total, column_rows = column_bytes(url, "image")
            total, rows = total + column_total, rows + column_rows
        # Parquet stores a 4-byte length before each binary value.
        stats["image"]["bytes_per_image_mean"] = round((total - 4 * rows) / rows, 1) if rows else None
        unique = images.select(pl.col("image_sha256").n_unique()).collect().item()
        stats["image"]["same_image_in_several_rows"] = int(sum(stats["rows"][k] for k in ("paired", "image")) - unique)
    else:
        stats["image"] = {}

    # Bytes: the data shards as the manifest lists them (rejects separately).
    stats["bytes"] = int(sum(entry["bytes"] for entry in manifest["shards"]))
    stats["reject_bytes"] = int(sum(entry["bytes"] for entry in manifest.get("rejects", [])))
    stats["shards"] = [
        {"path": entry["path"], "kind": entry["kind"], "rows": entry["rows"], "bytes": entry["bytes"],
         "bytes_per_row": round(entry["bytes"] / entry["rows"], 1) if entry["rows"] else None}
        for entry in manifest["shards"]
    ]

    # Labels, when the sources named a label column.
    labels = scan(data_urls, ["kind", "label"]).filter(pl.col("label").is_not_null())
    label_counts = labels.group_by("kind", "label").agg(pl.len().alias("n")).sort("kind", "n", descending=[False, True]).collect()
    stats["labels"] = label_counts.to_dicts()

    # Duplicate rate: rows rejected as duplicates over rows read, per kind.
    written = sum(stats["rows"].values())
    duplicates = stats["rejected"].get("duplicate", 0)
    read = written + sum(stats["rejected"].values())
    stats["duplicate_rate"] = round(duplicates / read, 4) if read else 0.0
    return stats


def _tokenizer_coverage(dataset: Dataset, tokens: pl.LazyFrame) -> Optional[dict[str, Any]]:
    entry = dataset.manifest.get("tokenizer")
    model = dataset.tokenizer_model()
    if not entry or not model:
        return None
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    unk = entry.get("special_ids", {}).get("unk", processor.unk_id())
    flat = tokens.select(pl.col("tokens").explode().alias("token")).filter(pl.col("token").is_not_null())
    summary = flat.select(pl.len().alias("total"), (pl.col("token") == unk).sum().alias("unknown")).collect().row(0)
    top = flat.group_by("token").agg(pl.len().alias("n")).sort(["n", "token"], descending=[True, False]).head(TOP_TOKENS).collect()
    return {
        "vocab_size": processor.get_piece_size(),
        "tokens": int(summary[0]),
        "unknown_share": round(summary[1] / summary[0], 6) if summary[0] else 0.0,
        "top": [
            {"id": int(token), "piece": processor.id_to_piece(int(token)), "text": processor.decode([int(token)]),
             "count": int(count)}
            for token, count in zip(top["token"].to_list(), top["n"].to_list())
        ],
    }


def print_tables(stats: dict[str, Any]) -> None:
    """Readable tables (polars' own formatting) for a terminal."""
    def table(title: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        print(f"\n{title}")
        print(pl.DataFrame(rows))

    with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=160, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True, fmt_str_lengths=60):
        print(f"dataset {stats['dataset']} (schema v{stats['schema_version']}): "
              f"{stats['bytes'] / 1e6:.1f} MB in {len(stats['shards'])} shards; "
              f"duplicate rate {stats['duplicate_rate']:.2%}")
        table("rows by kind", [{"kind": kind, "rows": count} for kind, count in stats["rows"].items()])
        table("rows by source", stats["rows_by_source"])
        table("rejected by source and reason", stats["rejected_by_source"])
        if stats["tokens"]:
            table("token lengths", [{"kind": "all", **stats["tokens"]}] + [
                {"kind": kind, **values} for kind, values in stats["tokens_by_kind"].items()])
        if stats["image"]:
            table("image sizes (px)", [{"column": column, **stats["image"][column]} for column in IMAGE_SIZE_COLUMNS])
            print(f"mean bytes per image: {stats['image']['bytes_per_image_mean']}; "
                  f"rows sharing an image with another row: {stats['image']['same_image_in_several_rows']}")
        table("shards", stats["shards"])
        table("labels", stats["labels"])
        if stats["tokenizer"]:
            coverage = stats["tokenizer"]
            print(f"\ntokenizer: vocab {coverage['vocab_size']}, {coverage['tokens']} tokens, "
                  f"unknown {coverage['unknown_share']:.4%}")
            table("top tokens", coverage["top"])
