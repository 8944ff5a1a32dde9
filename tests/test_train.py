"""Model, masking, optimisation, checkpoints, exact resume after a real kill, and DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmae.schemas.config import LossWeightsConfig, MaskingConfig, TrainConfig
from mmae.trainer.checkpoint import Checkpointer
from mmae.trainer.load import load_model
from mmae.trainer.loader import MixedLoader
from mmae.trainer.masking import draw_masks
from mmae.trainer.model import build_model
from mmae.trainer.run_folder import RunFolder
from mmae.trainer.schedule import WarmupCosine, parameter_groups

from tests.datasets import corrupt_row_group, write_dataset

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 100


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = write_dataset(tmp_path_factory.mktemp("train") / "ds",
                         {"paired": [60, 30], "image": [40], "text": [50]}, rows_per_group=16)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer.model", "sha256": "", "vocab_size": VOCAB, "special_ids": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def train_config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    settings = {"data": str(dataset), "out": str(out), "batch_size": 8, "num_workers": 0, "image_size": 16,
                "shuffle_window": 16, "max_text_tokens": 16, "steps": 12, "log_every": 1, "checkpoint_every": 4,
                "model": {"preset": "tiny"}, "optimizer": {"base_lr": 0.01, "warmup_steps": 2}}
    settings.update(overrides)
    return TrainConfig(**settings)


def a_batch(dataset: Path, size: int = 12):
    config = TrainConfig(data=str(dataset), batch_size=size, num_workers=0, image_size=16, max_text_tokens=16)
    return next(MixedLoader(config).batches(1))


def inputs_of(batch):
    return batch.inputs()


def test_packed_and_padded_give_the_same_outputs_and_gradients(dataset):
    batch = a_batch(dataset)
    results = {}
    for layout in ("padded", "packed"):
        torch.manual_seed(0)
        model = build_model("tiny", VOCAB, 16, 16)
        model.set_attention("sdpa", layout)
        output = model(inputs_of(batch), seed=7)
        output.loss.backward()
        results[layout] = (output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    (padded, padded_grads), (packed, packed_grads) = results["padded"], results["packed"]
    assert torch.allclose(padded.loss, packed.loss, atol=1e-6)
    assert padded.counts == packed.counts
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        assert torch.allclose(padded_grads[name], packed_grads[name], atol=1e-5, rtol=1e-4), name


def test_masking_ratios_and_independence_from_batch_position(dataset):
    batch = a_batch(dataset)
    model = build_model("tiny", VOCAB, 16, 16)  # 16 px / 8 px patches = 4 patches
    def masks_of(batch):
        return draw_masks(batch.ids, batch.image_index.tolist(), batch.token_lengths.tolist(), model.num_patches,
                          MaskingConfig(), seed=3)

    masks = masks_of(batch)
    assert masks.image_masked.shape == (int((batch.image_index >= 0).sum()), 4)
    assert masks.image_masked.sum(dim=1).tolist() == [3] * len(masks.image_masked)  # 75% of 4 patches
    rows = torch.split(masks.text_masked, batch.token_lengths.tolist())
    for length, row in zip(batch.token_lengths.tolist(), rows):
        assert int(row.sum()) == (max(1, round(length * 0.75)) if length else 0)
    reordered = batch.select(list(reversed(range(len(batch.ids)))))
    again = masks_of(reordered)
    assert torch.equal(again.image_masked, masks.image_masked.flip(0))  # image rows reverse with the samples
    for original, moved in zip(rows, reversed(torch.split(again.text_masked, reordered.token_lengths.tolist()))):
        assert torch.equal(original, moved)


def test_losses_by_kind(dataset):
    batch = a_batch(dataset)
    model = build_model("tiny", VOCAB, 16, 16)
    images_only = batch.select([i for i, kind in enumerate(batch.kinds.tolist()) if kind == 1])
    texts_only = batch.select([i for i, kind in enumerate(batch.kinds.tolist()) if kind == 2])
    out = model(inputs_of(images_only), seed=1)
    assert out.counts["paired_text"] == out.counts["unpaired_text"] == 0 and out.image_loss > 0
    out = model(inputs_of(texts_only), seed=1)
    assert out.counts["image"] == 0 and out.counts["paired_text"] == 0 and out.unpaired_text_loss > 0
    zero_text = model(inputs_of(batch), seed=1, weights=LossWeightsConfig(text=0.0, unpaired_text=0.0))
    assert torch.allclose(zero_text.loss, zero_text.image_loss)


def test_no_weight_decay_on_norms_biases_embeddings_and_special_tokens():
    model = build_model("tiny", VOCAB, 16, 16)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "image_mask_token", "text_mask_token", "token_embed.weight", "type_embed.weight",
            "norm.weight", "patch_embed.bias"} <= no_decay_names
    assert "patch_embed.weight" in {names[id(p)] for p in decay["params"]} and no_decay["weight_decay"] == 0.0


def test_warmup_cosine():
    schedule = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55) and schedule(110) == pytest.approx(0.1)


def train_command(dataset: Path, out: Path, *extra: str) -> list[str]:
    sets = {"train.data": dataset, "train.out": out, "train.batch_size": 8, "train.num_workers": 1,
            "train.image_size": 16, "train.shuffle_window": 16, "train.max_text_tokens": 16, "train.steps": 12,
            "train.log_every": 1, "train.checkpoint_every": 4, "train.optimizer.base_lr": 0.01,
            "train.optimizer.warmup_steps": 2}
    args = [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "mmae.trainer", "--config", str(ROOT / "pipeline.yaml"), *args, *extra]


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_killed_run_resumes_with_exactly_the_same_losses(dataset, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_command(dataset, straight), check=True, capture_output=True, timeout=300)
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 13))
    assert (straight / "config.yaml").exists() and (straight / "checkpoints" / "last").read_text().strip() == \
        "step-0000012.pt"

    killed = tmp_path / "killed"
    # SIGKILL right after step 8 (and its checkpoint): a crash at a known point, not a race.
    crash = subprocess.run(train_command(dataset, killed), capture_output=True, timeout=300,
                           env={**os.environ, "MMAE_FAULT": "kill@8"})
    assert crash.returncode == -signal.SIGKILL
    assert max(losses(killed)) == 8
    assert not (killed / "checkpoints" / "step-0000012.pt").exists()
    result = subprocess.run(train_command(dataset, killed), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    assert losses(killed) == expected  # bit for bit, every step, no duplicate lines


def test_truncated_checkpoint_falls_back_to_the_previous(dataset, tmp_path, caplog):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), check=True, capture_output=True,
                   timeout=300)
    last = run / "checkpoints" / "step-0000008.pt"
    last.write_bytes(last.read_bytes()[:1000])
    found = Checkpointer(RunFolder(str(run))).load_latest()
    assert found is not None and Path(found[0]).name == "step-0000004.pt" and found[1]["step"] == 4
    assert "step-0000008.pt is unreadable" in caplog.text
    # The same command then resumes from step 4 and finishes.
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "at step 4" in result.stderr


def test_checkpoints_keep_last_k_and_load_weights_only(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.keep_checkpoints=2"), check=True,
                   capture_output=True, timeout=300)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-0000008.pt", "step-0000012.pt"]
    model, state = load_model(run / "checkpoints" / "step-0000012.pt")
    assert state["step"] == 12 and set(state) >= {"model", "optimizer", "scheduler", "loader", "rng", "config"}
    features = model.encode_images(torch.zeros(2, 3, 16, 16))
    assert features.shape == (2, 64)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]) >= {"step", "loss", "image_loss", "text_loss", "unpaired_text_loss", "lr", "grad_norm",
                                "samples_per_s", "tokens_per_s", "backend"}
    assert metrics[-1]["backend"] == "sdpa/packed"  # auto on CPU
    assert metrics[-1]["seen_paired"] + metrics[-1]["seen_image"] + metrics[-1]["seen_text"] == 8


def test_loss_goes_down(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=40", "--set", "train.optimizer.base_lr=0.1"),
                   check=True, capture_output=True, timeout=300)
    values = losses(run)
    first, last = sum(values[s] for s in range(1, 6)) / 5, sum(values[s] for s in range(36, 41)) / 5
    assert last < first * 0.9


DDP_STEP = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.loader import MixedLoader
    from mmae.trainer.parallel import Distributed, parallelize
    from mmae.trainer.train import Trainer
    world = int(sys.argv[1]); rank = int(sys.argv[2]) if world > 1 else 0; parallel = sys.argv[3]
    if world > 1:
        dist.init_process_group("gloo", init_method="file://{init}", rank=rank, world_size=world)
    config = TrainConfig(data={data!r}, out={out!r}, batch_size=8, num_workers=0, image_size=16, max_text_tokens=16,
                         steps=3, optimizer={{"lr": 0.01, "warmup_steps": 0}}, parallel=parallel)
    trainer = Trainer(config, Distributed(rank, world, 0))
    model = parallelize(trainer.model, Distributed(rank, world, 0), config)
    trainer.optimizer.step = lambda: None  # keep the gradients of the step to compare them
    source = MixedLoader(config)  # rank 0 of one process: the same global batch of 8 everywhere
    batch = next(source.batches(1))
    half = list(range(rank * 8 // world, (rank + 1) * 8 // world))
    result = trainer.train_step(model, [batch.select(half)])
    figures = result.read(Distributed(rank, world, 0))  # a collective: every rank reads
    if rank == 0:
        grads = {{name: p.grad.detach() for name, p in trainer.model.named_parameters() if p.grad is not None}}
    else:
        grads = {{}}
    if parallel == "fsdp" and world > 1:  # sharded gradients: every rank takes part in gathering them
        grads = {{name: p.grad.full_tensor() for name, p in trainer.model.named_parameters() if p.grad is not None}}
    if rank == 0:  # the reported loss is the global batch's, whatever the number of processes
        grads["reported loss"] = torch.tensor([figures["loss"], figures["image_loss"], figures["text_loss"]])
        torch.save(grads, {result!r} + str(world))
    if world > 1:
        dist.destroy_process_group()
    # Leave as the trainer's entry point does: gloo's worker threads can abort interpreter
    # teardown ("terminate called without an active exception", pytorch/pytorch#179291).
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_same_global_batch(dataset, tmp_path, parallel):
    script = tmp_path / "step.py"
    script.write_text(DDP_STEP.format(root=str(ROOT), init=str(tmp_path / "init"), data=str(dataset),
                                      out=str(tmp_path / "out"), result=str(tmp_path / "params-")))
    subprocess.run([sys.executable, str(script), "1", "0", parallel], check=True, capture_output=True, timeout=300)
    processes = [subprocess.Popen([sys.executable, str(script), "2", str(rank), parallel], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    single = torch.load(tmp_path / "params-1", weights_only=True)
    double = torch.load(tmp_path / "params-2", weights_only=True)
    assert single.keys() == double.keys() and len(single) > 20
    for name in single:  # the averaged gradient == the one-process gradient of the whole batch
        assert torch.allclose(single[name], double[name], atol=1e-6, rtol=1e-4), name
    assert max(float(g.abs().max()) for g in single.values()) > 1e-3


def test_mmae_train_nproc_2_runs_ddp(dataset, tmp_path):
    run = tmp_path / "run"
    sets = train_command(dataset, run, "--set", "train.steps=4")[5:]
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "train", "--config", str(ROOT / "pipeline.yaml"),
                             "--nproc", "2", *sets], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["samples_per_s"] > 0
    assert all(m["seen_paired"] + m["seen_image"] + m["seen_text"] == 16 for m in metrics)  # 2 ranks x 8
    assert [json.loads(line) for line in result.stdout.splitlines()] == [metrics[-1]]  # one summary, rank 0's


@pytest.mark.slow
def test_fsdp_run_checkpoints_full_weights_and_resumes_exactly(dataset, tmp_path):
    def train(run: Path, steps: int) -> subprocess.CompletedProcess:
        sets = train_command(dataset, run, "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=2",
                             "--set", "train.parallel=fsdp")[5:]
        return subprocess.run([sys.executable, "-m", "mmae.cli", "train", "--config", str(ROOT / "pipeline.yaml"),
                               "--nproc", "2", *sets], capture_output=True, text=True, timeout=300, cwd=ROOT)

    whole, split = tmp_path / "whole", tmp_path / "split"
    result = train(whole, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train(split, 2).returncode == 0
    result = train(split, 4)  # the same command with more steps resumes from step 2
    assert result.returncode == 0 and "at step 2" in result.stderr, result.stderr[-3000:]
    assert losses(split) == losses(whole) and sorted(losses(whole)) == [1, 2, 3, 4]
    model, state = load_model(whole / "checkpoints" / "step-0000004.pt")  # full weights, loadable anywhere
    assert state["parallel"] == "fsdp" and model.encode_images(torch.zeros(1, 3, 16, 16)).shape == (1, 64)
    single = subprocess.run(train_command(dataset, whole, "--set", "train.steps=6"), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 2 and "train.parallel: 'fsdp' -> 'ddp'" in single.stderr


def tensorboard_events(folder: Path) -> dict:
    """tag -> [(step, value)] of every scalar, and the image and hparams tags, over all event files."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(folder))
    multiplexer.Reload()
    found = {"scalars": {}, "images": set(), "hparams": False}
    for run, tags in multiplexer.Runs().items():
        accumulator = multiplexer.GetAccumulator(run)
        for tag in tags.get("scalars", []):
            found["scalars"].setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
        found["images"] |= set(tags.get("images", []))
        found["hparams"] |= any("hparams" in plugin for plugin in accumulator.PluginTagToContent("hparams") or {}) or \
            bool(accumulator.PluginTagToContent("hparams"))
    return found


