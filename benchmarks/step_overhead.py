"""Host work of one training step: Python calls and host milliseconds, at growing batch sizes.

    .venv/bin/python benchmarks/step_overhead.py [--batches 64 256 1024] [--steps 6]

What a GPU waits on is the host's share of the step: Python in the training process between
kernel launches. This runs `Trainer.train_step` (forward, backward, clipping, AdamW, the step's
bookkeeping) on the `tiny` preset, so the arithmetic is small and what remains is the step's own
overhead, on mixed batches like training's: 128 px images with 8 px patches (256 patches, as
224-256 px images with 16 px patches), captions and texts of up to 32 tokens, half paired,
a quarter images, a quarter texts. Batches are collated before the clock starts, as DataLoader
workers do in another process.

- calls/step: Python function calls (cProfile) per step, warm-up steps excluded;
- host ms/step: wall time of a profiled step minus the time its outermost torch operators
  cover (`torch.profiler` events), median over steps: Python, allocation and frees between
  operators; wall ms is measured on unprofiled steps.
A flat row (calls at batch 1024 about those at 64) means no per-sample Python on the hot path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 512


def make_dataset(root: Path, rows: int, side: int) -> None:
    from mmae.pipelines.shards import write_shard
    from PIL import Image

    rng = random.Random(0)
    noise = Image.effect_noise((side, side), 40).convert("RGB")
    entries, counts = [], {}
    for kind, count in (("paired", rows // 2), ("image", rows // 4), ("text", rows // 4)):
        shard = []
        for index in range(count):
            data = None
            if kind != "text":
                buffer = io.BytesIO()
                Image.blend(noise, Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3))),
                            0.6).save(buffer, format="JPEG", quality=85)
                data = buffer.getvalue()
            tokens = [rng.randrange(4, VOCAB) for _ in range(rng.randint(8, 32))] if kind != "image" else None
            shard.append({"id": f"{kind[0]}{index:07d}", "source": kind, "kind": kind, "image": data,
                          "image_format": "jpeg" if data else None, "width": side if data else None,
                          "height": side if data else None, "tokens": tokens})
        entries.append(write_shard(str(root), kind, 0, 1, shard, 256))
        counts[kind] = count
    manifest = {"schema_version": "1", "rows": counts, "shards": entries, "rejects": [], "rejected": 0,
                "tokenizer": {"path": "tokenizer.model", "sha256": "", "vocab_size": VOCAB, "special_ids": {}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _inside_ops(events) -> float:
    """Seconds covered by top-level operator events (the union of their intervals, every thread)."""
    def operator(event) -> bool:
        return event.name.startswith(("aten::", "autograd::"))

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if operator(parent):
                return False
            parent = parent.cpu_parent
        return True

    spans = sorted((event.time_range.start, event.time_range.end) for event in events
                   if operator(event) and outermost(event))
    total, current_start, current_end = 0, None, None
    for start, end in spans:
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total / 1e6


def measure(data: Path, out: Path, batch: int, steps: int, size: int) -> dict:
    import torch
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.parallel import init_distributed
    from mmae.trainer.train import Trainer

    config = TrainConfig(data=str(data), out=str(out), batch_size=batch, num_workers=0, image_size=size,
                         max_text_tokens=32, steps=1000, shuffle_window=256, log_every=1000,
                         optimizer={"lr": 1e-4, "warmup_steps": 1})
    trainer = Trainer(config, init_distributed())
    loader = trainer.loader.steps(steps * 3 + 2)
    batches = [next(loader) for _ in range(steps * 3 + 2)]  # collated before the clock starts
    model = trainer.model
    for micro in batches[:2]:  # warm-up: allocator, lazy inits
        trainer.train_step(model, micro)
    walls = []
    for micro in batches[2:2 + steps]:
        started = time.perf_counter()
        trainer.train_step(model, micro)
        walls.append(time.perf_counter() - started)
    profile = cProfile.Profile()
    profile.enable()
    for micro in batches[2 + steps:2 + 2 * steps]:
        trainer.train_step(model, micro)
    profile.disable()
    calls = pstats.Stats(profile, stream=io.StringIO()).total_calls / steps
    outside = []
    for micro in batches[2 + 2 * steps:]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            trainer.train_step(model, micro)
            profiled_wall = time.perf_counter() - started
        outside.append(max(0.0, profiled_wall - _inside_ops(prof.events())))
    wall = statistics.median(walls)
    host = statistics.median(outside)
    return {"batch": batch, "calls_per_step": round(calls), "wall_ms": wall * 1e3,
            "torch_ops_ms": (wall - host) * 1e3, "host_ms": host * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=128, help="image side (tiny's patches are 8 px)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "ds"
        make_dataset(data, max(args.batches) * 2, args.size)
        results = [measure(data, Path(folder) / f"run{batch}", batch, args.steps, args.size)
                   for batch in args.batches]
    print(f"{'batch':>6} {'calls/step':>11} {'wall ms':>9} {'in torch ops ms':>16} {'host ms':>9}")
    for row in results:
        print(f"{row['batch']:>6} {row['calls_per_step']:>11,} {row['wall_ms']:>9.1f} {row['torch_ops_ms']:>16.1f} "
              f"{row['host_ms']:>9.1f}")
    first, last = results[0], results[-1]
    print(f"calls at batch {last['batch']} / batch {first['batch']}: "
          f"{last['calls_per_step'] / first['calls_per_step']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
