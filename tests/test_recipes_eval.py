"""Recipe switches (MAE baseline, MaskVLM cross masking) and the linear probe."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from mmae.pipelines.shards import write_shard
from mmae.schemas.config import MaskingConfig
from mmae.trainer.batch import Inputs
from mmae.trainer.masking import sample_ratios
from PIL import Image

from tests.datasets import row
from tests.test_train import ROOT, dataset, losses, train_command  # noqa: F401 - fixtures reused


def masking_ratios(inputs: Inputs, masking) -> tuple[list[float], list[float]]:
    ratios = [sample_ratios(sample_id, inputs.has_image(index), int(inputs.token_lengths[index]), masking)
              for index, sample_id in enumerate(inputs.ids)]
    return [image for image, _ in ratios], [text for _, text in ratios]


def test_cross_masking_masks_one_modality_of_each_pair():
    inputs = Inputs(images=torch.zeros(3, 3, 16, 16), image_index=torch.tensor([0, 1, -1, 2]),
                    tokens=torch.arange(12), token_lengths=torch.tensor([3, 3, 3, 3]),
                    ids=["a", "b", "c", "d"])
    image, text = masking_ratios(inputs, MaskingConfig(strategy="cross", image_ratio=0.75, text_ratio=0.5))
    for i in (0, 1, 3):  # paired: exactly one modality masked
        assert sorted([image[i], text[i]]) in ([0.0, 0.75], [0.0, 0.5]) and (image[i] == 0.0) != (text[i] == 0.0)
    assert (image[2], text[2]) == (0.75, 0.5)  # text-only rows keep the normal ratios
    ids = [f"s{n}" for n in range(200)]
    many = Inputs(torch.zeros(200, 3, 16, 16), torch.arange(200), torch.arange(600), torch.full((200,), 3), ids)
    image, _ = masking_ratios(many, MaskingConfig(strategy="cross"))
    assert 60 < sum(ratio > 0 for ratio in image) < 140  # alternates, roughly half each way
    assert masking_ratios(many, MaskingConfig(strategy="independent"))[0] == [0.75] * 200


def test_mae_baseline_drops_text(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "mae"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=3", "--set", "train.use_text=false"),
                   check=True, capture_output=True, timeout=300)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["seen_text"] == 0 and m["text_loss"] == 0 and m["unpaired_text_loss"] == 0 for m in metrics)
    assert all(m["seen_paired"] > 0 and m["image_loss"] > 0 for m in metrics)


def solid(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_linear_probe_separates_what_is_separable(tmp_path):
    """Colour labels on solid images: any features keep colour, so the probe must be near 100%."""
    from mmae.trainer.evaluate import probe
    from mmae.trainer.model import build_model

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for index in range(150):
        name = list(colours)[index % 3]
        shade = tuple(min(255, channel + (index * 7) % 30) for channel in colours[name])
        item = row("image", index)
        item.update(image=solid(shade), label=name)
        rows.append(item)
    root = tmp_path / "ds"
    entry = write_shard(str(root), "image", 0, 1, rows, 32)
    (root / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"image": 150},
                                                    "shards": [entry], "rejects": []}))
    torch.manual_seed(0)
    model = build_model("tiny", 16, 16, 16)
    checkpoint = tmp_path / "random.pt"
    torch.save({"model": model.state_dict(), "step": 0,
                "model_spec": {"preset": "tiny", "vocab_size": 16, "image_size": 16, "max_text_tokens": 16}},
               checkpoint)
    result = probe(str(checkpoint), str(root), epochs=60)
    assert result["classes"] == 3 and result["n_train"] + result["n_test"] == 150
    assert 20 <= result["n_test"] <= 40  # the deterministic 80/20 split
    assert result["top1"] >= 0.9
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "probe", "--checkpoint", str(checkpoint),
                          "--data", str(root), "--json", "--epochs", "60"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout) == result


def labelled_dataset(root, count: int, start: int = 0, labels=("red", "green", "blue")):
    """Images coloured by their label, and text rows whose tokens spell their label."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "grey": (120, 120, 120)}
    images, texts = [], []
    for index in range(start, start + count):
        name = labels[index % len(labels)]
        item = row("image", index)
        item.update(image=solid(tuple(min(255, c + (index * 7) % 30) for c in colours[name])), label=name)
        images.append(item)
        text = row("text", index)
        text.update(tokens=[3 + 2 * list(colours).index(name), 4 + 2 * list(colours).index(name)] * 2, label=name)
        texts.append(text)
    entries = [write_shard(str(root), "image", 0, 1, images, 32), write_shard(str(root), "text", 0, 1, texts, 32)]
    (root / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"image": count, "text": count},
                                                    "shards": entries, "rejects": []}))
    return root


def random_checkpoint(path):
    from mmae.trainer.model import build_model

    torch.manual_seed(0)
    torch.save({"model": build_model("tiny", 16, 16, 16).state_dict(), "step": 0,
                "model_spec": {"preset": "tiny", "vocab_size": 16, "image_size": 16, "max_text_tokens": 16}}, path)
    return path


