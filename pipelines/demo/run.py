"""`mmae demo` (what `make demo` runs): the whole data path on the bundled synthetic corpus.

1. generate the demo corpus under OUT/raw (deterministic, a few seconds);
2. serve it on a loopback HTTP server, so images really go through the downloader;
3. `mmae build` (the real CLI, as a subprocess) with base URLs pointing at that server and the
   private-address guard opened for 127.0.0.1 only;
4. print the build report;
5. `mmae validate` and `mmae stats --html` on the result;
6. `mmae train` of the `tiny` preset on those shards (a couple of minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .corpus import generate
from .serve import serve_directory


def run_demo(out: str, config_path: str = "pipeline.yaml", beam_args: Optional[list[str]] = None,
             pairs: int = 3000, train_steps: Optional[int] = None) -> int:
    """`train_steps`: None = the config's train.steps; 0 = stop after the data steps."""
    out_dir = Path(out)
    raw = out_dir / "raw"
    shards = out_dir / "shards"
    print(f"[demo] 1/5 generating the demo corpus in {raw}", flush=True)
    counts = generate(raw, pairs=pairs, images=max(1, pairs // 3), texts=pairs)
    print(f"[demo]     {counts}", flush=True)
    with serve_directory(str(raw)) as base_url:
        print(f"[demo] 2/5 serving {raw} at {base_url}", flush=True)
        command = [
            sys.executable, "-m", "mmae.cli", "build",
            "--config", config_path,
            "--overwrite",
            "--set", f"data.output={shards}",
            "--set", f"data.sources.0.path={raw / 'paired.jsonl'}",
            "--set", f"data.sources.0.base_url={base_url}",
            "--set", f"data.sources.1.path={raw / 'images_only.jsonl'}",
            "--set", f"data.sources.1.base_url={base_url}",
            "--set", f"data.sources.2.path={raw / 'text_only.jsonl'}",
            "--set", "data.download.allowed_networks=[127.0.0.1/32]",
        ]
        if beam_args:
            command += ["--", *beam_args]
        print("[demo] 3/5 build: " + " ".join(command[2:]), flush=True)
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        print(f"[demo] build failed with exit code {completed.returncode}", file=sys.stderr)
        return completed.returncode
    report = json.loads(completed.stdout)
    print("[demo] build report:")
    print(f"  read {report['read']} rows in {report['wall_time_s']} s ({report['images_per_s']} images/s)")
    for kind, count in report["written"].items():
        print(f"  wrote {count:6d} {kind} rows")
    print(f"  rejected {report['rejected']} rows: {json.dumps(report['reasons'])}")
    print(f"  balanced (read = written + rejected per source): {report['balanced']}")
    print(f"[demo] shards, manifest.json and build_report.json are in {shards}")

    print("[demo] 4/5 validate and inspect", flush=True)
    validate = subprocess.run([sys.executable, "-m", "mmae.cli", "validate", str(shards)])
    if validate.returncode != 0:
        return validate.returncode
    report = out_dir / "report.html"
    stats = subprocess.run([sys.executable, "-m", "mmae.cli", "stats", str(shards), "--html", str(report)])
    if stats.returncode != 0:
        return stats.returncode
    print(f"[demo] HTML report (tables, plots, sample gallery): {report}")

    if train_steps == 0:
        return 0
    run = out_dir / "run"
    _replace_earlier_run(run)
    print(f"[demo] 5/5 training the tiny preset on {shards} for a couple of minutes", flush=True)
    command = [sys.executable, "-m", "mmae.cli", "train", "--config", config_path,
               "--set", f"train.data={shards}", "--set", f"train.out={run}"]
    if train_steps is not None:
        command += ["--set", f"train.steps={train_steps}"]
    train = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if train.returncode != 0:
        return train.returncode
    last = json.loads(train.stdout.strip().splitlines()[-1]) if train.stdout.strip() else {}
    if "loss" in last:
        print(f"[demo] trained to step {last['step']}: loss {last['loss']:.4f} (image {last['image_loss']:.4f}, "
              f"text {last['text_loss']:.4f}, unpaired text {last['unpaired_text_loss']:.4f}), "
              f"{last['samples_per_s']:.0f} samples/s")
    print(f"[demo] metrics: {run / 'metrics.jsonl'}; checkpoints: {run / 'checkpoints'}")
    print("[demo] next, try:")
    print(f"  mmae eval probe --checkpoint {run} --data {shards}            # linear probe on image features")
    print(f"  mmae eval reconstruct --checkpoint {run} --data {shards} --out {out_dir / 'reconstruction.png'}")
    print(f"  mmae export --checkpoint {run} --format timm --out {out_dir / 'timm-encoder'}   # for timm")
    return 0


def _replace_earlier_run(run: Path) -> None:
    """The demo trains afresh each time; an earlier demo run in its folder is replaced, and said so."""
    if not run.exists():
        return
    checkpoints = sorted((run / "checkpoints").glob("step-*.pt")) if (run / "checkpoints").is_dir() else []
    newest = f", newest checkpoint {checkpoints[-1].name}" if checkpoints else ""
    print(f"[demo] replacing the earlier demo run in {run} ({len(checkpoints)} checkpoint(s){newest}); to keep "
          "a run, train it with another train.out", flush=True)
    shutil.rmtree(run)