def test_validation_on_held_out_rows_tensorboard_images_hparams_one_stream_across_resumes(dataset, tmp_path):
    sets = ["--set", "train.validation.holdout=0.2", "--set", "train.validation.every=4", "--set",
            "train.validation.batches=2", "--set", "train.tensorboard=true"]
    # Held-out rows are never trained on, and every row is on exactly one side.
    config = train_config(dataset, tmp_path / "unused", validation={"holdout": 0.2})
    train_ids = {sample for batch in MixedLoader(config).batches(40) for sample in batch.ids}
    validation = MixedLoader(config, train=False, split="validation")
    held_ids = {sample for batch in validation.batches(10) for sample in batch.ids}
    assert held_ids and train_ids and not train_ids & held_ids
    whole = MixedLoader(train_config(dataset, tmp_path / "unused"))
    assert sum(s.total_rows for s in whole.streams) == sum(s.total_rows for s in MixedLoader(config).streams) + \
        sum(s.total_rows for s in validation.streams)

    straight = tmp_path / "straight"
    subprocess.run(train_command(dataset, straight, *sets), check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    checks = [record for record in records if record["split"] == "validation"]
    assert [record["step"] for record in checks] == [4, 8, 12]
    assert all(record["loss"] > 0 and record["samples"] == 16 for record in checks)
    assert checks[0]["loss"] != checks[-1]["loss"]  # the same batches and masks, a model that changed

    # Killed after step 10, resumed from step 8: the same validation figures, and TensorBoard shows
    # one stream (the killed run's events after step 8 are purged, none twice).
    run = tmp_path / "run"
    crash = subprocess.run(train_command(dataset, run, *sets), capture_output=True, timeout=300,
                           env={**os.environ, "MMAE_FAULT": "kill@10"})
    assert crash.returncode == -signal.SIGKILL
    subprocess.run(train_command(dataset, run, *sets), check=True, capture_output=True, timeout=300)
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in resumed] == [(r["step"], r["split"], r["loss"]) for r in records]
    events = tensorboard_events(run / "tensorboard")
    train_loss = events["scalars"]["train/loss"]
    assert sorted(step for step, _ in train_loss) == list(range(1, 13))  # each step once
    assert [step for step, _ in sorted(events["scalars"]["validation/loss"])] == [4, 8, 12]
    assert "validation/reconstruction" in events["images"]
    assert events["hparams"]