def test_probe_tests_on_another_dataset_and_probes_texts(tmp_path):
    """--test-data: every labelled row of --data trains, every one of the second dataset tests
    (none of the 80/20 split); --features text probes text-only features of the rows' tokens."""
    from mmae.trainer.evaluate import probe
    from mmae.trainer.streams import DataError

    checkpoint = str(random_checkpoint(tmp_path / "random.pt"))
    train, test = labelled_dataset(tmp_path / "train", 90), labelled_dataset(tmp_path / "test", 30, start=1000)
    images = probe(checkpoint, str(train), epochs=60, test_data=str(test))
    assert (images["n_train"], images["n_test"], images["classes"]) == (90, 30, 3)
    assert images["top1"] >= 0.9
    texts = probe(checkpoint, str(train), epochs=60, test_data=str(test), of="text", pool="mean")
    assert (texts["n_train"], texts["n_test"]) == (90, 30) and texts["top1"] >= 0.9
    alone = probe(checkpoint, str(train), epochs=60, of="text")  # the 80/20 split of the text rows
    assert alone["n_train"] + alone["n_test"] == 90 and alone["n_test"] < 40
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "probe", "--checkpoint", checkpoint, "--data",
                          str(train), "--test-data", str(test), "--features", "text", "--pool", "mean",
                          "--epochs", "60"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"{texts['top1']:.2%}" in cli.stdout and "90 train / 30 test texts" in cli.stdout
    unseen = labelled_dataset(tmp_path / "unseen", 8, labels=("grey", "red"))
    try:
        probe(checkpoint, str(train), epochs=1, test_data=str(unseen))
    except DataError as error:
        assert "'grey' never occur in" in str(error)
    else:
        raise AssertionError("a test label the probe never saw must be an error")


def test_probe_needs_labels(tmp_path):
    """A real checkpoint and a real dataset whose rows have no label: the error is about labels."""
    from mmae.trainer.model import build_model

    rows = [row("image", index) for index in range(12)]
    for item in rows:
        item.update(image=solid((100, 100, 100)), label=None)
    root = tmp_path / "ds"
    entry = write_shard(str(root), "image", 0, 1, rows, 8)
    (root / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"image": 12},
                                                    "shards": [entry], "rejects": []}))
    checkpoint = tmp_path / "random.pt"
    torch.save({"model": build_model("tiny", 16, 16, 16).state_dict(), "step": 0,
                "model_spec": {"preset": "tiny", "vocab_size": 16, "image_size": 16, "max_text_tokens": 16}},
               checkpoint)
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "probe", "--checkpoint", str(checkpoint),
                          "--data", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 2 and "no rows with both an image and a label" in cli.stderr, cli.stderr[-2000:]


STAGES = ["--set", "train.stages=[{name: images, steps: 3, mix: {paired: 0, image: 1, text: 0}}, "
                   "{name: joint, steps: 3, mix: {paired: 0.5, image: 0.25, text: 0.25}}, "
                   "{name: text, steps: 3, mix: {paired: 0.5, image: 0, text: 0.5}, frozen: [patch_embed]}]",
          "--set", "train.checkpoint_every=2", "--set", "train.steps=9"]  # = the stages' sum (another is refused)


