"""Data parallelism through PyTorch's own engine: torchrun, torch.distributed, DDP.

A run is launched by torchrun (or ``vggnet train --nproc N``, which execs torchrun); every
process reads its rank from the environment torchrun sets. Without those variables the same
code runs as a single process and every collective here is the identity.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .settings import GRAD_COMPRESSIONS


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only this process writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """What torchrun told this process (RANK, WORLD_SIZE, LOCAL_RANK); single process if unset."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def restarted() -> bool:
    """True in a group that torchrun restarted after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun prepared: NCCL on GPUs, gloo on CPUs.

    ``timeout_s`` bounds every collective, so a hung or dead rank makes the others fail with
    an error (and torchrun restart the group) instead of waiting forever.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun keeps one store across restarts; the first attempt's addresses are still in it
    # and a restarted gloo group would dial the dead processes. Each attempt gets its own keys.
    store, rank, world = next(dist.rendezvous("env://", info.rank, info.world_size,
                                              timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"vggnet/attempt{attempt}/", store),
                            rank=rank, world_size=world, timeout=timeout)
    return info


def shutdown(drain: bool = False) -> None:
    """Leave the process group; ``drain=True`` after a run every rank finished normally.

    A gloo worker thread releases a finished collective's tensors after the caller has moved
    on, and a tensor made in Python then needs the GIL to be freed. If the interpreter is
    already finalizing by then, Python ends that thread and libstdc++ aborts the process
    ("terminate called without an active exception", SIGABRT at exit) after a run that
    succeeded; destroy_process_group does not join the threads. Draining is one last
    all-reduce on a tensor held here, waited for with the GIL released until the thread that
    ran it has let go of it, which also lets a thread still freeing an earlier collective
    take the GIL. Every rank must drain (it is a collective), so a failing run skips it.
    """
    if not dist.is_initialized():
        return
    if drain and dist.get_backend() == "gloo":
        t = torch.zeros(1)
        dist.all_reduce(t)
        deadline = time.monotonic() + 10.0
        while t._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    dist.destroy_process_group()


@contextmanager
def leave_group_after() -> Iterator[None]:
    """Leave the process group when the block ends: drained if it finished, at once if it raised."""
    try:
        yield
    except BaseException:
        shutdown()
        raise
    shutdown(drain=True)


def split_batch(global_batch: int, world_size: int, max_micro_batch: int | None) -> tuple[int, int]:
    """Global batch -> (per-rank micro-batch, accumulation steps), exactly.

    256 on 4 ranks with micro-batches of at most 32: each rank sees 64 images a step in 2
    micro-batches of 32. Uneven splits are refused: they would change the recipe silently.
    """
    if global_batch < 1 or global_batch % world_size:
        fit = max(1, global_batch // world_size) * world_size
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                         f"{world_size} processes; choose e.g. {fit}")
    per_rank = global_batch // world_size
    micro = per_rank if not max_micro_batch else min(per_rank, max_micro_batch)
    if per_rank % micro:
        divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= micro]
        raise ValueError(f"micro-batch {micro} does not divide the {per_rank} images each process "
                         f"takes per step (global batch {global_batch} / {world_size}); "
                         f"use --micro-batch {divisors[-1]}")
    return micro, per_rank // micro


def shard(n: int, info: DistInfo) -> range:
    """Indices of an n-item evaluation set for this rank: every item exactly once overall,
    no padding (unlike DistributedSampler, which repeats items to even out shards)."""
    return range(info.rank, n, info.world_size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity for one process). Counts and sums, never means, so
    the all-reduced metrics are exact for shards of unequal size."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(*flags: bool, device: torch.device | None = None) -> list[bool]:
    """Each flag OR-ed over all ranks in one collective: a non-finite loss on any rank, or a
    stop request (SIGTERM) on any rank, is acted on by every rank at the same step."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device, bucket_cap_mb: float = 25.0,
             compression: str = "none") -> nn.Module:
    """DistributedDataParallel with a tunable bucket size and optional bf16 gradient compression.

    VGG's 138M parameters (103M in fc6) make gradient exchange the bottleneck; bf16
    compression halves the bytes on the wire (gradients are summed in fp32 after decompress).
    """
    if not info.enabled:
        return model
    if compression not in GRAD_COMPRESSIONS:
        raise ValueError(f"unknown gradient compression {compression!r}; choose none, bf16 or fp16")
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
              bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True)
    if compression != "none":
        ddp.register_comm_hook(torch.bfloat16 if compression == "bf16" else torch.float16,
                               compress_hook)
    return ddp


def compress_hook(dtype, bucket):  # no annotations: DDP checks them and ours are strings
    """DDP communication hook: all-reduce the gradient bucket (dist.GradBucket) in ``dtype``,
    then back to fp32.

    PyTorch's own bf16 hook refuses gloo (CPU); this is the same algorithm for any backend.
    Dividing by the world size before the cast keeps the sum in range.
    """
    buffer = bucket.buffer()
    world = dist.get_world_size()
    compressed = buffer.to(dtype).div_(world)
    fut = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(f: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(f.value()[0])
        return buffer

    return fut.then(decompress)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value on every rank (e.g. the dataset scan, the chosen run folder)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


FAULT_ENV = "VGGNET_FAULT"  # "RANK:STEPS:ACTION", for the fault-tolerance tests
FAULT_ACTIONS = ("kill", "term", "nan")


def injected_fault(info: DistInfo, step: int) -> str | None:
    """Fault injection: ``VGGNET_FAULT=1:5:kill`` makes rank 1 die by SIGKILL when it starts
    step 5; ``term`` sends it SIGTERM (a preemption); ``nan`` returns "nan" so the caller
    poisons that step's loss. STEPS is one step or a range "3-6". Faults fire on torchrun's
    first attempt only (TORCHELASTIC_RESTART_COUNT=0), so a restarted group can finish."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    try:
        rank, steps, action = spec.split(":")
        first, _, last = steps.partition("-")
        rank, first, last = int(rank), int(first), int(last or first)
        if action not in FAULT_ACTIONS:
            raise ValueError
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must be 'RANK:STEP[-STEP]:ACTION' with ACTION one of "
                         f"{FAULT_ACTIONS}, got {spec!r}") from None
    if info.rank != rank or not first <= step <= last:
        return None
    if action in ("kill", "term"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)
    return action


def torchrun_command(train_args: list[str], nproc: int, nnodes: str = "1",
                     rdzv_endpoint: str | None = None, max_restarts: int = 0,
                     rdzv_id: str | None = None) -> list[str]:
    """The torchrun command line that runs ``vggnet train TRAIN_ARGS`` in ``nproc`` processes
    per node. One node: a private rendezvous on a free local port. Several nodes: the c10d
    rendezvous at ``rdzv_endpoint`` (host:port of any one node), same command on every node."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id or 'vggnet'}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "vggnet", "train", *train_args]


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")  # each takes a value


def without_launch_options(argv: list[str]) -> list[str]:
    """``vggnet train`` arguments minus the ones that only tell how to launch torchrun."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif a.split("=")[0] not in LAUNCH_OPTIONS:
            out.append(a)
    return out


def launch(train_args: list[str], nproc: int, nnodes: str = "1",
           rdzv_endpoint: str | None = None, max_restarts: int = 0) -> int:
    """Run ``vggnet train TRAIN_ARGS`` under torchrun in ``nproc`` processes per node (the
    launch options themselves are dropped); returns torchrun's exit code."""
    import subprocess

    cmd = torchrun_command(without_launch_options(list(train_args)), nproc, nnodes,
                           rdzv_endpoint, max_restarts)
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