def test_a_validation_set_that_cannot_be_read_stops_the_run_before_it_trains(dataset, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(train_command(dataset, run, "--set", f"train.validation.data={tmp_path / 'nowhere'}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nowhere: no manifest.json" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_tensorboard_needs_the_package_or_says_so(dataset, tmp_path, monkeypatch):
    import builtins

    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer, TrainError

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TrainError, match="pip install tensorboard"):
        Trainer(train_config(dataset, tmp_path / "run", tensorboard=True, steps=1), Distributed()).fit()


def test_a_run_folder_on_object_storage_checkpoints_atomically_and_resumes(dataset, tmp_path, monkeypatch):
    """train.out as an fsspec URL (memory:// here, s3:// or gs:// on a cluster)."""
    import fsspec
    from mmae.trainer.load import load_model
    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer

    memory = fsspec.filesystem("memory")
    straight = Trainer(train_config(dataset, tmp_path / "local", steps=8), Distributed()).fit()
    url = "memory://runs/remote"
    real_save, saves = torch.save, []

    def dies_the_second_time(state, handle, *args, **kwargs):
        saves.append(state["step"])
        if len(saves) == 2:  # the step-8 save dies half-way
            handle.write(b"half a checkpoint")
            raise OSError("the node went away")
        real_save(state, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_the_second_time)
    with pytest.raises(OSError, match="went away"):
        Trainer(train_config(dataset, url, steps=8), Distributed()).fit()
    assert saves == [4, 8] and memory.exists("/runs/remote/config.yaml")
    # Nothing under a checkpoint's name but whole checkpoints, no temporary file, `last` names one.
    names = [path.rsplit("/", 1)[1] for path in memory.ls("/runs/remote/checkpoints", detail=False)]
    assert sorted(names) == ["last", "step-0000004.pt"]
    assert memory.cat("/runs/remote/checkpoints/last").decode().strip() == "step-0000004.pt"
    monkeypatch.setattr(torch, "save", real_save)
    # The same command resumes from the object store and ends where an uninterrupted run ends.
    resumed = Trainer(train_config(dataset, url, steps=8, tensorboard=True), Distributed()).fit()
    assert resumed["loss"] == straight["loss"] and resumed["step"] == 8
    lines = memory.cat("/runs/remote/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    assert any("tfevents" in path for path in memory.find("/runs/remote/tensorboard"))  # copied up
    model, state = load_model(url)  # eval reads from there too
    assert state["step"] == 8


def test_gradient_accumulation_equals_one_big_batch(dataset, tmp_path):
    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer

    grads = {}
    for accum in (1, 2):
        config = train_config(dataset, tmp_path / f"run{accum}", grad_accum=accum, optimizer={"lr": 0.01})
        trainer = Trainer(config, Distributed())
        trainer.optimizer.step = lambda: None  # keep the step's gradients
        batch = next(MixedLoader(config.model_copy(update={"batch_size": 8})).batches(1))
        parts = [batch] if accum == 1 else [batch.select(list(range(4))), batch.select(list(range(4, 8)))]
        trainer.train_step(trainer.model, parts)
        grads[accum] = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[2].keys()
    for name in grads[1]:
        assert torch.allclose(grads[1][name], grads[2][name], atol=1e-6, rtol=1e-4), name


def test_unreadable_data_is_skipped_and_counted_in_metrics(dataset, tmp_path):
    import shutil

    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    for shard in sorted((copy / "paired").glob("*.parquet")):
        corrupt_row_group(shard, 0, "tokens")  # 32 of the 90 paired rows become unreadable
    last = Trainer(train_config(copy, tmp_path / "run", steps=12, data_errors="skip"), Distributed()).fit()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert last["step"] == 12 and sum(m["skipped_samples"] for m in metrics) > 0
    assert all(m["seen_paired"] + m["seen_image"] + m["seen_text"] + m["skipped_samples"] == 8 for m in metrics)


# --- divergence and damaged checkpoints ---------------------------------------------------------


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_diverging_run_stops_naming_the_step_and_never_saves_non_finite_weights(dataset, tmp_path, mode):
    run = tmp_path / "run"
    result = subprocess.run(train_command(dataset, run, "--set", "train.optimizer.base_lr=1e6",
                                          "--set", "train.optimizer.warmup_steps=0", "--set", "train.checkpoint_every=1",
                                          "--set", f"train.on_nonfinite={mode}", "--set", "train.max_skipped_steps=2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "step " in result.stderr and "the run stopped without applying it" in result.stderr
    if mode == "skip":
        assert "(3 non-finite steps)" in result.stderr
    for path in (run / "checkpoints").glob("step-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(tensor).all() for tensor in state["model"].values()), path
    metrics = strict_json_lines(run / "metrics.jsonl")
    assert metrics and all(row["loss"] is None or row["loss"] == row["loss"] for row in metrics)


def test_when_no_checkpoint_loads_the_run_stops_and_deletes_nothing(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), check=True, capture_output=True, timeout=300)
    for path in (run / "checkpoints").glob("step-*.pt"):
        path.write_bytes(b"damaged")
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=12"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "none can be loaded" in result.stderr and "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_rotation_counts_only_readable_checkpoints_and_cleans_killed_saves(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8", "--set", "train.keep_checkpoints=2"),
                   check=True, capture_output=True, timeout=300)
    folder = run / "checkpoints"
    (folder / "step-0000100.pt").write_bytes(b"a damaged file with a higher step")
    (folder / ".tmp-999999-step-0000012.pt").write_bytes(b"left by a save that was killed")
    result = subprocess.run(train_command(dataset, run, "--set", "train.keep_checkpoints=2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["last", "step-0000008.pt", "step-0000012.pt", "step-0000100.pt"]
    assert (folder / (folder / "last").read_text().strip()).exists()


def test_the_default_learning_rate_learns_and_long_warmups_are_named(dataset, tmp_path):
    assert TrainConfig().optimizer.base_lr == 1.5e-3  # the one source; recipes do not repeat it
    for recipe in (ROOT / "configs").glob("*.yaml"):
        assert "base_lr:" not in recipe.read_text(), recipe
    run = tmp_path / "run"
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=3", "--set",
                                          "train.optimizer.warmup_steps=5"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "covers the whole run" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_and_the_same_command_resumes_exactly(dataset, tmp_path, signum, code):
    straight = tmp_path / "straight"
    subprocess.run(train_command(dataset, straight, "--set", "train.checkpoint_every=100"), check=True,
                   capture_output=True, timeout=300)
    run = tmp_path / "run"
    command = train_command(dataset, run, "--set", "train.checkpoint_every=100")
    # The signal arrives during step 4 (sent right after step 3), to the whole process group as a
    # terminal or SLURM sends it (DataLoader workers too).
    name = {signal.SIGTERM: "term", signal.SIGINT: "int"}[signum]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "MMAE_FAULT": f"{name}@3"})
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and "ConnectionResetError" not in stderr
    stopped_at = max(losses(run))
    assert stopped_at == 4 and (run / "checkpoints" / f"step-{stopped_at:07d}.pt").exists()
    assert f"after step {stopped_at}" in stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"at step {stopped_at}" in result.stderr
    assert losses(run) == losses(straight)  # bit for bit on CPU


def test_settings_that_may_change_on_resume_apply_and_are_recorded(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run), check=True, capture_output=True, timeout=300)  # 12 steps
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=16", "--set",
                                          "train.optimizer.base_lr=0.02"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = {row["step"]: row for row in strict_json_lines(run / "metrics.jsonl")}
    assert max(metrics) == 16
    lr = 0.02 * 8 / 256  # base_lr x global batch / 256
    assert metrics[13]["lr"] == pytest.approx(lr * WarmupCosine(2, 16, 0.0)(13))  # the new schedule from step 12 on
    history = strict_json_lines(run / "config-history.jsonl")
    assert history == [{"step": 12, "changed": {"train.optimizer.base_lr": [0.01, 0.02], "train.steps": [12, 16]}}]
    assert "steps: 16" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("key, value", [("train.batch_size", "16"), ("train.model.preset", "small"),
                                        ("train.masking.image_ratio", "0.5"), ("train.seed", "3")])
def test_settings_that_may_not_change_on_resume_are_named(dataset, tmp_path, key, value):
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=4"), check=True, capture_output=True, timeout=300)
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=8", "--set", f"{key}={value}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and key in result.stderr and "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_resume_from_a_chosen_checkpoint_and_start_from_another_runs_weights(dataset, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_command(dataset, straight), check=True, capture_output=True, timeout=300)
    expected = losses(straight)
    # Resume from step 4 although 8 and 12 exist: the same losses from there on.
    chosen = straight / "checkpoints" / "step-0000004.pt"
    result = subprocess.run(train_command(dataset, straight, "--set", f"train.resume_from={chosen}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "step-0000004.pt at step 4" in result.stderr
    assert losses(straight) == expected
    # A new run from its weights: step 1 of a fresh schedule, starting where the weights were.
    warm = tmp_path / "warm"
    result = subprocess.run(train_command(dataset, warm, "--set", "train.steps=4", "--set",
                                          f"train.init_from={straight / 'checkpoints' / 'step-0000012.pt'}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "initialised the model from" in result.stderr
    warm_losses = losses(warm)
    assert sorted(warm_losses) == [1, 2, 3, 4]
    assert warm_losses[1] < expected[1]  # trained weights start lower than a fresh model


@pytest.mark.slow
def test_two_processes_resume_on_one_with_grad_accum_reading_the_same_samples(dataset, tmp_path):
    def mmae_train(run: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
        sets = train_command(dataset, run, "--set", "train.checkpoint_every=2", "--set", "train.num_workers=0",
                             *extra)[5:]
        return subprocess.run([sys.executable, "-m", "mmae.cli", "train", "--config", str(ROOT / "pipeline.yaml"),
                               "--nproc", str(nproc), *sets], capture_output=True, text=True, timeout=300, cwd=ROOT)

    def by_step(run: Path) -> dict[int, dict]:
        return {row["step"]: row for row in strict_json_lines(run / "metrics.jsonl")}

    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    assert mmae_train(straight, 2, "--set", "train.steps=6").returncode == 0
    assert mmae_train(elastic, 2, "--set", "train.steps=2").returncode == 0
    wrong = mmae_train(elastic, 1, "--set", "train.steps=6")
    assert wrong.returncode == 2 and "train.grad_accum=2" in wrong.stderr  # the global batch must stay
    result = mmae_train(elastic, 1, "--set", "train.steps=6", "--set", "train.grad_accum=2")
    assert result.returncode == 0 and "elastic resume: 2 data ranks on 1 process" in result.stderr, result.stderr[-2000:]
    expected, resumed = by_step(straight), by_step(elastic)
    for step in range(3, 7):
        assert resumed[step]["sample_digest"] == expected[step]["sample_digest"]
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4, abs=1e-6)


def test_checkpoint_arguments_take_a_file_last_or_a_run_folder(dataset, tmp_path):
    from mmae.trainer.checkpoint import CheckpointNotFound, resolve_checkpoint

    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), check=True, capture_output=True, timeout=300)
    newest = run / "checkpoints" / "step-0000008.pt"
    for given in (newest, run / "checkpoints" / "last", run / "checkpoints", run):
        assert Path(resolve_checkpoint(given)) == newest
        assert load_model(given)[1]["step"] == 8
    (run / "checkpoints" / "last").write_text("step-0000099.pt\n")  # a stale pointer: the newest readable
    assert Path(resolve_checkpoint(run)) == newest
    with pytest.raises(CheckpointNotFound, match="step-0000099.pt"):
        resolve_checkpoint(run / "checkpoints" / "last")
    with pytest.raises(CheckpointNotFound, match="no readable"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "probe", "--checkpoint", str(tmp_path / "foreign.pt"),
                          "--data", str(dataset)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 2 and "cannot be loaded as a checkpoint" in cli.stderr and "Traceback" not in cli.stderr
