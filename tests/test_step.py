"""The training step at GPU scale: layouts made in the loader, the same numbers as before, no
host-device synchronisation inside a step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mmae.schemas.config import MaskingConfig, TrainConfig
from mmae.trainer.layout import build_layout
from mmae.trainer.loader import MixedLoader
from mmae.trainer.masking import draw_masks
from mmae.trainer.model import build_model

from tests import step_cases


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return step_cases.make_dataset(tmp_path_factory.mktemp("step") / "ds")


@pytest.mark.parametrize("case", sorted(step_cases.CASES))
def test_every_recorded_case_trains_with_the_losses_of_the_per_sample_step(dataset, tmp_path, case):
    recorded = json.loads(step_cases.RECORDED.read_text())[case]
    now = step_cases.run_case(case, dataset, tmp_path / case)
    assert len(now) == len(recorded) == 6
    for step, (old, new) in enumerate(zip(recorded, now), start=1):
        assert old.keys() == new.keys(), step
        for name in old:  # float32 after several updates: summation order alone moves the 7th digit
            assert math.isclose(new[name], old[name], rel_tol=1e-5, abs_tol=1e-7), (case, step, name, old[name],
                                                                                   new[name])


# --- no host-device synchronisation inside a step -----------------------------------------------

# What a step must not do: read a value back (`.item()`, `bool()`, `int()`, `float()` become
# `_local_scalar_dense`), or run an operator whose output size depends on tensor values (on CUDA
# each waits for the device: boolean indexing, nonzero, masked_select, unique, repeat_interleave
# without its output size).
READS = {"aten._local_scalar_dense.default"}
DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
                  "aten.unique_dim.default", "aten.unique_consecutive.default"}


class SyncSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator that would synchronise with a device, with its name."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.operators += 1
        if name in READS or name in DATA_DEPENDENT:
            self.syncs.append(name)
        elif name.startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool
                for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            self.syncs.append(f"{name} with a boolean mask")
        elif name.startswith("aten.repeat_interleave.") and kwargs.get("output_size") is None:
            self.syncs.append(f"{name} without output_size")
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """Python-level reads of any tensor (`tolist` and `numpy` do not pass the dispatcher on CPU)."""
    seen: list[str] = []
    for method in ("tolist", "numpy", "item"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, _name=method, **kwargs):
            seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    return seen


SYNC_FREE_CASES = ["packed", "per_kind", "cross", "grad_accum", "no_text"]


@pytest.mark.parametrize("case", SYNC_FREE_CASES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_training_step_never_waits_for_the_device(dataset, tmp_path, case, layout, request):
    from mmae.trainer.parallel import Distributed
    from mmae.trainer.train import Trainer

    trainer = Trainer(step_cases.config_for(case, dataset, tmp_path / "run"), Distributed())
    trainer.model.set_attention("sdpa", layout)
    steps = trainer.loader.steps(4)
    prepared = [next(steps) for _ in range(4)]  # the loader's work (its workers, in training)
    assert all(batch.parts is not None for micro in prepared for batch in micro)
    reads = request.getfixturevalue("host_reads")
    with SyncSpy() as spy:
        for micro in prepared:
            result = trainer.train_step(trainer.model, micro)
            trainer.nonfinite.note(result, trainer.step)
    assert spy.operators > 200  # forward, backward (the autograd engine runs under the mode) and AdamW
    assert spy.syncs == [] and reads == [], (spy.syncs, reads)
    assert result.read(trainer.env)["loss"] > 0 and reads  # a logged step reads, once it is asked to


def test_the_spy_sees_each_kind_of_synchronisation(dataset):
    """The checks above can fail: the per-sample step's reads were these operators."""
    batch = next(MixedLoader(TrainConfig(data=str(dataset), batch_size=8, num_workers=0, image_size=16,
                                         max_text_tokens=16)).batches(1))
    with SyncSpy() as spy:
        bool(batch.token_lengths.max() > 0)
        batch.token_lengths[batch.token_lengths > 100]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
    assert spy.syncs == ["aten._local_scalar_dense.default", "aten.index.Tensor with a boolean mask",
                         "aten.repeat_interleave.Tensor without output_size"]


# --- the layout against a per-sample reference --------------------------------------------------


def reference_layout(image_index: list[int], lengths: list[int], image_masked, text_masked, patches: int):
    """Sample by sample, as the step used to lay rows out (CLS, kept patches, kept tokens)."""
    images = sum(row >= 0 for row in image_index)
    encoder, decoder_source, pixels, tokens_paired, tokens_unpaired = [], [], [], [], []
    offset = decoder_row = 0
    for sample, (row, length) in enumerate(zip(image_index, lengths)):
        sequence = [0]
        kinds = ["cls"]
        if row >= 0:
            for patch in range(patches):
                kinds.append("image")
                if image_masked[row][patch]:
                    pixels.append((decoder_row + len(kinds) - 1, row, patch))
                else:
                    sequence.append(1 + row * patches + patch)
        for token in range(length):
            kinds.append("text")
            if text_masked[offset + token]:
                (tokens_paired if row >= 0 else tokens_unpaired).append((decoder_row + len(kinds) - 1, offset + token))
            else:
                sequence.append(1 + images * patches + offset + token)
        start = len(encoder)
        encoder += sequence
        cursor = start
        for kind_index, kind in enumerate(kinds):
            hidden = (kind == "image" and image_masked[row][kind_index - 1]) or (
                kind == "text" and text_masked[offset + kind_index - 1 - (patches if row >= 0 else 0)])
            decoder_source.append(-1 if hidden and kind == "image" else -2 if hidden else cursor)
            cursor += not hidden
        offset += length
        decoder_row += len(kinds)
    return encoder, decoder_source, pixels, tokens_paired + tokens_unpaired


