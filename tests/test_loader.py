"""The streaming loader: composition, partitioning, shuffling, exact resume, errors, memory."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmae.schemas.config import TrainConfig
from mmae.trainer.loader import MixedLoader, apportion
from mmae.trainer.streams import DataError
from mmae.trainer.transforms import eval_view, random_resized_crop_box, train_view

from tests.datasets import corrupt_row_group, write_dataset

ROOT = Path(__file__).resolve().parent.parent
UNEVEN = {"paired": [37, 5, 90], "image": [23, 41], "text": [11, 2, 60, 9]}  # 132 / 64 / 82 rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("loader") / "ds", UNEVEN, rows_per_group=8)


def config(dataset: Path, **overrides) -> TrainConfig:
    settings = {"data": str(dataset), "batch_size": 10, "num_workers": 0, "image_size": 16,
                "shuffle_window": 16, "seed": 3}
    settings.update(overrides)
    return TrainConfig(**settings)


def take(loader: MixedLoader, steps: int) -> list:
    return list(loader.batches(steps))


def test_apportion_is_exact_and_rotates_ties():
    assert apportion(10, [0.5, 0.25, 0.25], 0) == [5, 3, 2]
    assert apportion(10, [0.5, 0.25, 0.25], 1) == [5, 2, 3]
    assert apportion(7, [1, 0, 1], 0) == [4, 0, 3] and apportion(7, [1, 0, 1], 1)[1] == 0
    for rotation in range(5):
        assert sum(apportion(13, [0.2, 0.3, 0.5], rotation)) == 13


def test_every_batch_has_the_exact_mix(dataset):
    batches = take(MixedLoader(config(dataset)), 20)
    for batch in batches:
        counts = batch.counts()
        assert sum(counts.values()) == 10 and counts["paired"] == 5 and {counts["image"], counts["text"]} == {2, 3}
        # Grouped by kind; images only where the kind has one; packed tokens add up.
        assert batch.kinds.tolist() == sorted(batch.kinds.tolist())
        assert (batch.image_index >= 0).tolist() == [kind != 2 for kind in batch.kinds.tolist()]
        assert batch.images.shape == (counts["paired"] + counts["image"], 16, 16, 3)  # uint8 pixels
        assert batch.inputs().images.shape == (counts["paired"] + counts["image"], 3, 16, 16)
        assert int(batch.token_lengths.sum()) == batch.tokens.numel()
        assert all(length == 0 for length, kind in zip(batch.token_lengths.tolist(), batch.kinds.tolist()) if kind == 1)
        assert all(sample_id[0] == "pit"[kind] for sample_id, kind in zip(batch.ids, batch.kinds.tolist()))
    assert sum(b.counts()["image"] for b in batches) == sum(b.counts()["text"] for b in batches) == 50


def test_padded_tokens_match_packed(dataset):
    batch = take(MixedLoader(config(dataset)), 1)[0]
    padded, mask = batch.padded_tokens()
    assert mask.sum() == batch.tokens.numel()
    assert torch.equal(padded[mask], batch.tokens)


def test_zero_share_kind_is_never_opened(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    for path in (copy / "image").glob("*.parquet"):
        path.unlink()
    loader = MixedLoader(config(copy, mix={"paired": 1, "image": 0, "text": 1}))
    for batch in take(loader, 5):
        assert batch.counts() == {"paired": 5, "image": 0, "text": 5}


def test_source_weights_inside_a_kind(tmp_path):
    root = write_dataset(tmp_path / "ds", {"paired": [40, 40]}, sources={"paired": ["web", "curated"]})
    loader = MixedLoader(config(root, mix={"paired": 1, "image": 0, "text": 0},
                                source_weights={"web": 1, "curated": 3}, batch_size=8))
    for batch in take(loader, 6):
        assert batch.sources.count("curated") == 6 and batch.sources.count("web") == 2


def epoch_zero_ids(batches, kind_code: int) -> list[str]:
    return [sample for batch in batches for sample, kind, epoch in
            zip(batch.ids, batch.kinds.tolist(), batch.epochs.tolist()) if kind == kind_code and epoch == 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_two_slots_cover_each_epoch_exactly_once(dataset, workers):
    """Across 2 ranks x 2 slots, each kind's epoch 0 yields every row exactly once."""
    batches = []
    for rank in range(2):
        loader = MixedLoader(config(dataset, num_workers=workers), rank=rank, world_size=2, slots=2)
        batches += take(loader, 40)  # enough for every slot to pass its first epoch of every kind
    for code, kind in enumerate(("paired", "image", "text")):
        seen = epoch_zero_ids(batches, code)
        assert len(seen) == len(set(seen)), f"{kind}: a row came twice in epoch 0"
        assert len(seen) == sum(UNEVEN[kind]), f"{kind}: rows missing from epoch 0"
        assert all(any(epoch > 0 for epoch, k in zip(b.epochs.tolist(), b.kinds.tolist()) if k == code)
                   for b in batches[-1:]), "the run should have reached epoch 1"


