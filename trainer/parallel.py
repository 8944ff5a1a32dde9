"""Processes and how the model is spread over them: one `parallelize()` for DDP, FSDP and compile.

Model code is single-device; `init_distributed()` reads torchrun's environment, `shard_model()`
applies FSDP2 before the optimizer is built, `parallelize()` wraps for DDP and compiles blocks.
The small collectives the loop needs (`sum_over_ranks`, `agree_max`) live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from mmae.schemas.config import TrainConfig


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Host-side collectives (counts, stop requests) over gloo beside NCCL: agreeing on host values
    # then never waits for the GPU's queue. None: the default group (gloo on CPU) does both.
    control: Optional[object] = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")


def init_distributed() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before the process group, so NCCL binds the right GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    control = dist.new_group(backend="gloo") if torch.cuda.is_available() else None
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, control)


def close_distributed(env: Distributed) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model) -> None:
    """FSDP2 in place: every encoder and decoder block is its own unit (gathered just before it
    runs, freed after), the embeddings, heads and norms form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in [*model.blocks, *model.decoder_blocks]:
        fully_shard(block)
    fully_shard(model)


def parallelize(model, env: Distributed, config: TrainConfig) -> torch.nn.Module:
    """DDP (and optionally torch.compile) around single-device model code; an FSDP model
    (sharded by `shard_model` when the trainer was built) is returned as it is."""
    wrapped: torch.nn.Module = model
    if config.compile:
        # The blocks hold nearly all FLOPs and have regular shapes; the masking and packing code
        # around them is index bookkeeping that would only cause graph breaks.
        for block in [*model.blocks, *model.decoder_blocks]:
            block.compile(dynamic=True)
    if env.world_size > 1 and config.parallel == "ddp":
        device_ids = [env.local_rank] if torch.cuda.is_available() else None
        # Some parameters sit idle in some steps when a kind is absent (a zero share, a stage, MAE).
        missing_kind = min(config.mix.shares().values()) == 0 or not config.use_text or bool(config.stages)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=device_ids, find_unused_parameters=missing_kind)
    return wrapped


def sum_over_ranks(values: list[float], env: Distributed) -> list[float]:
    """Element-wise sums over ranks of host values (float64: counts up to 2**53 stay exact)."""
    if env.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=env.control)  # gloo: host tensors, no wait on the GPU
    return tensor.tolist()


def agree_max(value: float, env: Distributed) -> float:
    """The largest of every rank's host value: a decision all ranks take the same way."""
    if env.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=env.control)
    return float(tensor.item())


def agree_any(flag: torch.Tensor, env: Distributed) -> torch.Tensor:
    """A device flag set on any rank, on every rank; it stays on the device (nothing is read)."""
    if env.world_size == 1:
        return flag
    value = flag.to(torch.float32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value[0] > 0


def sum_device(values: torch.Tensor, env: Distributed) -> torch.Tensor:
    """Element-wise sums over ranks of a device tensor (for the logged steps' figures)."""
    if env.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(env: Distributed) -> None:
    if env.world_size > 1:
        dist.barrier()


def full_state(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the whole model. With FSDP every rank must call it (it
    gathers the shards) and rank 0 gets full CPU tensors: a checkpoint loadable anywhere."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    """The inverse of `full_state`: each rank keeps its shards of the full tensors."""
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
