"""mmae export (timm, safetensors) and mmae embed, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mmae.trainer.model import build_model
from mmae.trainer.transforms import eval_view

from tests.datasets import write_dataset

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 50


def timm_python() -> str | None:
    """The interpreter of the separate timm environment (`make test` creates .venv-timm)."""
    candidate = os.environ.get("MMAE_TIMM_PYTHON") or str(ROOT / ".venv-timm" / "bin" / "python")
    return str(Path(candidate).absolute()) if Path(candidate).exists() else None  # tests run it from elsewhere


def a_checkpoint(tmp_path: Path, alignment: bool = False, data: str | None = None) -> Path:
    """A tiny model whose every parameter is random (zeros and ones would hide a wrong mapping)."""
    torch.manual_seed(3)
    model = build_model("tiny", VOCAB, 32, 16, alignment=alignment)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    spec = {"preset": "tiny", "vocab_size": VOCAB, "image_size": 32, "max_text_tokens": 16, "norm_pix_loss": True,
            "alignment": alignment}
    path = tmp_path / "step-0000007.pt"
    torch.save({"model": model.state_dict(), "step": 7, "model_spec": spec,
                "config": {"data": data} if data else {}}, path)
    return path


def mmae(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmae.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


TIMM_SCRIPT = """
import sys, torch, timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert not any(name.split(".")[0] in ("mmae", "trainer", "schemas", "pipelines") for name in sys.modules)
x = torch.load(sys.argv[2])
with torch.no_grad():
    features = model.forward_features(x)[:, 0]
