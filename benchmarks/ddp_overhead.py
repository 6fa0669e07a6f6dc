"""Communication overhead of data-parallel VGG training, measured in one run.

Two processes (gloo over loopback on a CPU machine; run it on GPUs with --device cuda and
NCCL is used) train the same net. Each configuration's step time is compared with the same
step without DDP (every process computing alone, so compute contention is identical):

    overhead = step(DDP config) - step(no DDP)

VGG's 138M parameters (103M in fc6) make the gradient all-reduce the bottleneck; the rows show
what the bucket size and bf16 gradient compression change. Usage:

    python benchmarks/ddp_overhead.py [--model D] [--batch 1] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vggnet import create_model
from vggnet import distributed as D

CONFIGS = [("no DDP", None, "none"), ("DDP fp32, 25 MiB buckets", 25.0, "none"),
           ("DDP fp32, 100 MiB buckets", 100.0, "none"),
           ("DDP bf16 compression, 25 MiB", 25.0, "bf16")]


def _worker(rank: int, world: int, store: str, a: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, a.threads))
    dist.init_process_group("gloo" if a.device == "cpu" else "nccl", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    device = torch.device(a.device if a.device == "cpu" else f"cuda:{rank}")
    info = D.DistInfo(rank, world, rank)
    crop = 64 if a.quick else 224
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.batch, 3, crop, crop, generator=g).to(device)
    y = torch.randint(0, 1000, (a.batch,), generator=g).to(device)
    nets = {}
    for name, bucket, comp in CONFIGS:
        model = create_model(a.model, width=0.25 if a.quick else 1.0, crop_size=crop, seed=0)
        model = model.to(device)
        nets[name] = D.wrap_ddp(model, info, device, bucket, comp) if bucket else model
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in nets.items()}
    times: dict[str, list[float]] = {n: [] for n in nets}
    for rep in range(a.repeats + 1):  # the first round warms up
        for name, net in nets.items():  # interleaved, so load changes hit every config alike
            dist.barrier()
            t = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opts[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            if rep:
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        params = sum(p.numel() for p in nets["no DDP"].parameters())
        out.update({"params": params, **{n: statistics.median(v) for n, v in times.items()}})
    D.shutdown(drain=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="D")
    p.add_argument("--batch", type=int, default=1, help="images per process per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="width 1/4, crop 64 (a smoke run)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, f"{tmp}/store", a, out), nprocs=2, join=True)
        out = dict(out)
    base = out["no DDP"]
    quick = " (quick: width 1/4, crop 64)" if a.quick else ""
    print(f"VGG {a.model}{quick}, {out['params']:,} parameters, "
          f"2 processes x batch {a.batch}, {a.device}, median of {a.repeats} interleaved steps")
    print(f"{'configuration':<30} {'step s':>8} {'overhead s':>11} {'vs no DDP':>10}")
    for name, *_ in CONFIGS:
        print(f"{name:<30} {out[name]:>8.3f} {out[name] - base:>11.3f} {out[name] / base:>9.2f}x")


if __name__ == "__main__":
    main()
