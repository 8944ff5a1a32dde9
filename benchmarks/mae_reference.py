"""An image-only MAE training step: mmae's model vs facebookresearch/mae's `MaskedAutoencoderViT`.

    git clone https://github.com/facebookresearch/mae /tmp/mae        # the reference (not shipped)
    make interop-env                                                  # timm lives in .venv-timm
    .venv-timm/bin/python benchmarks/mae_reference.py --mae /tmp/mae [--steps 8] [--repeats 3]

Both sides run in the same interpreter build (the reference imports timm, whose torchvision pins
its own torch, so both run in `.venv-timm`; mmae's trainer is pure Python over torch and is
imported from this checkout), each in a fresh process, alternating, median of `--repeats`:
forward + backward + AdamW step on CPU (mmae's AdamW fused, as `mmae train` runs it, unless
`--optimizer foreach`, the reference's) at 224 px, 16 px patches, 75% of patches masked,
per-patch normalised pixel loss (`norm_pix_loss`), the same encoder/decoder widths and depths.
mmae's masks and layout are made by its loader's workers; the reference draws its masks in
the forward (`argsort` of noise). The row "mmae, layout in the step" builds the layout in
the timed loop too, for an upper bound on what mmae's step costs with no loader help.

Two shims let the 2022 reference run on current libraries (they change no arithmetic): timm's
`Block` no longer takes `qk_scale`, and NumPy no longer has `np.float`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = {  # name: (batch, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads)
    "192x6 encoder, batch 32": (32, 192, 6, 3, 128, 2, 4),
    "64x2 encoder, batch 256": (256, 64, 2, 4, 64, 1, 4),
}

COMMON = """
import json, sys, time, torch
torch.manual_seed(0)
batch, dim, depth, heads, ddim, ddepth, dheads = {size}
images = torch.randn(batch, 3, 224, 224)
def timed(step, steps):
    for index in range(2):
        step(index)
    started = time.perf_counter()
    for index in range(steps):
        step(index)
    print(json.dumps({{"images_per_s": batch * steps / (time.perf_counter() - started)}}))
"""

REFERENCE = COMMON + """
from functools import partial
import numpy as np
np.float = float  # util/pos_embed.py predates NumPy 1.24
import timm.models.vision_transformer as vit
_Block = vit.Block
class Block(_Block):
    def __init__(self, *args, qk_scale=None, **kwargs):  # timm dropped qk_scale (it was unused at None)
        super().__init__(*args, **kwargs)
vit.Block = Block
sys.path.insert(0, {mae!r})
from models_mae import MaskedAutoencoderViT
model = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                             decoder_embed_dim=ddim, decoder_depth=ddepth, decoder_num_heads=dheads, mlp_ratio=4,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
def step(index):
    loss, _, _ = model(images, mask_ratio=0.75)
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
timed(step, {steps})
"""

MMAE = COMMON + """
sys.path.insert(0, {root!r})
from mmae.trainer.batch import Inputs
from mmae.schemas.config import MaskingConfig
from mmae.trainer.model import ModelSize, MultimodalMAE
size = ModelSize(dim=dim, depth=depth, heads=heads, decoder_dim=ddim, decoder_depth=ddepth, decoder_heads=dheads,
                 patch_size=16)
model = MultimodalMAE(size, vocab_size=8, image_size=224, max_text_tokens=8, norm_pix_loss=True)
model.set_attention("sdpa", {layout!r})
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused={fused})
inputs = Inputs.of_images(images, [f"image-{{index}}" for index in range(batch)])
masking = MaskingConfig(image_ratio=0.75)
prepared = [model.layout(inputs, masking, seed) for seed in range({steps} + 2)]  # what the loader hands over
def step(index):
    layout = model.layout(inputs, masking, index) if {in_step} else prepared[index]
    losses = model(inputs, layout)
    losses.loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
timed(step, {steps})
"""


def run(code: str) -> float:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae", required=True, help="a checkout of facebookresearch/mae (holds models_mae.py)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", default="padded", choices=["padded", "packed"])
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                        help="mmae's AdamW: fused (what `mmae train` uses) or foreach (the reference's)")
    args = parser.parse_args()
    if not (Path(args.mae) / "models_mae.py").is_file():
        sys.exit(f"{args.mae}: no models_mae.py there (clone facebookresearch/mae)")
    print(f"{'sizes (224 px, 16 px patches, 75% masked)':<34} {'reference img/s':>16} {'mmae img/s':>11} "
          f"{'ratio':>6} {'mmae, layout in the step':>25}")
    for name, size in SIZES.items():
        runs = {"reference": [], "mmae": [], "in_step": []}
        for _ in range(args.repeats):
            runs["reference"].append(run(REFERENCE.format(size=size, steps=args.steps, mae=args.mae)))
            for key, in_step in (("mmae", False), ("in_step", True)):
                runs[key].append(run(MMAE.format(size=size, steps=args.steps, root=str(ROOT), layout=args.layout,
                                                 in_step=in_step, fused=args.optimizer == "fused")))
        reference, ours, in_step = (statistics.median(runs[key]) for key in ("reference", "mmae", "in_step"))
        print(f"{name:<34} {reference:>16.1f} {ours:>11.1f} {ours / reference:>5.2f}x "
              f"{in_step:>18.1f} ({in_step / reference:.2f}x)")


if __name__ == "__main__":
    main()
