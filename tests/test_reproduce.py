"""The reproduction study's arithmetic: mean ± standard error per run, and each claim's verdict
from the difference and its standard error (benchmarks/reproduce.py)."""

from __future__ import annotations

import argparse
import math

from benchmarks import reproduce


def study_args(seeds=(0, 1, 2)) -> argparse.Namespace:
    return argparse.Namespace(seeds=list(seeds), steps=10, set=[])


def results_of(values: dict[str, list[float]], metric: str = "image_mean", args=None) -> dict:
    args = args or study_args()
    results = {}
    for name, per_seed in values.items():
        for seed, value in zip(args.seeds, per_seed):
            results[reproduce.key_of(name, seed, args)] = {"run": name, "seed": seed, "seconds": 60.0,
                                                           metric: value, "image_cls": value}
    return results


def test_summary_is_the_mean_and_its_standard_error():
    mean, se = reproduce.summary([0.1, 0.2, 0.3])
    assert math.isclose(mean, 0.2) and math.isclose(se, 0.1 / math.sqrt(3))
    assert reproduce.summary([0.4]) == (0.4, 0.0)


def test_a_claim_holds_only_beyond_two_standard_errors():
    args = study_args()
    clear = results_of({"m3ae": [0.30, 0.31, 0.32], "mae": [0.20, 0.21, 0.22]}, args=args)
    _, summaries = reproduce.table(clear, args, [1])
    verdicts = {test["metric"]: test for test in summaries["claims"][1]}
    assert math.isclose(verdicts["image_mean"]["diff"], 0.10)
    assert math.isclose(verdicts["image_mean"]["se"], math.sqrt(2) * 0.01 / math.sqrt(3))
    assert verdicts["image_mean"]["verdict"] == "holds (> 2 SE)"
    noisy = results_of({"m3ae": [0.20, 0.30, 0.25], "mae": [0.24, 0.22, 0.23]}, args=args)
    _, summaries = reproduce.table(noisy, args, [1])
    assert summaries["claims"][1][0]["verdict"] == "within 2 SE"
    reversed_ = results_of({"m3ae": [0.10, 0.11, 0.12], "mae": [0.20, 0.21, 0.22]}, args=args)
    _, summaries = reproduce.table(reversed_, args, [1])
    assert summaries["claims"][1][0]["verdict"] == "reversed (< -2 SE)"
    one_seed = results_of({"m3ae": [0.3], "mae": [0.2]}, args=study_args([0]))
    _, summaries = reproduce.table(one_seed, study_args([0]), [1])
    assert summaries["claims"][1][0]["verdict"] == "needs ≥ 2 seeds"


def test_competitive_allows_a_loss_inside_two_standard_errors_only():
    args = study_args()
    close = results_of({"momo": [0.20, 0.24, 0.22], "mae": [0.23, 0.21, 0.25]}, args=args)
    text, summaries = reproduce.table(close, args, [5])
    assert summaries["claims"][5][0]["verdict"] == "competitive (≥ -2 SE)"
    far = results_of({"momo": [0.10, 0.11, 0.12], "mae": [0.23, 0.24, 0.25]}, args=args)
    _, summaries = reproduce.table(far, args, [5])
    assert summaries["claims"][5][0]["verdict"] == "worse (< -2 SE)"
    assert "| momo |" in text and "| 3 |" in text


def test_results_of_other_settings_are_not_reused():
    args = study_args()
    results = results_of({"m3ae": [0.3, 0.3, 0.3], "mae": [0.2, 0.2, 0.2]}, args=args)
    other = argparse.Namespace(seeds=[0, 1, 2], steps=10, set=["train.model.preset=small"])
    assert all(reproduce.key_of(name, seed, other) not in results for name in ("m3ae", "mae") for seed in range(3))
    _, summaries = reproduce.table(results, other, [1])
    assert summaries["runs"] == {} and summaries["claims"] == {}


