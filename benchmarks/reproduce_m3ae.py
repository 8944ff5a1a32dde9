"""Reproduction study on the demo corpus: does joint text make the *image* features better?

    .venv/bin/python benchmarks/reproduce_m3ae.py [--steps 2000] [--seeds 0] [--pool mean]

Needs the demo shards (`make demo`). Every run has the same preset, steps, batch size and
seed; only the recipe differs:
  (a) M3AE (paired + unpaired, text ratio 0.75) vs MAE (same images, use_text: false)
  (b) M3AE text mask ratio 0.15 / 0.5 / 0.75 / 0.9
  (c) cross masking alone, the MaskVLM config (cross + ITC + ITM) and the MoMo config (three
      stages of equal length, per-kind steps)
Each checkpoint is scored with `mmae eval probe` (linear probe on the shape label). Results
go to build/reproduce/results.json and a plot to docs/reproduce_m3ae.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "m3ae": ("configs/m3ae.yaml", []),
    "mae": ("configs/mae.yaml", []),
    "m3ae_text0.15": ("configs/m3ae.yaml", ["train.masking.text_ratio=0.15"]),
    "m3ae_text0.5": ("configs/m3ae.yaml", ["train.masking.text_ratio=0.5"]),
    "m3ae_text0.9": ("configs/m3ae.yaml", ["train.masking.text_ratio=0.9"]),
    "cross": ("configs/m3ae.yaml", ["train.masking.strategy=cross"]),
    "maskvlm": ("configs/maskvlm.yaml", []),
    "momo": ("configs/momo.yaml", []),
}


def stage_overrides(name: str, steps: int) -> list[str]:
    """MoMo's three stages share the same total steps as every other run."""
    if name != "momo":
        return []
    third = steps // 3
    return [f"train.stages.0.steps={third}", f"train.stages.1.steps={third}",
            f"train.stages.2.steps={steps - 2 * third}"]


def mmae(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mmae.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"mmae {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pool", choices=["cls", "mean"], default="mean")
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--out", default=str(ROOT / "build" / "reproduce"))
    args = parser.parse_args()
    data = ROOT / "build" / "demo" / "shards"
    if not (data / "manifest.json").exists():
        sys.exit("run `make demo` first (the study trains on build/demo/shards)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in args.seeds:
        for name in args.runs:
            key = f"{name}/seed{seed}"
            if key in results and results[key]["steps"] == args.steps:
                continue
            config, overrides = RUNS[name]
            run = out / name / f"seed{seed}"
            sets = [f"train.out={run}", f"train.steps={args.steps}", f"train.seed={seed}",
                    f"train.checkpoint_every={args.steps}", f"train.data={data}", *overrides,
                    *stage_overrides(name, args.steps)]
            started = time.perf_counter()
            mmae("train", "--config", config, *[item for value in sets for item in ("--set", value)])
            minutes = (time.perf_counter() - started) / 60
            checkpoint = run / "checkpoints" / f"step-{args.steps:07d}.pt"
            probe = json.loads(mmae("eval", "probe", "--checkpoint", str(checkpoint), "--data", str(data),
                                    "--json", "--pool", args.pool))
            last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
            results[key] = {"steps": args.steps, "seed": seed, "pool": args.pool, "top1": probe["top1"],
                            "n_test": probe["n_test"], "image_loss": last["image_loss"], "minutes": round(minutes, 1)}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{key:<22} top-1 {probe['top1']:.3f}  image loss {last['image_loss']:.4f}  ({minutes:.1f} min)",
                  flush=True)
    plot(results, ROOT / "docs" / "reproduce_m3ae.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in RUNS if any(key.startswith(name + "/") for key in results)]
    means = [sum(v["top1"] for k, v in results.items() if k.startswith(name + "/")) /
             max(1, sum(1 for k in results if k.startswith(name + "/"))) for name in names]
    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    axes.bar(names, [100 * m for m in means], color=["#4878cf" if n != "mae" else "#999999" for n in names])
    axes.axhline(20, color="#d62728", linestyle="--", label="chance (5 shapes)")
    axes.set_ylabel("linear probe top-1 (%)")
    axes.legend()
    plt.setp(axes.get_xticklabels(), rotation=20, ha="right")
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