def test_kinds_cycle_through_epochs_independently(dataset):
    batches = take(MixedLoader(config(dataset, mix={"paired": 0.2, "image": 0.2, "text": 0.6})), 30)
    last = batches[-1]
    by_kind = {code: max(e for e, k in zip(last.epochs.tolist(), last.kinds.tolist()) if k == code) for code in (0, 2)}
    assert by_kind[2] > by_kind[0]  # 82 text rows at 6/batch cycle faster than 132 paired at 2/batch


def test_shuffling_is_deterministic_and_changes_per_epoch(dataset):
    first = [b.ids for b in take(MixedLoader(config(dataset)), 10)]
    again = [b.ids for b in take(MixedLoader(config(dataset)), 10)]
    other = [b.ids for b in take(MixedLoader(config(dataset, seed=4)), 10)]
    assert first == again and first != other
    loader = MixedLoader(config(dataset, mix={"paired": 1, "image": 0, "text": 0}))
    batches = take(loader, 30)  # 132 rows at 10/batch: epochs 0, 1, 2
    order = {0: [], 1: []}
    for batch in batches:
        for sample, epoch in zip(batch.ids, batch.epochs.tolist()):
            if epoch in order:
                order[epoch].append(sample)
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]


def test_augmentations_are_deterministic_per_sample_and_epoch(dataset):
    # Same partition (2 slots), computed by 2 worker processes or in the main process.
    a = take(MixedLoader(config(dataset, num_workers=2)), 4)
    b = take(MixedLoader(config(dataset, num_workers=0), slots=2), 4)
    for x, y in zip(a, b):
        assert x.ids == y.ids and torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)


@pytest.mark.parametrize("workers_before, workers_after", [(2, 2), (2, 0), (0, 2)])
def test_exact_resume(dataset, workers_before, workers_after):
    uninterrupted = take(MixedLoader(config(dataset, num_workers=workers_before)), 20)
    first = MixedLoader(config(dataset, num_workers=workers_before))
    take(first, 13)
    state = first.state_dict()
    resumed = MixedLoader(config(dataset, num_workers=workers_after))
    resumed.load_state_dict(state)
    rest = take(resumed, 7)
    for expected, got in zip(uninterrupted[13:], rest):
        assert expected.step == got.step and expected.ids == got.ids
        assert torch.equal(expected.images, got.images) and torch.equal(expected.tokens, got.tokens)


def test_resume_with_another_world_size_is_a_clear_error(dataset):
    state = MixedLoader(config(dataset), rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size 2.*same number of processes"):
        MixedLoader(config(dataset), rank=0, world_size=1).load_state_dict(state)


def test_missing_and_corrupt_shards(dataset, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    missing = sorted((copy / "text").glob("*.parquet"))[0]
    missing.unlink()
    with pytest.raises(DataError, match=f"{missing.name}: cannot open shard"):
        MixedLoader(config(copy))
    corrupt = sorted((copy / "paired").glob("*.parquet"))[1]
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{corrupt.name}: cannot open shard .*magic bytes"):
        MixedLoader(config(copy))
    loader = MixedLoader(config(copy, data_errors="skip"))
    assert "skipping unreadable shard" in caplog.text and corrupt.name in caplog.text and missing.name in caplog.text
    paired_rows = sum(stream.total_rows for stream in loader.streams if stream.kind == "paired")
    assert paired_rows == sum(UNEVEN["paired"]) - 5  # the corrupt shard held 5 rows
    assert len(take(loader, 3)) == 3


def test_undecodable_image_names_the_row(tmp_path):
    import json

    from mmae.pipelines.shards import write_shard

    from tests.datasets import row

    root = tmp_path / "ds"
    rows = [row("image", index) for index in range(4)]
    rows[2]["image"] = b"\xff\xd8 not really"
    entry = write_shard(str(root), "image", 0, 1, rows, 8)
    (root / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"image": 4}, "shards": [entry]}))
    loader = MixedLoader(config(root, mix={"paired": 0, "image": 1, "text": 0}, batch_size=4))
    with pytest.raises(DataError, match="row i0000002 .*does not decode"):
        take(loader, 1)


