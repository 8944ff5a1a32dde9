"""`mmae stats DATASET`: what is in a built dataset, without reading image bytes.

    mmae stats build/demo/shards                 # tables in the terminal
    mmae stats build/demo/shards --json          # one JSON object on stdout
    mmae stats build/demo/shards --html report.html --samples 24

Every figure comes from polars lazy scans with column projection, or from Parquet footers
(bytes per image); the `image` column is read only for the HTML gallery's sampled rows.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import polars as pl
from .dataset import Dataset, column_bytes, scan
from mmae.schemas.shard import KINDS, REJECT_REASONS

IMAGE_SIZE_COLUMNS = ("width", "height", "original_width", "original_height")
TOP_TOKENS = 20
EXAMPLES = 3  # rejects shown per reason


def _distribution_from_counts(values: list, counts: list) -> dict[str, Optional[float]]:
    """count/min/mean/p50/p95/max of a column, from its value histogram (exact, 'nearest' quantiles)."""
    pairs = sorted((value, count) for value, count in zip(values, counts) if value is not None)
    total = sum(count for _, count in pairs)
    if not total:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "max": None}

    def quantile(q: float):
        # polars' "nearest": the value at rank round(q * (n - 1)) in sorted order.
        rank = math.floor(q * (total - 1) + 0.5)  # half up, as polars (not banker's rounding)
        seen = 0
        for value, count in pairs:
            seen += count
            if seen > rank:
                return value
        return pairs[-1][0]

    mean = sum(value * count for value, count in pairs) / total
    return {"count": total, "min": pairs[0][0], "mean": round(mean, 3), "p50": quantile(0.5),
            "p95": quantile(0.95), "max": pairs[-1][0]}


def _as_histogram(frame: pl.DataFrame) -> dict[str, list]:
    return {"values": frame[frame.columns[0]].to_list(), "counts": frame["n"].to_list()}


def compute_stats(dataset: Dataset) -> dict[str, Any]:
    """All figures of `mmae stats`.

    Every figure is derived from small group-by tables (rows per source, a histogram of token
    lengths, counts per token id, a histogram per image-size column), so memory is bounded by
    the number of distinct values, not rows; each query streams its own projected scan.
    Exact distinct-image counting is the exception: 8 bytes per image row.
    """
    manifest = dataset.manifest
    image_urls = dataset.shard_urls("paired") + dataset.shard_urls("image")
    text_urls = dataset.shard_urls("paired") + dataset.shard_urls("text")
    queries = _queries(dataset.shard_urls(), image_urls, text_urls, dataset.reject_urls())
    names = list(queries)
    # No shared-subplan cache: it would hold every projected column in memory at once.
    results = dict(zip(names, pl.collect_all(
        [queries[name] for name in names], engine="streaming",
        optimizations=pl.QueryOptFlags(comm_subplan_elim=False),
    )))
    stats: dict[str, Any] = {"dataset": dataset.root, "schema_version": manifest.schema_version}
    stats.update(_row_figures(results))
    stats.update(_token_figures(dataset, results) if text_urls else
                 {"tokens": {}, "tokens_by_kind": {}, "tokens_by_source": {}, "tokenizer": None})
    stats.update(_image_figures(results, image_urls, stats["rows"]) if image_urls else {"image": {}, "image_by_source": {}})
    # Bytes: the data shards as the manifest lists them (rejects separately).
    stats["bytes"] = int(sum(entry.bytes for entry in manifest.shards))
    stats["reject_bytes"] = int(sum(entry.bytes for entry in manifest.rejects))
    stats["shards"] = [
        {"path": entry.path, "kind": entry.kind, "rows": entry.rows, "bytes": entry.bytes,
         "bytes_per_row": round(entry.bytes / entry.rows, 1) if entry.rows else None}
        for entry in manifest.shards
    ]
    # Duplicate rate: rows rejected as duplicates over rows read.
    read = sum(stats["rows"].values()) + sum(stats["rejected"].values())
    stats["duplicate_rate"] = round(stats["rejected"].get("duplicate", 0) / read, 4) if read else 0.0
    return stats


def _queries(data_urls: list[str], image_urls: list[str], text_urls: list[str],
             reject_urls: list[str]) -> dict[str, pl.LazyFrame]:
    """The lazy group-by queries, all collected in one streaming pass."""
    queries: dict[str, pl.LazyFrame] = {}
    # One pass for rows per (kind, source) and label counts: bounded by sources x labels.
    queries["rows"] = scan(data_urls, ["kind", "source", "label"]).group_by("kind", "source", "label").agg(
        pl.len().alias("n"))
    if reject_urls:
        queries["rejected_by_source"] = (
            scan(reject_urls, ["source", "reason"]).group_by("source", "reason").agg(pl.len().alias("n"))
            .sort("source", "reason")
        )
        # What each rule removed, by example: the first keys and details of every reason.
        queries["reject_examples"] = (
            scan(reject_urls, ["reason", "key", "detail"]).group_by("reason", maintain_order=True)
            .agg(pl.col("key").head(EXAMPLES), pl.col("detail").head(EXAMPLES)).sort("reason")
        )
    if text_urls:
        queries["lengths"] = (
            scan(text_urls, ["kind", "source", "tokens"])
            .select("kind", "source", pl.col("tokens").list.len().alias("length"))
            .filter(pl.col("length").is_not_null()).group_by("kind", "source", "length").agg(pl.len().alias("n"))
            .sort("kind", "source", "length")
        )
        queries["token_counts"] = (
            scan(text_urls, ["tokens"]).select(pl.col("tokens").explode().alias("token"))
            .filter(pl.col("token").is_not_null()).group_by("token").agg(pl.len().alias("n"))
        )
    if image_urls:
        # One pass for all four size histograms, per source: (source, column, value) -> rows.
        queries["image_sizes"] = (
            scan(image_urls, ["source", *IMAGE_SIZE_COLUMNS])
            .unpivot(index="source", on=list(IMAGE_SIZE_COLUMNS), variable_name="column", value_name="value")
            .filter(pl.col("value").is_not_null())
            .group_by("source", "column", "value").agg(pl.len().alias("n"))
        )
        # 64-bit hashes of the hex digests: the same count (collisions ~ n^2/2^65), an eighth of the memory.
        queries["unique_images"] = scan(image_urls, ["image_sha256"]).select(
            pl.col("image_sha256").hash().n_unique().alias("n")
        )
    return queries


def _row_figures(results: dict[str, pl.DataFrame]) -> dict[str, Any]:
    """Rows per kind and source, rejects per source and reason, label counts."""
    row_counts = results["rows"]
    per_source = row_counts.group_by("kind", "source").agg(pl.col("n").sum().alias("rows")).sort("kind", "source")
    figures: dict[str, Any] = {
        "rows": {kind: int(per_source.filter(pl.col("kind") == kind)["rows"].sum()) for kind in KINDS},
        "rows_by_source": per_source.to_dicts(),
        "rejected_by_source": results["rejected_by_source"].to_dicts() if "rejected_by_source" in results else [],
    }
    rejected: dict[str, int] = {}
    for row in figures["rejected_by_source"]:
        rejected[row["reason"]] = rejected.get(row["reason"], 0) + row["n"]
    figures["rejected"] = dict(sorted(rejected.items(), key=lambda item: (-item[1], item[0])))
    examples = results["reject_examples"].to_dicts() if "reject_examples" in results else []
    figures["reject_examples"] = [
        {"reason": row["reason"], "rows": rejected.get(row["reason"], 0), "meaning": REJECT_REASONS.get(
            row["reason"], "HTTP status" if row["reason"].startswith("http_") else ""),
         "examples": "; ".join(f"{key}: {detail}" if detail else key for key, detail in zip(row["key"], row["detail"]))}
        for row in sorted(examples, key=lambda row: (-rejected.get(row["reason"], 0), row["reason"]))]
    figures["labels"] = (
        row_counts.filter(pl.col("label").is_not_null()).group_by("kind", "label").agg(pl.col("n").sum())
        .sort(["kind", "n", "label"], descending=[False, True, False]).to_dicts()
    )
    return figures


def _token_figures(dataset: Dataset, results: dict[str, pl.DataFrame]) -> dict[str, Any]:
    """Token lengths (overall, per kind, per source), the share cut at max_tokens, coverage."""
    lengths = results["lengths"]
    overall = lengths.group_by("length").agg(pl.col("n").sum()).sort("length")
    tokens = _distribution_from_counts(overall["length"].to_list(), overall["n"].to_list())
    by_kind = {}
    for kind in ("paired", "text"):
        part = lengths.filter(pl.col("kind") == kind).group_by("length").agg(pl.col("n").sum())
        if part.height:
            by_kind[kind] = _distribution_from_counts(part["length"].to_list(), part["n"].to_list())
    by_source = {source: _distribution_from_counts(part["length"].to_list(), part["n"].to_list())
                 for (source,), part in lengths.group_by("source", maintain_order=True)}
    max_tokens = dataset.max_tokens
    if max_tokens and tokens["count"]:
        at_cap = int(overall.filter(pl.col("length") >= max_tokens)["n"].sum())
        tokens["max_tokens"] = max_tokens
        tokens["truncated_share"] = round(at_cap / tokens["count"], 4)
    return {"tokens": tokens, "tokens_by_kind": by_kind, "tokens_by_source": by_source,
            "token_length_histogram": {"values": overall["length"].to_list(), "counts": overall["n"].to_list()},
            "tokenizer": _tokenizer_coverage(dataset, results["token_counts"])}


def _image_figures(results: dict[str, pl.DataFrame], image_urls: list[str], rows: dict[str, int]) -> dict[str, Any]:
    """Image and original sizes (overall and per source), bytes per image, repeated images."""
    image: dict[str, Any] = {}
    histograms: dict[str, Any] = {}
    by_source: dict[str, dict[str, Any]] = {}
    sizes = results["image_sizes"]
    for column in IMAGE_SIZE_COLUMNS:
        per_source = sizes.filter(pl.col("column") == column).drop("column").rename({"value": column})
        overall = per_source.group_by(column).agg(pl.col("n").sum()).sort(column)
        histogram = _as_histogram(overall)
        image[column] = _distribution_from_counts(histogram["values"], histogram["counts"])
        if column != "original_height":
            histograms[column] = histogram
        for (source,), part in per_source.sort("source", column).group_by("source", maintain_order=True):
            by_source.setdefault(source, {})[column] = _distribution_from_counts(
                part[column].to_list(), part["n"].to_list())
    total, count = 0, 0
    for url in image_urls:  # bytes per image from the Parquet footers, not the image column
        column_total, column_rows = column_bytes(url, "image")
        total, count = total + column_total, count + column_rows
    # Parquet stores a 4-byte length before each binary value.
    image["bytes_per_image_mean"] = round((total - 4 * count) / count, 1) if count else None
    image["same_image_in_several_rows"] = int(rows["paired"] + rows["image"] - results["unique_images"].item())
    return {"image": image, "image_size_histogram": histograms, "image_by_source": by_source}


def _tokenizer_coverage(dataset: Dataset, token_counts: pl.DataFrame) -> Optional[dict[str, Any]]:
    model = dataset.tokenizer_model()
    if not model:
        return None
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    entry = dataset.manifest.tokenizer
    unk = entry.special_ids.get("unk", processor.unk_id()) if entry else processor.unk_id()
    total = int(token_counts["n"].sum())
    unknown = int(token_counts.filter(pl.col("token") == unk)["n"].sum())
    top = token_counts.sort(["n", "token"], descending=[True, False]).head(TOP_TOKENS)
    vocab_size = processor.get_piece_size()

    def describe(token: int, count: int) -> dict[str, Any]:
        if not 0 <= token < vocab_size:  # `mmae validate` reports these; stats just shows them
            return {"id": token, "piece": "<out of range>", "text": "", "count": count}
        return {"id": token, "piece": processor.id_to_piece(token), "text": processor.decode([token]), "count": count}

    return {
        "vocab_size": vocab_size,
        "tokens": int(total),
        "unknown_share": round(unknown / total, 6) if total else 0.0,
        "top": [describe(int(token), int(count)) for token, count in zip(top["token"].to_list(), top["n"].to_list())],
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
                {"kind": kind, **values} for kind, values in stats["tokens_by_kind"].items()] + [
                {"kind": f"source {source}", **values} for source, values in stats["tokens_by_source"].items()])
        if stats["image"]:
            table("image sizes (px)", [{"source": "all", "column": column, **stats["image"][column]}
                                       for column in IMAGE_SIZE_COLUMNS] + [
                {"source": source, "column": column, **values}
                for source, columns in stats["image_by_source"].items() for column, values in columns.items()])
            print(f"mean bytes per image: {stats['image']['bytes_per_image_mean']}; "
                  f"rows sharing an image with another row: {stats['image']['same_image_in_several_rows']}")
        table("shards", stats["shards"])
        table("labels", stats["labels"])
        if stats["tokenizer"]:
            coverage = stats["tokenizer"]
            print(f"\ntokenizer: vocab {coverage['vocab_size']}, {coverage['tokens']} tokens, "
                  f"unknown {coverage['unknown_share']:.4%}")
            table("top tokens", coverage["top"])