def test_icon_corpus_from_a_package_tarball(tmp_path):
    """benchmarks/icons_corpus.py on a small package laid out as @mdi/svg: every icon lands in
    exactly one role, labels only for single-tag icons of a big enough category, the held-out
    icons are in no pretraining list, and both build configs load."""
    import io
    import json
    import subprocess
    import sys
    import tarfile

    from mmae.schemas.loading import load_config

    meta, svgs = [], {}
    for index in range(60):
        tags = [["Weather"], ["Arrow"], ["Weather", "Arrow"], ["Weather"]][index % 4] if index % 10 else []
        meta.append({"name": f"icon-{index}", "aliases": [f"alias-{index}"], "tags": tags,
                     "deprecated": index == 59})
        svgs[f"icon-{index}"] = f'<svg viewBox="0 0 24 24"><path d="M{2 + index % 5},2H20V{10 + index % 9}Z" /></svg>'
    meta[2]["tags"] = ["Rare"]
    package = tmp_path / "mdi-svg.tgz"
    with tarfile.open(package, "w:gz") as archive:
        for name, payload in [("package/package.json", json.dumps({"version": "0.0.1", "license": "Apache-2.0"})),
                              ("package/meta.json", json.dumps(meta)),
                              *((f"package/svg/{n}.svg", svg) for n, svg in svgs.items())]:
            data = payload.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    out = tmp_path / "icons"
    result = subprocess.run([sys.executable, str(reproduce.ROOT / "benchmarks" / "icons_corpus.py"), "--out", str(out),
                             "--package", str(package), "--min-class", "10", "--size", "32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "CORPUS.json").read_text())
    assert record["icons"] == 59 and record["classes"] == ["Arrow", "Weather"] and record["license"] == "Apache-2.0"
    lists = {role: [json.loads(line) for line in (out / "raw" / f"{role}.jsonl").read_text().splitlines()]
             for role in ("paired", "image", "text", "heldout")}
    names = [row["name"] for rows in lists.values() for row in rows]
    assert sorted(names) == sorted(f"icon-{index}" for index in range(59))  # each icon once, deprecated left out
    assert all(row["label"] in (None, "Arrow", "Weather") for rows in lists.values() for row in rows)
    labels = {row["name"]: row["label"] for rows in lists.values() for row in rows}
    assert labels["icon-1"] == "Arrow" and labels["icon-3"] == "Weather"
    assert labels["icon-2"] is None and labels["icon-6"] is None and labels["icon-10"] is None  # rare / 2 tags / none
    assert all("caption" in row and "url" in row for row in lists["paired"] + lists["heldout"])
    assert all("url" not in row and row["text"].startswith("icon ") for row in lists["text"])
    assert all((out / "raw" / row["url"]).stat().st_size > 0 for row in lists["image"])
    pretrain, heldout = load_config(str(out / "pretrain.yaml")), load_config(str(out / "heldout.yaml"))
    assert [source.kind for source in pretrain.data.sources] == ["paired", "image", "text"]
    assert heldout.data.tokenizer.model == pretrain.data.output  # the held-out icons share the tokenizer


def test_the_images_gain_is_the_caption_loss_with_shuffled_images_minus_with_their_own(monkeypatch):
    import io
    from types import SimpleNamespace

    import torch
    from PIL import Image

    def png(level: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (level * 25,) * 3).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"id": f"r{level}", "image": png(level), "tokens": [level]} for level in range(10)]
    monkeypatch.setattr("mmae.trainer.evaluate.paired_rows", lambda dataset, limit, split: rows)

    class Model:
        """A caption 'loss' that is 0 when each image's brightness matches its own token."""
        image_size, max_text_tokens = 8, 4

        def __init__(self, looks: bool):
            self.looks = looks

        def eval(self):
            return self

        def layout(self, inputs, masking, seed):
            return None

        def forward_loss(self, inputs, layout):
            brightness = inputs.images.mean(dim=(1, 2, 3))
            rank = brightness.argsort().argsort().float()  # 0..9 in brightness order
            loss = (rank - inputs.tokens.float()).abs().mean() if self.looks else torch.tensor(2.0)
            return SimpleNamespace(text_loss=loss)

    assert reproduce.image_gain(Model(looks=True), "unused") > 1.0
    assert reproduce.image_gain(Model(looks=False), "unused") == 0.0


def test_nats_are_shown_as_they_are_and_probes_as_percentages():
    args = study_args()
    results = results_of({"m3ae": [0.30, 0.31, 0.32]}, args=args)
    for key in results:
        results[key]["image_gain"] = 0.037
    text, _ = reproduce.table(results, args, [1])
    assert "0.037 ± 0.000" in text and "31.0 ± 0.6" in text