def test_unreadable_row_group_fails_naming_it_or_is_skipped_and_counted(dataset, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = sorted((copy / "paired").glob("*.parquet"))[2]  # 90 rows, 12 row groups
    lost = corrupt_row_group(shard, 3, "tokens")
    assert len(lost) == 8
    with pytest.raises(DataError, match=f"{shard.name}: cannot read row group 3"):
        take(MixedLoader(config(copy)), 40)  # 40 batches x 5 paired rows cover the 132 paired rows
    batches = take(MixedLoader(config(copy, data_errors="skip")), 40)
    seen = {sample for batch in batches for sample in batch.ids}
    assert not seen & lost and len(seen & {f"p{index:07d}" for index in range(132)}) == 132 - 8
    assert all(len(batch.ids) + batch.dropped == 10 for batch in batches)
    assert sum(batch.dropped for batch in batches) >= 8 and "cannot read row group 3" in caplog.text
    # Skipping keeps the plan: two workers over the same single slot yield the same batches.
    with_workers = take(MixedLoader(config(copy, data_errors="skip", num_workers=2), slots=1), 40)
    assert [batch.ids for batch in with_workers] == [batch.ids for batch in batches]


def test_undecodable_image_is_skipped_and_counted_with_skip(tmp_path):
    import json

    from mmae.pipelines.shards import write_shard

    from tests.datasets import row

    root = tmp_path / "ds"
    rows = [row("image", index) for index in range(4)]
    rows[2]["image"] = b"\xff\xd8 not really"
    entry = write_shard(str(root), "image", 0, 1, rows, 8)
    (root / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"image": 4}, "shards": [entry]}))
    loader = MixedLoader(config(root, mix={"paired": 0, "image": 1, "text": 0}, batch_size=4, data_errors="skip"))
    batch = take(loader, 1)[0]
    assert sorted(batch.ids) == ["i0000000", "i0000001", "i0000003"] and batch.dropped == 1
    assert batch.images.shape[0] == 3 and batch.image_index.tolist() == [0, 1, 2]


def test_transforms():
    from tests.datasets import tiny_jpeg

    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(640, 480, rng)
        area = (right - left) * (bottom - top) / (640 * 480)
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480 and 0.19 <= area <= 1.0
    data = tiny_jpeg(5, side=40)
    view = train_view(data, 24, random.Random(1))
    assert view.shape == (3, 24, 24) and view.dtype == torch.float32
    assert torch.equal(view, train_view(data, 24, random.Random(1)))
    assert torch.equal(eval_view(data, 24), eval_view(data, 24))
    assert -2.2 < float(view.min()) and float(view.max()) < 2.7  # ImageNet-normalised


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.loader import MixedLoader
    dist.init_process_group("gloo", init_method="file://{init}", rank=int(sys.argv[1]), world_size=2)
    rank = dist.get_rank()
    loader = MixedLoader(TrainConfig(data={data!r}, batch_size=6, num_workers=1, image_size=16, shuffle_window=8),
                         rank=rank, world_size=2)
    steps = 0
    ids = []
    for batch in loader.batches(25):
        total = torch.tensor([float(batch.images.float().mean())])
        dist.all_reduce(total)  # every step synchronises, as DDP's gradient all-reduce would
        steps += 1
        ids += batch.ids
    dist.barrier()
    print("rank", rank, "steps", steps, "unique", len(set(ids)))
    dist.destroy_process_group()
    # Leave as the trainer's entry point does: gloo's worker threads can abort interpreter
    # teardown ("terminate called without an active exception", pytorch/pytorch#179291).
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")


def test_ddp_two_processes_on_uneven_shards_do_not_hang(tmp_path):
    root = write_dataset(tmp_path / "ds", {"paired": [50, 3, 17], "image": [9], "text": [40, 1]}, rows_per_group=4)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), init=str(tmp_path / "init"), data=str(root)))
    processes = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-2000:]
        outputs.append(out)
    assert all("steps 25" in out for out in outputs)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.loader import MixedLoader
    loader = MixedLoader(TrainConfig(data=sys.argv[1], batch_size=32, num_workers=0, image_size=16,
                                     shuffle_window=64))
    for batch in loader.batches(300):
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_memory_does_not_grow_with_dataset_size(tmp_path):
    small = write_dataset(tmp_path / "small", {"paired": [400], "image": [200], "text": [400]}, rows_per_group=32)
    large = write_dataset(tmp_path / "large", {"paired": [2000] * 4, "image": [1000] * 4, "text": [2000] * 4},
                          rows_per_group=32)
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT.format(root=str(ROOT)))
    peaks = [int(subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                                check=True).stdout.split()[-1]) for path in (small, large)]
    assert peaks[1] < peaks[0] * 1.1 + 20_000, peaks  # KB: 20x the data, < 10% + 20 MB more memory


def test_reads_through_fsspec(dataset):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            memory.pipe(f"/loader-copy/{path.relative_to(dataset)}", path.read_bytes())
    local = take(MixedLoader(config(dataset)), 3)
    remote = take(MixedLoader(config("memory://loader-copy")), 3)
    assert [b.ids for b in local] == [b.ids for b in remote]