@pytest.mark.slow
def test_stages_switch_mix_and_resume_in_the_right_stage(dataset, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    subprocess.run(train_command(dataset, straight, *STAGES), check=True, capture_output=True, timeout=300)
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 10))  # steps = the stages' sum
    assert [m["stage"] for m in metrics] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(m["seen_image"] == 8 and m["seen_text"] == 0 for m in metrics[:3])
    assert all(m["seen_image"] == 0 and m["seen_text"] == 4 for m in metrics[6:])
    # Resume from the step-4 checkpoint (inside stage 1): same losses as the straight run.
    resumed = tmp_path / "resumed"
    subprocess.run(train_command(dataset, resumed, *STAGES, "--set", "train.keep_checkpoints=10"), check=True,
                   capture_output=True, timeout=300)
    checkpoints = resumed / "checkpoints"
    for name in ("step-0000006.pt", "step-0000008.pt", "step-0000009.pt"):
        (checkpoints / name).unlink(missing_ok=True)
    (checkpoints / "last").write_text("step-0000004.pt\n")
    result = subprocess.run(train_command(dataset, resumed, *STAGES), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "at step 4" in result.stderr, result.stderr[-2000:]
    assert losses(resumed) == losses(straight)


def test_per_kind_step_mode_gives_the_packed_update(dataset, tmp_path):  # noqa: F811
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.loader import MixedLoader
    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer

    grads = {}
    for mode in ("packed", "per_kind"):
        config = TrainConfig(data=str(dataset), out=str(tmp_path / mode), batch_size=8, num_workers=0, image_size=16,
                             max_text_tokens=16, step_mode=mode, optimizer={"lr": 0.01})
        trainer = Trainer(config, Distributed())
        trainer.optimizer.step = lambda: None
        batch = next(MixedLoader(config).batches(1))
        trainer.train_step(trainer.model, [batch])
        grads[mode] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    for name in grads["packed"]:
        assert torch.allclose(grads["packed"][name], grads["per_kind"][name], atol=1e-6, rtol=1e-4), name


def test_itc_itm_train_and_retrieval(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "maskvlm"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=4", "--set", "train.masking.strategy=cross",
                                 "--set", "train.loss_weights.itc=1.0", "--set", "train.loss_weights.itm=1.0"),
                   check=True, capture_output=True, timeout=300)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["itc_loss"] > 0 and m["itm_loss"] > 0 for m in metrics)
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "retrieval", "--checkpoint",
                          str(run / "checkpoints" / "step-0000004.pt"), "--data", str(dataset), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    result = json.loads(cli.stdout)
    from mmae.trainer.evaluate import retrieval, split_of

    held_out = [index for index in range(90) if split_of({"id": f"p{index:07d}"}) == "test"]
    assert result["n"] == len(held_out) and result["split"] == "test" and 5 < len(held_out) < 35
    from mmae.trainer.streams import held_out as never_trained

    unseen = retrieval(str(run / "checkpoints" / "step-0000004.pt"), str(dataset), holdout=0.3)
    assert unseen["n"] == sum(never_trained(f"p{index:07d}", 0.3) for index in range(90)) > 5
    # Rows with the same caption (or the same image) are right answers for each other: when every
    # caption is the same, every retrieval is a hit, whatever the model.
    same = tmp_path / "same-caption"
    rows = [row("paired", index) for index in range(40)]
    for item in rows:
        item["tokens"] = [5, 6, 7]
    entry = write_shard(str(same), "paired", 0, 1, rows, 16)
    (same / "manifest.json").write_text(json.dumps({"schema_version": "1", "rows": {"paired": 40},
                                                    "shards": [entry], "rejects": []}))
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "retrieval", "--checkpoint",
                          str(run / "checkpoints" / "step-0000004.pt"), "--data", str(same), "--split", "all",
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    everything = json.loads(cli.stdout)
    assert everything["n"] == 40 and everything["split"] == "all"
    assert everything["image_to_text"] == everything["text_to_image"] == {"r1": 1.0, "r5": 1.0}
    # A checkpoint without ITC says so.
    plain = tmp_path / "plain"
    subprocess.run(train_command(dataset, plain, "--set", "train.steps=1"), check=True, capture_output=True,
                   timeout=300)
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "retrieval", "--checkpoint",
                          str(plain / "checkpoints" / "step-0000001.pt"), "--data", str(dataset)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 2 and "without ITC" in cli.stderr


def test_retrieval_counts_same_image_or_same_caption_as_hits():
    from mmae.trainer.evaluate import relevance

    rows = [{"id": "a", "image_sha256": "x", "tokens": [1, 2]}, {"id": "b", "image_sha256": "x", "tokens": [3]},
            {"id": "c", "image_sha256": "y", "tokens": [1, 2]}, {"id": "d", "image_sha256": "z", "tokens": [4]}]
    assert relevance(rows).tolist() == [[True, True, True, False], [True, True, False, False],
                                        [True, False, True, False], [False, False, False, True]]


GATHER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from mmae.trainer.objectives import gather_rows as _gather, rank_offset as _rank_offset
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{init}", rank=rank, world_size=2)
rows = torch.full((rank + 2, 3), float(rank), requires_grad=True)  # 2 rows on rank 0, 3 on rank 1
gathered = _gather(rows)
assert gathered.shape == (5, 3) and _rank_offset(len(rows)) == (0 if rank == 0 else 2)
gathered.sum().backward()
assert torch.equal(rows.grad, 2 * torch.ones_like(rows))  # both ranks' losses use our rows
print("ok", gathered[:, 0].tolist())
dist.destroy_process_group()
# Leave as the trainer's entry point does: gloo's worker threads can abort interpreter
# teardown ("terminate called without an active exception", pytorch/pytorch#179291).
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
"""


def test_itc_gathers_unequal_rows_across_ranks(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER.format(root=str(ROOT), init=str(tmp_path / "init")))
    processes = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        assert "[0.0, 0.0, 1.0, 1.0, 1.0]" in out


def test_reconstruct_grid(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=1"), check=True, capture_output=True,
                   timeout=300)
    grid = tmp_path / "grid.png"
    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "eval", "reconstruct", "--checkpoint",
                          str(run / "checkpoints" / "step-0000001.pt"), "--data", str(dataset), "--out", str(grid),
                          "--samples", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    image = Image.open(grid)
    assert image.size == (3 * 192 + 40, 3 * (192 + 64) + 10)
    left, middle = image.crop((10, 5, 202, 197)), image.crop((212, 5, 404, 197))
    assert left.tobytes() != middle.tobytes()  # the masked view hides patches
