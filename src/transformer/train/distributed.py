"""The processes of one run: torchrun's ranks, their seeds and RNG states, and what rank 0
decides for all of them. One process is the world of size 1, where every helper here is a
no-op, so the loop reads the same with and without DDP."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from transformer.runtime import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def share(value: Any, d: Dist) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if d.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(*tensors: torch.Tensor, world: int) -> None:
    """Sum each tensor over the ranks, in place."""
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)


def highest(value: int, d: Dist, device: torch.device) -> int:
    """The largest ``value`` any rank holds, on every rank."""
    if d.world == 1:
        return value
    code = torch.tensor(value, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return int(code.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(d: Dist) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective under DDP)."""
    if d.world == 1:
        return [rng_state()]
    states: list = [None] * d.world
    dist.all_gather_object(states, rng_state())
    return states


def barrier(d: Dist) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if d.world > 1:
        dist.barrier()


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
