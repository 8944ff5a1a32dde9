"""The reproduction study: do mmae's recipes show the effects the M3AE, MaskVLM and MoMo papers report?

    .venv/bin/python benchmarks/icons_corpus.py                      # the corpus (build/icons)
    .venv/bin/mmae build --config build/icons/pretrain.yaml
    .venv/bin/mmae build --config build/icons/heldout.yaml
    .venv/bin/python benchmarks/reproduce.py --claims 1 --steps 6000  # claim 1 as recorded (32 min)
    .venv/bin/python benchmarks/reproduce.py --claims 2               # one claim (its runs, 3 seeds)
    .venv/bin/python benchmarks/reproduce.py                          # every claim at 1,000 steps, then the table

Each claim compares runs that differ in one recipe setting only; every run is trained with
`mmae train` (same data, preset, steps, batch) for each seed, then scored in this process:

- image probe: `mmae eval probe --features image --pool cls|mean`, the probe trained on the
  pretraining dataset's labelled images and tested on the held-out icons (never trained on);
- text probe: the same on text-only features of the captions (`--features text --pool mean`);
- retrieval (runs trained with ITC): `mmae eval retrieval --split all` on the held-out pairs.

Claims and what decides them (all differences are means over seeds; SE = the standard error of
the difference, sqrt(se_a^2 + se_b^2) with each run's standard error over its seeds):
  1 M3AE vs MAE (`use_text: false`)  image probe: M3AE - MAE > 2 SE on CLS and on mean features
  2 text mask 0.75 vs 0.15           image probe (mean): 0.75 - 0.15 > 2 SE
  3 paired + unpaired vs paired only image probe (mean): with - without > 2 SE
  4 MaskVLM vs ITC + ITM alone       retrieval mean R@1 (both directions): MaskVLM - ITC/ITM > 2 SE
  5 MoMo vs the specialists          image probe vs MAE, text probe vs M3AE, retrieval vs MaskVLM:
                                     "competitive" = no worse than -2 SE on each

Every run that trains on text is also scored on how much its image helps predict its caption
(the held-out pairs' masked-caption loss with another pair's image minus with its own, nats):
the path by which text could teach M3AE's image features.

Results are kept in OUT/results.json per run and seed, keyed by the run's settings: a killed
study (or one rerun with more seeds) trains only what is missing; `mmae train` itself resumes a
run killed midway. `--set KEY=VALUE` goes to every run (e.g. `--set train.model.preset=small
--steps 20000` on a GPU); a changed setting is a new key, so nothing stale is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The scale of the recorded study (2 CPU cores): the `mini` preset (dim 128, 4 blocks, 8 px patches)
# on the icons at 32 px. `--set` after these overrides them (a GPU: `--set train.model.preset=base
# --set train.image_size=64` and more `--steps`).
STUDY_SETS = ["train.model.preset=mini", "train.image_size=32"]
# The M3AE paper's loss weights (text 0.5 of the image loss; unpaired text the same).
PAPER_WEIGHTS = ["train.loss_weights.text=0.5", "train.loss_weights.unpaired_text=0.5"]
RUNS: dict[str, tuple[str, list[str], str]] = {
    "m3ae": ("configs/m3ae.yaml", PAPER_WEIGHTS, "M3AE: paired + unpaired, text mask 0.75"),
    "mae": ("configs/mae.yaml", [], "MAE: the same images, captions dropped (use_text: false)"),
    "m3ae_text0.15": ("configs/m3ae.yaml", [*PAPER_WEIGHTS, "train.masking.text_ratio=0.15"],
                      "M3AE with BERT's text mask 0.15"),
    "m3ae_paired": ("configs/m3ae.yaml", [*PAPER_WEIGHTS, "train.mix.paired=1", "train.mix.image=0",
                                          "train.mix.text=0"], "M3AE on the paired rows only"),
    "maskvlm": ("configs/maskvlm.yaml", [], "MaskVLM: cross masking + ITC + ITM"),
    "itc_itm": ("configs/maskvlm.yaml", ["train.loss_weights.image=0", "train.loss_weights.text=0",
                                         "train.loss_weights.unpaired_text=0"], "ITC + ITM alone (no masked losses)"),
    "momo": ("configs/momo.yaml", [], "MoMo: 3 stages, every kind's gradient per step"),
}
CLAIMS: dict[int, dict[str, Any]] = {
    1: {"title": "M3AE's image features beat MAE's (same images)", "runs": ["m3ae", "mae"],
        "tests": [("m3ae", "mae", "image_cls", "better"), ("m3ae", "mae", "image_mean", "better")]},
    2: {"title": "a high text mask ratio (0.75) beats BERT's 0.15", "runs": ["m3ae", "m3ae_text0.15"],
        "tests": [("m3ae", "m3ae_text0.15", "image_mean", "better"), ("m3ae", "m3ae_text0.15", "text_mean", "report")]},
    3: {"title": "unpaired data helps", "runs": ["m3ae", "m3ae_paired"],
        "tests": [("m3ae", "m3ae_paired", "image_mean", "better"), ("m3ae", "m3ae_paired", "text_mean", "report")]},
    4: {"title": "cross masking + ITC/ITM retrieves better than ITC/ITM alone", "runs": ["maskvlm", "itc_itm"],
        "tests": [("maskvlm", "itc_itm", "retrieval_r1", "better"), ("maskvlm", "itc_itm", "retrieval_r5", "report")]},
    5: {"title": "one MoMo encoder is competitive on images, texts and pairs", "runs": ["momo", "mae", "m3ae", "maskvlm"],
        "tests": [("momo", "mae", "image_mean", "competitive"), ("momo", "m3ae", "text_mean", "competitive"),
                  ("momo", "maskvlm", "retrieval_r1", "competitive")]},
}
METRICS = {"image_cls": "image probe, CLS", "image_mean": "image probe, mean", "text_mean": "text probe, mean",
           "retrieval_r1": "retrieval R@1", "retrieval_r5": "retrieval R@5",
           "image_gain": "caption loss: image's gain (nats)"}
NATS = {"image_gain"}  # shown as they are, not as a percentage


def stage_overrides(config: str, steps: int) -> list[str]:
    """A curriculum's three stages share the run's steps (a third each)."""
    if "momo" not in config:
        return []
    third = steps // 3
    return [f"train.stages.0.steps={third}", f"train.stages.1.steps={third}",
            f"train.stages.2.steps={steps - 2 * third}"]


def train(name: str, seed: int, args: argparse.Namespace, run: Path) -> float:
    config, overrides, _ = RUNS[name]
    sets = [f"train.data={args.pretrain}", f"train.out={run}", f"train.seed={seed}", f"train.steps={args.steps}",
            f"train.checkpoint_every={max(1, args.steps // 4)}", f"train.log_every={max(1, args.steps // 10)}",
            *overrides, *stage_overrides(config, args.steps), *STUDY_SETS, *args.set]
    if "momo" in config:  # the stages carry the length
        sets = [item for item in sets if not item.startswith("train.steps=")]
    command = [sys.executable, "-m", "mmae.cli", "train", "--config", str(ROOT / config)]
    command += [part for item in sets for part in ("--set", item)]
    started = time.perf_counter()
    with open(run.parent / f"{run.name}.log", "a") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"{name} seed {seed}: mmae train failed (exit {result.returncode}); see {run.parent}/{run.name}.log")
    return time.perf_counter() - started


def image_gain(model, dataset: str, limit: int = 1024, draws: int = 3) -> float:
    """How much the image helps predict its caption: the held-out pairs' masked-caption loss
    (masks 0.75/0.75, `draws` mask seeds) with the images shuffled among the pairs, minus the
    loss with its own image, in nats. ~0: the model predicts captions from their own visible
    words alone, so text supervision has no path into the image features (M3AE's mechanism)."""
    import torch

    from mmae.schemas.config import MaskingConfig
    from mmae.trainer.batch import Inputs
    from mmae.trainer.evaluate import paired_rows
    from mmae.trainer.transforms import eval_view

    model.eval()
    rows = paired_rows(dataset, limit, split="all")
    images = torch.stack([eval_view(row["image"], model.image_size) for row in rows])
    tokens = [torch.tensor(row["tokens"][: model.max_text_tokens]) for row in rows]
    swapped = images[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]

    def loss(pixels, seed: int) -> float:
        inputs = Inputs(pixels, torch.arange(len(rows)), torch.cat(tokens), torch.tensor([len(t) for t in tokens]),
                        [row["id"] for row in rows])
        with torch.no_grad():
            return float(model.forward_loss(inputs, model.layout(inputs, MaskingConfig(), seed)).text_loss)

    return sum(loss(swapped, seed) - loss(images, seed) for seed in range(draws)) / draws


def score(run: Path, args: argparse.Namespace) -> dict[str, float]:
    from mmae.trainer.evaluate import probe, retrieval
    from mmae.trainer.load import load_model

    checkpoint, data, heldout = str(run), str(args.pretrain), str(args.heldout)
    scores = {
        "image_cls": probe(checkpoint, data, pool="cls", test_data=heldout)["top1"],
        "image_mean": probe(checkpoint, data, pool="mean", test_data=heldout)["top1"],
        "text_mean": probe(checkpoint, data, pool="mean", test_data=heldout, of="text")["top1"],
    }
    model, state = load_model(checkpoint)
    if state.get("config", {}).get("use_text", True):  # as the run trained (MAE: captions dropped)
        scores["image_gain"] = image_gain(model, heldout)
    if model.alignment:
        found = retrieval(checkpoint, heldout, limit=args.retrieval_limit, split="all")
        scores["retrieval_r1"] = (found["image_to_text"]["r1"] + found["text_to_image"]["r1"]) / 2
        scores["retrieval_r5"] = (found["image_to_text"]["r5"] + found["text_to_image"]["r5"]) / 2
    return scores


def key_of(name: str, seed: int, args: argparse.Namespace) -> str:
    return json.dumps({"run": name, "seed": seed, "steps": args.steps, "set": [*STUDY_SETS, *args.set],
                       "recipe": RUNS[name][1]}, sort_keys=True)


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def digits(metric: str) -> int:
    """Retrieval near chance (0.07% R@1 on 1,534 pairs) needs two decimals of a percent."""
    return 3 if metric in NATS else 2 if metric.startswith("retrieval") else 1


def scale(metric: str) -> float:
    return 1.0 if metric in NATS else 100.0


def shown(metric: str, value: float, se: float, sign: str = "") -> str:
    """`value ± se` in the metric's unit (percent, or nats as they are) and digits."""
    k, d = scale(metric), digits(metric)
    return f"{k * value:{sign}.{d}f} ± {k * se:.{d}f}"


def table(results: dict[str, Any], args: argparse.Namespace, claims: list[int]) -> tuple[str, dict]:
    per_run: dict[str, dict[str, tuple[float, float, int]]] = {}
    minutes: dict[str, float] = {}
    for name in RUNS:
        rows = [results[key_of(name, seed, args)] for seed in args.seeds if key_of(name, seed, args) in results]
        if not rows:
            continue
        per_run[name] = {metric: (*summary([row[metric] for row in rows]), len(rows))
                         for metric in METRICS if all(metric in row for row in rows)}
        minutes[name] = sum(row["seconds"] for row in rows) / len(rows) / 60
    lines = ["| run | recipe | seeds | " + " | ".join(METRICS.values()) + " | minutes/run |",
             "|---|---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for name, metrics in per_run.items():
        cells = [shown(metric, m, s) if (m, s) != (None, None) else "—"
                 for metric, (m, s, _) in ((metric, metrics.get(metric, (None, None, 0))) for metric in METRICS)]
        seeds = max(n for _, _, n in metrics.values())
        lines.append(f"| {name} | {RUNS[name][2]} | {seeds} | " + " | ".join(cells) + f" | {minutes[name]:.1f} |")
    verdicts: dict = {}
    lines += ["", "| claim | comparison | measure | difference ± SE | verdict |", "|---|---|---|---:|---|"]
    for number in claims:
        claim = CLAIMS[number]
        for a, b, metric, kind in claim["tests"]:
            if metric not in per_run.get(a, {}) or metric not in per_run.get(b, {}):
                continue
            (mean_a, se_a, n_a), (mean_b, se_b, n_b) = per_run[a][metric], per_run[b][metric]
            diff, se = mean_a - mean_b, math.sqrt(se_a ** 2 + se_b ** 2)
            if min(n_a, n_b) < 2:
                verdict = "needs ≥ 2 seeds"
            elif kind == "better":
                verdict = "holds (> 2 SE)" if diff > 2 * se else "reversed (< -2 SE)" if diff < -2 * se else "within 2 SE"
            elif kind == "competitive":
                verdict = "competitive (≥ -2 SE)" if diff >= -2 * se else "worse (< -2 SE)"
            else:
                verdict = f"reported ({diff / se:+.1f} SE)" if se else "reported"
            verdicts.setdefault(number, []).append({"a": a, "b": b, "metric": metric, "diff": diff, "se": se,
                                                    "verdict": verdict})
            lines.append(f"| {number}: {claim['title']} | {a} − {b} | {METRICS[metric]} | "
                         f"{shown(metric, diff, se, sign='+')} | {verdict} |")
    return "\n".join(lines), {"runs": per_run, "claims": verdicts}


def plot(summaries: dict, claims: list[int], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for number in claims:
        claim = CLAIMS[number]
        metrics = list(dict.fromkeys(metric for _, _, metric, _ in claim["tests"]))
        runs = [name for name in claim["runs"] if name in summaries["runs"]]
        if not runs:
            continue
        figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * len(runs) / 2, 3.2), dpi=100)
        width = 0.8 / len(runs)
        for position, name in enumerate(runs):
            values = [summaries["runs"][name].get(metric, (float("nan"), 0.0, 0)) for metric in metrics]
            axes.bar([index + position * width for index in range(len(metrics))], [100 * v[0] for v in values],
                     width, yerr=[100 * v[1] for v in values], capsize=3, label=name)
        axes.set_xticks([index + width * (len(runs) - 1) / 2 for index in range(len(metrics))],
                        [METRICS[metric] for metric in metrics])
        axes.set_ylabel("% (mean ± SE over seeds)")
        axes.set_title(textwrap.fill(f"claim {number}: {claim['title']}", 44), fontsize=9)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"claim{number}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, nargs="+", default=sorted(CLAIMS), choices=sorted(CLAIMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="to every run's config")
    parser.add_argument("--pretrain", type=Path, default=ROOT / "build" / "icons" / "shards" / "pretrain")
    parser.add_argument("--heldout", type=Path, default=ROOT / "build" / "icons" / "shards" / "heldout")
    parser.add_argument("--retrieval-limit", type=int, default=2000, help="held-out pairs scored (first by id)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "reproduce")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "reproduce",
                        help="folder for claimN.png (default docs/reproduce)")
    parser.add_argument("--table-only", action="store_true", help="print the table of what is done; train nothing")
    args = parser.parse_args()
    for data in (args.pretrain, args.heldout):
        if not (data / "manifest.json").exists():
            sys.exit(f"{data} is not a built dataset: build the corpus first (see this script's help)")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    names = list(dict.fromkeys(name for number in args.claims for name in CLAIMS[number]["runs"]))
    todo = [(name, seed) for name in names for seed in args.seeds if key_of(name, seed, args) not in results]
    for done, (name, seed) in enumerate([] if args.table_only else todo):
        run = args.out / f"{name}-steps{args.steps}" / f"seed{seed}"
        run.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{done + 1}/{len(todo)}] {name} seed {seed}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        seconds = train(name, seed, args, run)
        scores = score(run, args)
        results[key_of(name, seed, args)] = {"run": name, "seed": seed, "seconds": round(seconds, 1), **scores}
        temporary = results_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(results, indent=1))
        temporary.replace(results_path)
        print(f"    {name} seed {seed}: " + ", ".join(f"{METRICS[m]} {scale(m) * v:.{digits(m)}f}"
                                                   for m, v in scores.items())
              + f" ({seconds / 60:.1f} min)", file=sys.stderr, flush=True)
    text, summaries = table(results, args, args.claims)
    print(text)
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    args.plots.mkdir(parents=True, exist_ok=True)
    for path in plot(summaries, args.claims, args.plots):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)


if __name__ == "__main__":
    main()
