"""Data-parallel personalization over torch.distributed (torchrun), and a batch of identities shared by ranks.

Launch with PyTorch's own launcher; nothing here schedules processes:

    torchrun --nproc_per_node 4 -m my3dgen_cli personalize photos/ --name ana           # one identity, 4 ranks
    torchrun --nproc_per_node 4 -m my3dgen_cli personalize --batch-file people.csv     # identities shared

`Dist` describes this process's place in the group (read from torchrun's RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR environment). One identity: every rank draws the same batch indices from
the same seeded generator and takes its shard; the adapter gradients are summed with one
all_reduce per step (each shard's loss weighted by its share of the batch), so all ranks stay
equal and equal one process with the same effective batch (up to float summation order). Only
rank 0 writes files. A batch file: identity i goes to rank i mod world size, each trained by one
rank with no collectives, with a seed derived from the identity's name, so the result does not
depend on which rank made it.
"""

from __future__ import annotations

import os
import signal
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from my3dgen_cli.errors import UserInputError

FAULT_ENV = "MY3DGEN_TEST_FAIL"  # "RANK:STEP" / "RANK:anchors:CHUNK" / "RANK:swap:0": that rank fails there (tests)
FAULT_SIGNAL_ENV = "MY3DGEN_TEST_FAIL_SIGNAL"  # KILL / INT: fail by that signal instead of an exception (tests)


@dataclass(frozen=True)
class Dist:
    """This process's rank, the group size and its device; world 1 = no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives run (a process group of more than one rank is up)."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def launched() -> bool:
    """True when started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env() -> Dist:
    """The rank and world size torchrun set (world 1 outside torchrun); starts no process group."""
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


def device_for(d: Dist, requested: torch.device) -> torch.device:
    """One GPU per rank: cuda -> cuda:LOCAL_RANK (what NCCL expects); other devices unchanged.

    Under torchrun an explicit cuda:N would put every rank on one GPU (NCCL refuses), and more
    ranks per machine than GPUs would fail inside CUDA: both are one-line errors here.
    """
    if requested.type != "cuda" or d.world <= 1:
        return requested
    if requested.index is not None:
        raise UserInputError(f"--device {requested} under torchrun: every rank would use that one GPU; "
                             "pass --device cuda (each rank takes cuda:LOCAL_RANK)")
    from my3dgen_cli.devices import check_gpu_index

    check_gpu_index(d.local_rank, f"rank {d.rank} (LOCAL_RANK {d.local_rank}, --nproc_per_node too large?)")
    return torch.device("cuda", d.local_rank)


def init_group(d: Dist, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join torchrun's process group: NCCL for CUDA devices, gloo otherwise. No-op for world 1."""
    if d.world <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=d.rank, world_size=d.world, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(d: Dist, device: torch.device) -> Iterator[Dist]:
    """init_group ... destroy_process_group, for a command's lifetime."""
    init_group(d, device)
    try:
        yield d
    finally:
        shutdown()


def shard(indices: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous share of a batch [B] (torch.tensor_split: sizes differ by at most one)."""
    if d.world == 1:
        return indices
    return torch.tensor_split(indices, d.world)[d.rank]


def sum_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """Sum each parameter's gradient over the ranks: one flat all_reduce (adapters are small).

    Each rank's loss is already weighted by its share of the global batch, so the sum is the
    gradient of the whole batch. A parameter without a gradient counts as zeros, so every rank
    joins the same call.
    """
    if not d.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of a small tensor over the ranks (loss terms for the log); the tensor itself when world 1."""
    if not d.active:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_(tensor: torch.Tensor, src: int, d: Dist) -> torch.Tensor:
    """In place: every rank gets rank `src`'s tensor."""
    if d.active:
        dist.broadcast(tensor, src)
    return tensor


def identity_seed(seed: int, name: str) -> int:
    """A per-identity seed: the same for a name whichever rank trains it (crc32, not Python's salted hash)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**31 - 1)


def fault_hook(step: int, d: Dist, stage: str = "train") -> None:
    """Test hook: with MY3DGEN_TEST_FAIL="R:K", rank R raises after its K-th training step; with
    "R:anchors:K", when it starts anchor chunk K (0-based); with "R:swap:0", when a finished identity
    is about to be swapped in. With MY3DGEN_TEST_FAIL_SIGNAL=KILL or INT it sends itself that signal
    there instead (a kill or a Ctrl-C at a known point)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, *where, at = spec.split(":")
    me = int(os.environ.get("RANK", d.rank))  # the launcher's rank (batch-file ranks train with world 1)
    if (where[0] if where else "train") == stage and int(rank) == me and step == int(at):
        how = os.environ.get(FAULT_SIGNAL_ENV)
        if how in ("KILL", "INT"):
            os.kill(os.getpid(), getattr(signal, f"SIG{how}"))
            return  # SIGINT: Python raises KeyboardInterrupt (or sets training's stop flag) right after this
        moment = {"anchors": f"at anchor chunk {step}", "swap": "before the swap"}.get(stage, f"after step {step}")
        raise RuntimeError(f"{FAULT_ENV}: rank {me} fails {moment} (test hook)")