@pytest.mark.parametrize("seed", range(20))
def test_the_batch_layout_is_the_per_sample_layout(seed):
    generator = torch.Generator().manual_seed(seed)
    samples, patches = int(torch.randint(1, 12, (1,), generator=generator)), 4
    has_image = torch.rand(samples, generator=generator) < 0.6
    lengths = torch.randint(0, 6, (samples,), generator=generator)
    image_index = torch.full((samples,), -1)
    image_index[has_image] = torch.arange(int(has_image.sum()))
    masks = draw_masks([f"s{seed}-{i}" for i in range(samples)], image_index.tolist(), lengths.tolist(), patches,
                       MaskingConfig(image_ratio=0.5, text_ratio=0.5), seed)
    layout = build_layout(image_index, lengths, masks, patches)
    encoder, source, pixels, tokens = reference_layout(image_index.tolist(), lengths.tolist(),
                                                       masks.image_masked.tolist(), masks.text_masked.tolist(), patches)
    assert layout.encoder_index.tolist() == encoder
    rows = len(encoder)
    assert layout.decoder_index.tolist() == [rows if s == -1 else rows + 1 if s == -2 else s for s in source]
    assert layout.pixel_rows.tolist() == [p[0] for p in pixels]
    assert layout.pixel_at.tolist() == [[p[1], p[2]] for p in pixels]
    assert layout.token_rows.tolist() == [t[0] for t in tokens] and layout.token_at.tolist() == [t[1] for t in tokens]
    assert sum(layout.encoder.seqlens) == rows and layout.decoder.rows == len(source)
    assert layout.counts()["image"] == len(pixels) == int(masks.image_masked.sum())


def test_packed_attention_on_cpu_is_one_call_and_equals_attention_per_sequence():
    from mmae.trainer.attention import attend, to_layout
    from mmae.trainer.layout import Sequences

    lengths = torch.tensor([3, 7, 1, 5])
    sequences = Sequences.of(lengths)
    q, k, v = (torch.randn(1, int(lengths.sum()), 2, 8) for _ in range(3))
    _, arrangement = to_layout(torch.zeros(int(lengths.sum()), 16), sequences, "packed", "sdpa")
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        out = attend(q, k, v, arrangement)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == 1
    expected = torch.cat([original(*(t.transpose(1, 2) for t in parts)).transpose(1, 2) for parts in
                          zip(q.split(lengths.tolist(), 1), k.split(lengths.tolist(), 1), v.split(lengths.tolist(), 1))],
                         dim=1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_model_forward_with_a_host_layout_equals_the_loaders(dataset):
    """Evaluation builds layouts in place; training gets them from the loader: the same losses."""
    from mmae.trainer.step_inputs import StepSpec

    config = TrainConfig(data=str(dataset), batch_size=8, num_workers=0, image_size=16, max_text_tokens=16)
    spec = StepSpec(num_patches=4, masking=config.masking, seed=5)
    batch = next(MixedLoader(config, step=spec).batches(1))
    torch.manual_seed(0)
    model = build_model("tiny", step_cases.VOCAB, 16, 16)
    from mmae.trainer.masking import step_seed

    part = batch.parts[0].to("cpu")  # what the step does: moves, and normalises the uint8 pixels
    from_loader = model(part.inputs, part.layout)
    in_place = model(batch.inputs(), model.layout(batch.inputs(), config.masking, step_seed(5, 0)))
    assert torch.equal(from_loader.loss, in_place.loss)


# --- the loader at training resolution ----------------------------------------------------------


def test_a_crop_much_larger_than_the_output_decodes_at_a_reduced_dct_scale(monkeypatch):
    import io
    import random

    from mmae.trainer.transforms import eval_pixels, normalise, train_pixels, train_view
    from PIL import Image, JpegImagePlugin

    gradient = torch.linspace(0, 255, 512).to(torch.uint8)
    array = torch.stack([gradient[None, :].expand(512, 512), gradient[:, None].expand(512, 512),
                         torch.full((512, 512), 90, dtype=torch.uint8)], dim=-1).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or original(self, mode, size))
    small = train_pixels(data, 64, random.Random(3), scale=(0.9, 1.0))  # a crop of ~500 px to 64 px
    assert drafts and small.shape == (64, 64, 3) and small.dtype == torch.uint8
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", original)
    full = Image.open(io.BytesIO(data)).convert("RGB")  # the same crop without the reduced decode
    from mmae.trainer.transforms import random_resized_crop_box

    rng = random.Random(3)
    box = random_resized_crop_box(512, 512, rng, scale=(0.9, 1.0))
    reference = full.resize((64, 64), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    reference = torch.from_numpy(__import__("numpy").asarray(reference))
    assert (small.float() - reference.float()).abs().mean() < 3  # the same picture (out of 255)
    # a crop that does not cover twice the output decodes in full; normalising is the float view
    drafts.clear()
    assert torch.equal(normalise(train_pixels(data, 300, random.Random(1))), train_view(data, 300, random.Random(1)))
    assert eval_pixels(data, 64).shape == (64, 64, 3)