cfg = model.pretrained_cfg
torch.save({"features": features, "input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "num_features": model.num_features}, sys.argv[3])
"""


def test_timm_loads_the_exported_encoder_and_computes_mmaes_cls_features(tmp_path):
    python = timm_python()
    if python is None:
        pytest.skip("no timm environment: `make test` creates .venv-timm (timm needs a CUDA torch of its own)")
    checkpoint = a_checkpoint(tmp_path)
    out = tmp_path / "vit"
    result = mmae("export", "--checkpoint", str(checkpoint), "--format", "timm", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]
    import io

    from PIL import Image

    images = []
    for index in range(3):
        buffer = io.BytesIO()
        Image.effect_noise((48, 40), 60 + 20 * index).convert("RGB").save(buffer, format="PNG")
        images.append(eval_view(buffer.getvalue(), 32))
    x = torch.stack(images)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "timm_side.py"
    script.write_text(TIMM_SCRIPT)
    # A fresh interpreter of another environment, isolated (-I): it cannot import mmae.
    side = subprocess.run([python, "-I", str(script), str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert side.returncode == 0, side.stderr[-3000:]
    theirs = torch.load(tmp_path / "y.pt")
    from mmae.trainer.load import load_model

    model, _ = load_model(str(checkpoint))
    ours = model.encode_images(x)
    assert theirs["features"].shape == ours.shape == (3, 64) and theirs["num_features"] == 64
    assert torch.allclose(theirs["features"], ours, atol=1e-5, rtol=1e-4), (theirs["features"] - ours).abs().max()
    assert theirs["input_size"] == [3, 32, 32]
    assert theirs["mean"] == pytest.approx([0.485, 0.456, 0.406]) and theirs["std"] == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.slow
def test_safetensors_export_holds_the_whole_model_and_loads_back(tmp_path):
    dataset = write_dataset(tmp_path / "ds", {"paired": [20], "image": [10], "text": [10]}, rows_per_group=8)
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a photo of a red cat number {n} on a mat" for n in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=VOCAB,
                                   hard_vocab_limit=False,
                                   model_type="unigram", minloglevel=2)
    (dataset / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer.model", "sha256": "", "vocab_size": VOCAB, "special_ids": {}}
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = a_checkpoint(tmp_path, alignment=True, data=str(dataset))
    out = tmp_path / "whole"
    result = mmae("export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(json.loads(result.stdout)["files"]) == ["mmae.json", "model.safetensors", "tokenizer.model"]
    again = mmae("export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr  # nothing a user owns is overwritten

    from mmae.trainer.load import load_model
    from safetensors.torch import load_file

    original = torch.load(checkpoint, weights_only=True)["model"]
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()  # encoder, decoder, heads, ITC/ITM heads
    assert all(torch.equal(exported[key], original[key]) for key in original)
    model, state = load_model(str(out))
    assert state["step"] == 7 and model.alignment

    # embed: a dataset, an image folder, a text file (tokenised with the exported tokenizer).
    emb = tmp_path / "emb.parquet"
    result = mmae("embed", "--checkpoint", str(out), "--data", str(dataset), "--out", str(emb))
    assert result.returncode == 0, result.stderr[-2000:]
    table = pq.read_table(emb).to_pylist()
    assert len(table) == 40 and json.loads(result.stdout)["rows"] == 40
    by_id = {row["id"]: row for row in table}
    assert sum(row["image_embedding"] is not None for row in table) == 30  # paired + image rows
    assert sum(row["text_embedding"] is not None for row in table) == 30  # paired + text rows
    assert by_id["t0000000"]["image_embedding"] is None and by_id["i0000000"]["text_embedding"] is None
    shard = pq.read_table(next((dataset / "paired").glob("*.parquet"))).to_pylist()[0]
    expected = model.encode_images(eval_view(shard["image"], 32)[None])[0]
    assert torch.allclose(torch.tensor(by_id[shard["id"]]["image_embedding"]), expected, atol=1e-5)
    expected_text = model.encode_texts([torch.tensor(shard["tokens"])])[0]
    assert torch.allclose(torch.tensor(by_id[shard["id"]]["text_embedding"]), expected_text, atol=1e-5)

    folder = tmp_path / "photos" / "cats"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(shard["image"])
    (folder / "notes.txt").write_text("not an image")
    result = mmae("embed", "--checkpoint", str(out), "--images", str(tmp_path / "photos"), "--out", str(emb),
                  "--pool", "mean")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pq.read_table(emb).to_pylist()
    assert [row["id"] for row in rows] == ["cats/a.jpg"] and rows[0]["text_embedding"] is None
    mean = model.encode_images(eval_view(shard["image"], 32)[None], pool="mean")[0]
    assert torch.allclose(torch.tensor(rows[0]["image_embedding"]), mean, atol=1e-5)

    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a red cat\n\nnumber 7 on a mat\n")
    result = mmae("embed", "--checkpoint", str(out), "--texts", str(texts), "--out", str(emb))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pq.read_table(emb).to_pylist()
    assert [row["id"] for row in rows] == ["line-1", "line-2", "line-3"]
    assert rows[1]["text_embedding"] is None and len(rows[0]["text_embedding"]) == 64
    tokens = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).encode("a photo of a red cat")
    assert torch.allclose(torch.tensor(rows[0]["text_embedding"]), model.encode_texts([torch.tensor(tokens)])[0],
                          atol=1e-5)
    # The Python API: the same vectors from PIL images and strings.
    from PIL import Image

    from mmae import api

    loaded = api.load(str(out))
    picture = Image.open(folder / "a.jpg")
    assert torch.allclose(loaded.embed_images([picture])[0], expected, atol=1e-5)
    assert torch.allclose(loaded.embed_texts(["a photo of a red cat"])[0], torch.tensor(rows[0]["text_embedding"]),
                          atol=1e-5)
    assert loaded.dim == 64

    # Hostile input: an image file that does not decode is a null, counted and named, not a lost job;
    # a text file that is not UTF-8 is one error naming the line; --out that is a file is refused.
    (folder / "broken.jpg").write_bytes(shard["image"][:200])
    result = mmae("embed", "--checkpoint", str(out), "--images", str(tmp_path / "photos"), "--out", str(emb))
    assert result.returncode == 0 and json.loads(result.stdout)["undecodable_images"] == 1
    assert "cats/broken.jpg" in result.stderr
    rows = {row["id"]: row for row in pq.read_table(emb).to_pylist()}
    assert rows["cats/broken.jpg"]["image_embedding"] is None and rows["cats/a.jpg"]["image_embedding"] is not None
    texts.write_bytes("caption one\nline\u2028same line\n".encode() + b"\xff\xfe bad\n")
    result = mmae("embed", "--checkpoint", str(out), "--texts", str(texts), "--out", str(emb))
    assert result.returncode == 2 and "line 3 is not UTF-8" in result.stderr and "Traceback" not in result.stderr
    texts.write_text("caption one\nline\u2028same line\n", encoding="utf-8")
    result = mmae("embed", "--checkpoint", str(out), "--texts", str(texts), "--out", str(emb))
    assert [row["id"] for row in pq.read_table(emb).to_pylist()] == ["line-1", "line-2"]
    result = mmae("export", "--checkpoint", str(checkpoint), "--format", "timm", "--out", str(texts))
    assert result.returncode == 2 and "is a file" in result.stderr

    bad = mmae("embed", "--checkpoint", str(out), "--images", str(tmp_path / "nowhere"), "--out", str(emb))
    assert bad.returncode == 2 and "no image files" in bad.stderr and "Traceback" not in bad.stderr
