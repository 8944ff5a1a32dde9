"""The self-contained HTML report of `mmae stats --html`: tables, histograms, a sample gallery.

Everything is inlined (charts as PNG data URIs, sampled images as their stored bytes), so the
file can be mailed or opened from an object store. Gallery captions are decoded from the stored
*tokens* with the dataset's own tokenizer; where that differs from the stored caption the card
is flagged, so a tokenizer bug is visible at a glance. A small script records on <body> how
many images rendered (data-images-loaded / data-images-total) for headless checks.
"""

from __future__ import annotations

import base64
import html
import io
import random
from typing import Any, Optional

import fsspec
import pyarrow.parquet as pq
from .dataset import Dataset

GALLERY_COLUMNS = ["id", "kind", "source", "caption", "tokens", "image", "image_format", "width", "height", "label"]
MIME = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


def sample_rows(dataset: Dataset, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` rows spread over kinds, reading only the row groups that hold them."""
    rng = random.Random(seed)
    kinds = [kind for kind in ("paired", "image", "text") if dataset.manifest.rows.get(kind)]
    if not kinds or count <= 0:
        return []
    per_kind = {kind: count // len(kinds) + (1 if index < count % len(kinds) else 0) for index, kind in enumerate(kinds)}
    samples = []
    for kind in kinds:
        entries = [entry for entry in dataset.manifest.entries(kind) if entry.rows]
        total = sum(entry.rows for entry in entries)
        positions = sorted(rng.sample(range(total), min(per_kind[kind], total)))
        offset = 0
        for entry in entries:
            wanted = [p - offset for p in positions if offset <= p < offset + entry.rows]
            offset += entry.rows
            if not wanted:
                continue
            with fsspec.open(dataset.url(entry.path), "rb") as handle, pq.ParquetFile(handle) as parquet:
                columns = [name for name in GALLERY_COLUMNS if name in parquet.schema_arrow.names]
                start = 0
                for group in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    inside = [w - start for w in wanted if start <= w < start + size]
                    if inside:
                        rows = parquet.read_row_group(group, columns=columns).to_pylist()
                        samples.extend(rows[i] for i in inside)
                    start += size
    return samples


def _figure_png(draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.2, 3.0), dpi=100)
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _charts(stats: dict[str, Any]) -> list[tuple[str, str]]:
    charts = []
    histogram = stats.get("token_length_histogram")
    if histogram and histogram["values"]:
        def tokens(axes):
            axes.bar(histogram["values"], histogram["counts"], width=1.0, color="#4878cf")
            if stats["tokens"].get("max_tokens"):
                axes.axvline(stats["tokens"]["max_tokens"], color="#d62728", linestyle="--", label="max_tokens")
                axes.legend()
            axes.set_xlabel("tokens per caption/text")
            axes.set_ylabel("rows")
        charts.append(("Token lengths", _figure_png(tokens)))
    sizes = stats.get("image_size_histogram")
    if sizes:
        def image_sizes(axes):
            for name, colour in (("original_width", "#999999"), ("width", "#4878cf"), ("height", "#6acc65")):
                values, counts = sizes[name]["values"], sizes[name]["counts"]
                axes.bar(values, counts, width=max(1.0, (max(values) - min(values)) / 60 if values else 1.0),
                         alpha=0.6, label=name, color=colour)
            axes.set_xlabel("pixels")
            axes.set_ylabel("images")
            axes.legend()
        charts.append(("Image sizes", _figure_png(image_sizes)))
    if stats.get("rejected"):
        def reasons(axes):
            names = list(stats["rejected"])[::-1]
            axes.barh(names, [stats["rejected"][name] for name in names], color="#d62728")
            axes.set_xlabel("rows rejected")
        charts.append(("Reject reasons", _figure_png(reasons)))
    return charts


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class=muted>none</p>"
    header = "".join(f"<th>{html.escape(str(key))}</th>" for key in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if value is None else str(value))}</td>" for value in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _card(row: dict[str, Any], processor) -> str:
    decoded: Optional[str] = None
    if row.get("tokens") is not None and processor is not None:
        decoded = processor.decode(list(row["tokens"]))
    stored = row.get("caption")
    # Tokens cut at max_tokens decode to a prefix of the caption; anything else is a real mismatch.
    truncated = decoded is not None and stored is not None and decoded != stored and stored.startswith(decoded)
    mismatch = decoded is not None and stored is not None and decoded != stored and not truncated
    parts = [f"<div class='card{' mismatch' if mismatch else ''}' data-kind='{html.escape(row['kind'])}'>"]
    if row.get("image"):
        mime = MIME.get((row.get("image_format") or "jpeg").lower(), "image/jpeg")
        data = base64.b64encode(row["image"]).decode()
        parts.append(f"<img src='data:{mime};base64,{data}' width='{row.get('width') or 64}' "
                     f"height='{row.get('height') or 64}' alt='{html.escape(row['id'])}'>")
    else:
        parts.append("<div class='noimage'>text only</div>")
    if decoded is not None:
        cut = " <span class=muted>[cut at max_tokens]</span>" if truncated else ""
        parts.append(f"<p class=caption title='decoded from the stored tokens'>{html.escape(decoded)}{cut}</p>")
    if mismatch:
        parts.append(f"<p class=warn>stored caption differs: {html.escape(stored)}</p>")
    meta = f"{row['kind']} · {row['source']}" + (f" · label {row['label']}" if row.get("label") else "")
    parts.append(f"<p class=meta>{html.escape(meta)}<br><code>{html.escape(row['id'])}</code></p></div>")
    return "".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px} .charts figure{margin:0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;display:block;background:#eee}
.card.mismatch{border-color:#d62728} .warn{color:#d62728} .meta{color:#777} .muted{color:#999}
.noimage{width:128px;height:128px;background:#f6f6f6;color:#999;display:flex;align-items:center;justify-content:center}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', images.length);
  document.body.setAttribute('data-images-loaded', loaded);
});
"""


def render_html(stats: dict[str, Any], samples: list[dict[str, Any]], tokenizer_model: Optional[bytes]) -> str:
    processor = None
    if tokenizer_model:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    rows_table = [{"kind": kind, "rows": count} for kind, count in stats["rows"].items()]
    token_rows = ([{"kind": "all", **stats["tokens"]}] if stats["tokens"] else []) + [
        {"kind": kind, **values} for kind, values in stats.get("tokens_by_kind", {}).items()]
    image_rows = [{"column": name, **values} for name, values in stats["image"].items() if isinstance(values, dict)]
    charts = "".join(
        f"<figure><figcaption>{html.escape(title)}</figcaption><img src='{uri}' alt='{html.escape(title)}'></figure>"
        for title, uri in _charts(stats)
    )
    tokenizer = stats.get("tokenizer")
    sections = [
        f"<h1>mmae dataset report</h1><p><code>{html.escape(stats['dataset'])}</code> · schema v"
        f"{html.escape(str(stats['schema_version']))} · {stats['bytes'] / 1e6:.1f} MB in {len(stats['shards'])} shards"
        f" · duplicate rate {stats['duplicate_rate']:.2%}</p>",
        "<h2>Rows</h2>" + _table(rows_table) + _table(stats["rows_by_source"]),
        "<h2>Rejected</h2>" + _table(stats["rejected_by_source"]),
        "<h2>What each rule removed</h2>" + _table(stats.get("reject_examples", [])),
        "<h2>Charts</h2><div class=charts>" + charts + "</div>",
        "<h2>Token lengths</h2>" + _table(token_rows),
        "<h2>Images</h2>" + _table(image_rows)
        + (f"<p>mean bytes per image: {stats['image'].get('bytes_per_image_mean')}</p>" if stats["image"] else ""),
        "<h2>Labels</h2>" + _table(stats["labels"]),
        "<h2>Tokenizer</h2>" + (
            f"<p>vocab {tokenizer['vocab_size']} · {tokenizer['tokens']} tokens · unknown "
            f"{tokenizer['unknown_share']:.4%}</p>" + _table(tokenizer["top"]) if tokenizer else "<p class=muted>none</p>"),
        "<h2>Shards</h2>" + _table(stats["shards"]),
        f"<h2>Sample gallery ({len(samples)} rows; captions decoded from the stored tokens)</h2>"
        "<div class=gallery>" + "".join(_card(row, processor) for row in samples) + "</div>",
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mmae dataset report</title>"
        f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>"
        + "".join(sections) + "</body></html>"
    )
