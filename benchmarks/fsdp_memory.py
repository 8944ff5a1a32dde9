"""Per-process training memory: DDP replicas vs FSDP shards (`train.parallel`), same global batch.

    .venv/bin/python benchmarks/fsdp_memory.py [--preset base] [--world 2] [--batch 4]
    python benchmarks/fsdp_memory.py --preset large --device cuda --world 8 --batch 32   # on GPUs

Each mode runs `--world` processes (gloo on CPU, nccl on CUDA) of the real trainer on demo
shards (`make demo` first): 2 warm-up steps, then `--steps` timed steps. Reported per rank
(rank 0): the bytes of parameters + gradients + AdamW state that the process holds (local
shards under FSDP), its peak memory (CUDA: max allocated; CPU: peak RSS, which also counts
Python, torch and the data), and seconds per step. DDP is what a user would otherwise run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent("""
    import json, os, resource, sys, time, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from mmae.schemas.config import TrainConfig
    from mmae.trainer.parallel import Distributed, parallelize
    from mmae.trainer.train import Trainer
    rank, world = int(sys.argv[1]), {world}
    device = torch.device({device!r}, rank) if {device!r} == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="file://{init}",
                            rank=rank, world_size=world)
    config = TrainConfig(data={data!r}, out={out!r}, batch_size={batch}, num_workers=0, image_size={size},
                         model={{"preset": {preset!r}}}, parallel={mode!r}, steps=100)
    env = Distributed(rank, world, rank if device.type == "cuda" else 0)
    trainer = Trainer(config, env)
    model = parallelize(trainer.model, env, config)
    batches = trainer.loader.steps(2 + {steps})
    for _ in range(2):
        trainer.train_step(model, next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range({steps}):
        trainer.train_step(model, next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / {steps}

    def local_bytes(tensor):
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    parameters = sum(local_bytes(p) for p in trainer.model.parameters())
    gradients = sum(local_bytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    optimizer = sum(local_bytes(value) for state in trainer.optimizer.state.values() for value in state.values()
                    if torch.is_tensor(value) and value.numel() > 1)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank == 0:
        print(json.dumps({{"state_mb": (parameters + gradients + optimizer) / 2**20, "params_mb": parameters / 2**20,
                          "peak_mb": peak / 2**20, "s_per_step": seconds}}), flush=True)
    dist.destroy_process_group()
    sys.stdout.flush(); os._exit(0)  # gloo's threads can abort interpreter teardown (pytorch#179291)
""")


def measure(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "worker.py"
        script.write_text(WORKER.format(root=str(ROOT), world=args.world, device=args.device, init=f"{folder}/init",
                                        data=args.data, out=f"{folder}/run", batch=args.batch, size=args.size,
                                        preset=args.preset, mode=mode, steps=args.steps))
        processes = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for rank in range(args.world)]
        outputs = [process.communicate() for process in processes]
        for process, (_, err) in zip(processes, outputs):
            if process.returncode != 0:
                sys.exit(f"{mode} worker failed:\n{err[-3000:]}")
        return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "build" / "demo" / "shards"))
    parser.add_argument("--preset", default="base")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        sys.exit(f"{args.data} has no manifest.json: run `make demo` (or mmae build) first")
    results = {mode: measure(mode, args) for mode in ("ddp", "fsdp")}
    print(f"preset {args.preset}, {args.world} processes x batch {args.batch}, {args.size}px, {args.device}; "
          f"per rank 0:")
    print(f"\n{'mode':<6} {'params+grads+AdamW MB':>22} {'of which params':>16} {'peak MB':>9} {'s/step':>8}")
    for mode, result in results.items():
        print(f"{mode:<6} {result['state_mb']:>22.0f} {result['params_mb']:>16.0f} {result['peak_mb']:>9.0f} "
              f"{result['s_per_step']:>8.2f}")
    ddp, fsdp = results["ddp"], results["fsdp"]
    print(f"\nratio fsdp / ddp: state {fsdp['state_mb'] / ddp['state_mb']:.2f}x, "
          f"peak {fsdp['peak_mb'] / ddp['peak_mb']:.2f}x, time per step {fsdp['s_per_step'] / ddp['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
