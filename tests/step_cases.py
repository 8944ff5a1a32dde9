"""Training runs whose per-step losses are recorded (tests/data/step_losses.json) and compared.

The recording was made with the step as it was before the batch layout moved into the loader
(per-sample Python in `predict`): the new step must give the same losses, step for step.

    .venv/bin/python -m tests.step_cases record     # rewrite tests/data/step_losses.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmae.schemas.config import TrainConfig

RECORDED = Path(__file__).resolve().parent / "data" / "step_losses.json"
VOCAB = 100
LOSSES = ("loss", "image_loss", "text_loss", "unpaired_text_loss", "itc_loss", "itm_loss", "grad_norm")

CASES = {
    "packed": {},
    "padded_sdpa": {"attention": "sdpa"},
    "per_kind": {"step_mode": "per_kind"},
    "cross": {"masking": {"strategy": "cross", "image_ratio": 0.75, "text_ratio": 0.5}},
    "itc_itm": {"masking": {"strategy": "cross"}, "loss_weights": {"itc": 0.5, "itm": 0.5}},
    "grad_accum": {"grad_accum": 2, "batch_size": 4},
    "no_text": {"use_text": False},
    "stages": {"stages": [
        {"name": "images", "steps": 2, "mix": {"paired": 0, "image": 1, "text": 0}},
        {"name": "unimodal", "steps": 2, "mix": {"paired": 0, "image": 0.5, "text": 0.5}},
        {"name": "all", "steps": 2, "mix": {"paired": 0.5, "image": 0.25, "text": 0.25},
         "objectives": {"image": 1, "text": 1, "unpaired_text": 0.5, "itc": 0.2, "itm": 0.2}}]},
}


def make_dataset(root: Path) -> Path:
    from tests.datasets import write_dataset

    root = write_dataset(root, {"paired": [60, 30], "image": [40], "text": [50]}, rows_per_group=16)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer.model", "sha256": "", "vocab_size": VOCAB, "special_ids": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def config_for(name: str, dataset: Path, out: Path) -> TrainConfig:
    settings = {"data": str(dataset), "out": str(out), "batch_size": 8, "num_workers": 0, "image_size": 16,
                "shuffle_window": 16, "max_text_tokens": 16, "steps": 6, "log_every": 1, "checkpoint_every": 100,
                "model": {"preset": "tiny"}, "optimizer": {"base_lr": 0.01, "warmup_steps": 2}}
    settings.update(CASES[name])
    return TrainConfig(**settings)


def run_case(name: str, dataset: Path, out: Path) -> list[dict[str, float]]:
    """The per-step losses of a fresh run of case `name`."""
    from mmae.trainer.parallel import init_distributed
    from mmae.trainer.train import Trainer

    Trainer(config_for(name, dataset, out), init_distributed()).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{key: row[key] for key in LOSSES if row.get(key) is not None} for row in rows if row["split"] == "train"]


def record() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        dataset = make_dataset(Path(folder) / "ds")
        recorded = {name: run_case(name, dataset, Path(folder) / name) for name in CASES}
    RECORDED.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"recorded {len(recorded)} cases in {RECORDED}")


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record()
