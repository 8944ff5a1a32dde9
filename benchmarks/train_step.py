"""Training-step throughput: packed rows vs the padded baseline, on a realistic mixed batch.

    .venv/bin/python benchmarks/train_step.py [--preset tiny] [--batch 64] [--steps 20]
    python benchmarks/train_step.py --preset base --device cuda --batch 256     # on a GPU

The batch comes from real demo shards (`make demo` first): paired + image-only + text-only in
`train.mix` proportions, masked at 0.75/0.75, so sequence lengths vary as in training. Each
layout runs in a fresh process (forward + backward + AdamW step), warm-up excluded:
  CPU:  packed (rows packed; attention is one SDPA call over the sequences spread on a padded
        grid) vs padded (every op on [B, L] rows, SDPA + key-padding mask)
  CUDA: also xformers memory_efficient_attention on packed rows (BlockDiagonalMask), bf16
        autocast, and model FLOPs utilisation against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fresh_process import last_line  # noqa: E402

STEP = textwrap.dedent("""
    import json, resource, sys, time, torch
    sys.path.insert(0, {root!r})
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.loader import MixedLoader
    from mmae.trainer.model import build_model, PRESETS
    device = torch.device({device!r})
    config = TrainConfig(data={data!r}, batch_size={batch}, num_workers=0, image_size={size}, max_text_tokens=64)
    from mmae.trainer.step_inputs import StepSpec
    from mmae.trainer.model import PRESETS as _P
    spec = StepSpec(num_patches=({size} // _P[{preset!r}].patch_size) ** 2, masking=config.masking, seed=0)
    # What the loader's workers hand the step: each batch's inputs and layout, moved to the device.
    parts = [part.to(device) for b in MixedLoader(config, step=spec).batches(4) for part in b.parts]
    vocab = json.load(open({data!r} + "/manifest.json"))["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    model = build_model({preset!r}, vocab, {size}, 64).to(device)
    model.set_attention({backend!r}, {layout!r})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mmae train
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    def step(index):
        part = parts[index % len(parts)]
        with autocast:
            out = model(part.inputs, part.layout)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
        return out
    for index in range(3):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter(); encoder = decoder = 0
    for index in range({steps}):
        out = step(index); encoder += out.encoder_tokens; decoder += out.decoder_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    size = PRESETS[{preset!r}]
    flops = 6 * 12 * (encoder * size.dim**2 * size.depth + decoder * size.decoder_dim**2 * size.decoder_depth)
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(json.dumps({{"tokens_per_s": (encoder + decoder) / seconds, "steps_per_s": {steps} / seconds,
                      "tflops": flops / seconds / 1e12, "memory_mb": memory,
                      "encoder_tokens_per_step": encoder / {steps}}}))
""")


def measure(**params) -> dict:
    return json.loads(last_line(STEP.format(root=str(ROOT), **params)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "build" / "demo" / "shards"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        sys.exit(f"{args.data} has no manifest.json: run `make demo` (or mmae build) first")
    runs = [("padded", "sdpa", "padded")]
    runs.append(("packed", "xformers" if args.device == "cuda" else "sdpa", "packed"))
    if args.device == "cuda":
        runs.append(("packed (SDPA, reference)", "sdpa", "packed"))
    common = dict(data=args.data, preset=args.preset, batch=args.batch, size=args.size, steps=args.steps,
                  device=args.device)
    results = {name: measure(backend=backend, layout=layout, **common) for name, backend, layout in runs}
    print(f"preset {args.preset}, batch {args.batch} (mixed, masked 0.75/0.75), {args.size}px, {args.device}, "
          f"{args.steps} timed steps; {results['padded']['encoder_tokens_per_step']:.0f} encoder tokens/step")
    print(f"\n{'layout':<28} {'tokens/s':>10} {'steps/s':>8} {'TFLOP/s':>8} {'peak MB':>8}")
    for name, result in results.items():
        print(f"{name:<28} {result['tokens_per_s']:>10.0f} {result['steps_per_s']:>8.2f} "
              f"{result['tflops']:>8.3f} {result['memory_mb']:>8.0f}")
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"\nratio packed / padded: {ratio:.2f}x tokens/s")
    if args.device == "cuda":
        print(f"MFU (packed): {results['packed']['tflops'] / args.peak_tflops:.1%} of {args.peak_tflops} TFLOP/s")


if __name__ == "__main__":
    main()
