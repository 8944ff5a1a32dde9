"""`mmae embed`: image and text embeddings of a dataset, a folder of images or a text file.

    mmae embed --checkpoint RUN --data build/demo/shards --out emb.parquet [--pool cls|mean]
    mmae embed --checkpoint RUN --images photos/ --out emb.parquet
    mmae embed --checkpoint RUN --texts captions.txt --out emb.parquet

Output: Parquet with `id` (string), `image_embedding` and `text_embedding` (list<float32>,
null where a row has no such part; an image that does not decode is a null too, counted as
`undecodable_images` in the summary and named in a warning), written row group by row group as batches finish: memory
stays flat whatever the input size. Features are the encoder's CLS token of an unmasked,
single-modality forward (`--pool mean`: the mean of the patch or token features). Text files
are tokenised with the checkpoint's tokenizer (an exported folder's `tokenizer.model`, else the
tokenizer of the dataset the run trained on, else `--tokenizer`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mmae.pipelines.localfiles import read_regular_file
from mmae.pipelines.outputs import OutputError, check_output
from .transforms import eval_view

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                    pa.field("image_embedding", pa.list_(pa.float32())),
                    pa.field("text_embedding", pa.list_(pa.float32()))])
log = logging.getLogger("mmae.embed")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MAX_IMAGE_BYTES = 64 << 20  # a larger file in an image folder is counted as undecodable, not read


class EmbedError(RuntimeError):
    """The input cannot be embedded; the message names it."""


def dataset_rows(dataset: str, batch_size: int) -> tuple[int, Iterator[list[dict[str, Any]]]]:
    """(rows, batches of {id, image, tokens}) of a built dataset, one row group at a time."""
    from mmae.schemas.manifest import read_manifest
    from .streams import reading_shard

    manifest = read_manifest(dataset)
    entries = manifest.entries()

    def batches() -> Iterator[list[dict[str, Any]]]:
        pending: list[dict[str, Any]] = []
        for entry in entries:
            with reading_shard(f"{dataset.rstrip('/')}/{entry.path}") as parquet:
                columns = [name for name in ("id", "image", "tokens") if name in parquet.schema_arrow.names]
                for group in range(parquet.num_row_groups):
                    pending += parquet.read_row_group(group, columns=columns).to_pylist()
                    while len(pending) >= batch_size:
                        yield pending[:batch_size]
                        pending = pending[batch_size:]
        if pending:
            yield pending

    return sum(entry.rows for entry in entries), batches()


def image_folder_rows(folder: str, batch_size: int) -> tuple[int, Iterator[list[dict[str, Any]]]]:
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise EmbedError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")

    def batches() -> Iterator[list[dict[str, Any]]]:
        for start in range(0, len(paths), batch_size):
            rows = []
            for path in paths[start:start + batch_size]:
                # Regular files only (a FIFO named a.jpg is never waited on), at most MAX_IMAGE_BYTES.
                try:
                    data, size = read_regular_file(path, MAX_IMAGE_BYTES)
                    problem = f"larger than {MAX_IMAGE_BYTES} bytes" if size > MAX_IMAGE_BYTES else (
                        "zero bytes" if not data else None)
                except OSError as error:
                    data, problem = b"", f"{type(error).__name__}: {error.strerror or error}"
                rows.append({"id": os.path.relpath(path, folder), "image": None if problem else data,
                             "tokens": None, "problem": problem})
            yield rows

    return len(paths), batches()


def text_file_rows(path: str, tokenizer, batch_size: int, max_tokens: int) -> tuple[int, Iterator[list[dict]]]:
    """One row per line ("\n" only: U+2028 inside a caption does not start a new id). Only the
    start of a line that `max_tokens` tokens can use is kept (32 bytes a token is more than any
    tokenizer's pieces), so memory follows the settings, not the longest line."""
    keep = max(4096, 32 * max_tokens)
    if not _regular(path):
        raise EmbedError(f"{path}: not a regular file (a folder, FIFO or device)")

    def lines() -> Iterator[tuple[int, str]]:
        with open(path, "rb") as handle:
            for number, line in enumerate(_bounded_lines(handle, keep), start=1):
                try:
                    yield number, line.decode("utf-8")
                except UnicodeDecodeError as error:
                    if error.start >= len(line) - 3 and len(line) == keep:  # a character cut at `keep`
                        yield number, line[:error.start].decode("utf-8")
                        continue
                    raise EmbedError(f"{path}: line {number} is not UTF-8 ({error.reason} at byte {error.start} "
                                     "of the line)") from None

    with open(path, "rb") as handle:
        count = sum(1 for _ in _bounded_lines(handle, 1))

    def batches() -> Iterator[list[dict[str, Any]]]:
        chunk: list[tuple[int, str]] = []
        for item in lines():
            chunk.append(item)
            if len(chunk) == batch_size:
                yield _text_rows(chunk, tokenizer, max_tokens)
                chunk = []
        if chunk:
            yield _text_rows(chunk, tokenizer, max_tokens)

    return count, batches()


def _text_rows(chunk: list[tuple[int, str]], tokenizer, max_tokens: int) -> list[dict[str, Any]]:
    return [{"id": f"line-{number}", "image": None,
             "tokens": tokenizer.encode(text)[:max_tokens] if text.strip() else None} for number, text in chunk]


def _regular(path: str) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _bounded_lines(handle, keep: int) -> Iterator[bytes]:
    """Each line's first `keep` bytes (without its newline); the rest is skipped in pieces. A
    last line without a newline counts; an empty file has no lines."""
    while True:
        line = handle.readline(keep + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1].removesuffix(b"\r")[:keep]
            continue
        head = line[:keep]
        while line and not line.endswith(b"\n"):  # the rest of a long line
            line = handle.readline(1 << 20)
        yield head.removesuffix(b"\r")


@torch.no_grad()
def embed_rows(model, rows: list[dict[str, Any]], pool: str, undecodable: list[str]) -> pa.Table:
    """One output table: each row's image and text embeddings (null where the row lacks the part,
    or where its image does not decode: that row's id and reason are appended to `undecodable`)."""
    for row in rows:
        if row.get("problem"):
            undecodable.append(f"{row['id']}: {row['problem']}")
    image_rows = [index for index, row in enumerate(rows) if row.get("image")]
    text_rows = [index for index, row in enumerate(rows) if row.get("tokens")]
    image_out: list[Optional[list[float]]] = [None] * len(rows)
    text_out: list[Optional[list[float]]] = [None] * len(rows)
    views, decoded = [], []
    for index in image_rows:
        try:
            views.append(eval_view(rows[index]["image"], model.image_size))
            decoded.append(index)
        except Exception as error:  # noqa: BLE001 - whatever the decoder raised: a null, counted and named
            undecodable.append(f"{rows[index]['id']}: {type(error).__name__}: {str(error)[:120]}")
    if views:
        features = model.encode_images(torch.stack(views), pool=pool).float()
        for index, vector in zip(decoded, features.tolist()):
            image_out[index] = vector
    if text_rows:
        tokens = [torch.tensor(rows[index]["tokens"], dtype=torch.long) for index in text_rows]
        features = model.encode_texts(tokens, pool=pool).float()
        for index, vector in zip(text_rows, features.tolist()):
            text_out[index] = vector
    return pa.table({"id": [row["id"] for row in rows], "image_embedding": image_out, "text_embedding": text_out},
                    schema=SCHEMA)


def embed(checkpoint: str, out: str, data: Optional[str] = None, images: Optional[str] = None,
          texts: Optional[str] = None, pool: str = "cls", batch_size: int = 64,
          tokenizer_path: Optional[str] = None, progress: bool = True, allow_mismatch: bool = False) -> dict[str, Any]:
    from .load import check_matches, load_model
    from tqdm import tqdm

    if sum(value is not None for value in (data, images, texts)) != 1:
        raise EmbedError("give exactly one of --data DATASET, --images FOLDER, --texts FILE")
    try:
        check_output(out, "--out", inputs=[checkpoint, texts or ""], folders=[data or "", images or ""])
    except OutputError as error:
        raise EmbedError(str(error)) from None
    if os.path.isdir(out):
        raise EmbedError(f"--out {out} is a folder; it names the Parquet file to write")
    model, state = load_model(checkpoint)
    if data is not None:
        check_matches(state, str(checkpoint), data, allow=allow_mismatch)
        total, batches = dataset_rows(data, batch_size)
    elif images is not None:
        total, batches = image_folder_rows(images, batch_size)
    else:
        tokenizer = checkpoint_tokenizer(checkpoint, state, tokenizer_path)
        total, batches = text_file_rows(texts, tokenizer, batch_size, model.max_text_tokens)
    temporary = f"{out}.tmp-{os.getpid()}"
    rows = with_image = with_text = 0
    undecodable: list[str] = []
    bar = tqdm(total=total, unit="row", desc="embed", disable=not progress)
    report = _LogProgress(total)  # without a terminal: a log line every 10 s (rows N/M, rate, ETA)
    try:
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            for chunk in batches:
                table = embed_rows(model, chunk, pool, undecodable)
                writer.write_table(table)
                rows += table.num_rows
                with_image += table.num_rows - table.column("image_embedding").null_count
                with_text += table.num_rows - table.column("text_embedding").null_count
                bar.update(table.num_rows)
                if not progress:
                    report.update(rows)
        os.replace(temporary, out)
    finally:
        bar.close()
        if os.path.exists(temporary):
            os.remove(temporary)
    for problem in undecodable[:10]:
        log.warning("image does not decode, its embedding is null: %s", problem)
    return {"out": out, "rows": rows, "image_embeddings": with_image, "text_embeddings": with_text,
            "undecodable_images": len(undecodable), "dim": model.size.dim, "pool": pool}


class _LogProgress:
    def __init__(self, total: int, every_s: float = 10.0) -> None:
        import time

        self.total, self.every_s, self.clock = total, every_s, time.perf_counter
        self.started = self.last = self.clock()

    def update(self, rows: int) -> None:
        from .metrics import eta_text

        now = self.clock()
        if now - self.last < self.every_s and rows < self.total:
            return
        self.last = now
        rate = rows / max(now - self.started, 1e-9)
        eta = eta_text((self.total - rows) / rate) if rate > 0 else "?"
        log.info("embed: rows %d/%d, %.0f rows/s, ETA %s", rows, self.total, rate, eta)


def checkpoint_tokenizer(checkpoint: str, state: dict[str, Any], explicit: Optional[str] = None):
    """The SentencePiece model that goes with a checkpoint."""
    import sentencepiece as spm
    from .reconstruction import load_tokenizer

    candidates = [explicit] if explicit else []
    if os.path.isdir(checkpoint):
        candidates.append(os.path.join(checkpoint, "tokenizer.model"))
    for path in candidates:
        if path and os.path.isfile(path):
            return spm.SentencePieceProcessor(model_file=path)
    from mmae.schemas.manifest import ManifestError

    from .load import trained_on

    dataset = next(iter(trained_on(state)), None)
    try:
        tokenizer = load_tokenizer(dataset) if dataset else None
    except ManifestError:
        tokenizer = None
    if tokenizer is None:
        raise EmbedError(f"no tokenizer for {checkpoint}: pass --tokenizer PATH/tokenizer.model (the dataset's)")
    return tokenizer
