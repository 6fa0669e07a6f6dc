import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vggnet
from vggnet import distributed as D


def test_split_batch():
    assert D.split_batch(256, 1, None) == (256, 1)
    assert D.split_batch(256, 4, 32) == (32, 2)
    assert D.split_batch(8, 2, 8) == (4, 1)
    with pytest.raises(ValueError,
                       match="global batch 10 must be a positive multiple of the 4 processes"):
        D.split_batch(10, 4, None)
    with pytest.raises(ValueError,
                       match=r"micro-batch 48 does not divide the 64 .* use --micro-batch 32"):
        D.split_batch(128, 2, 48)


def test_shards_cover_every_item_once():
    for n, world in [(10, 3), (7, 2), (2, 4)]:
        seen = sorted(i for r in range(world) for i in D.shard(n, D.DistInfo(r, world)))
        assert seen == list(range(n))


def test_single_process_collectives_are_identity():
    assert D.agree(True, False) == [True, False]
    assert D.all_reduce_sum(torch.tensor([3.0])).item() == 3.0
    m = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(m, D.DistInfo(), torch.device("cpu")) is m


def _tiny():
    return vggnet.create_model("A", num_classes=4, width=0.0625, crop_size=32, dropout=0.0, seed=0)


def _steps(model, x, y, opt, info, micro):
    for _ in range(3):
        opt.zero_grad()
        for i in range(0, len(x), micro):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + micro]), y[i:i + micro],
                                                     reduction="sum")
            (loss / len(x)).backward()
        opt.step()


def _worker(rank, world, store, out, compression):
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    info = D.DistInfo(rank, world, rank)
    with D.leave_group_after():
        assert D.agree(rank == 1, False) == [True, False]
        assert D.all_reduce_sum(torch.tensor([float(rank + 1)])).item() == world * (world + 1) / 2
        assert D.broadcast_object({"r": rank}, info) == {"r": 0}
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
        model = D.wrap_ddp(_tiny(), info, torch.device("cpu"), bucket_cap_mb=1,
                           compression=compression)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        micro, accum = D.split_batch(8, world, 2)
        mine = x[rank::world], y[rank::world]
        for _ in range(3):  # DDP averages gradients over ranks: per-rank mean == global mean
            opt.zero_grad()
            for i in range(accum):
                sl = slice(i * micro, (i + 1) * micro)
                ctx = model.no_sync() if i < accum - 1 else torch.enable_grad()
                with ctx:
                    loss = torch.nn.functional.cross_entropy(model(mine[0][sl]), mine[1][sl],
                                                             reduction="sum")
                    (loss / (micro * accum)).backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), out)


@pytest.mark.parametrize("compression,tol", [("none", 1e-6), ("bf16", 2e-3), ("fp16", 1e-3)])
def test_two_process_ddp_equals_one_process(tmp_path, compression, tol):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out), compression), nprocs=2, join=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    ref = _tiny()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    _steps(ref, x, y, opt, None, 8)
    got = torch.load(out, weights_only=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=tol, rtol=tol, msg=k)
    assert not dist.is_initialized()


def test_fault_injection_spec(monkeypatch):
    monkeypatch.setenv(D.FAULT_ENV, "1:x:kill")
    with pytest.raises(ValueError, match="'RANK:STEP\\[-STEP\\]:ACTION'.*got '1:x:kill'"):
        D.injected_fault(D.DistInfo(1, 2), 3)
    monkeypatch.setenv(D.FAULT_ENV, "1:2-4:nan")
    faults = [D.injected_fault(D.DistInfo(1, 2), k) for k in range(1, 6)]
    assert faults == [None, "nan", "nan", "nan", None]
    assert D.injected_fault(D.DistInfo(0, 2), 3) is None  # other rank: nothing happens
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert D.injected_fault(D.DistInfo(1, 2), 3) is None  # restarted group: nothing happens


def test_torchrun_command():
    one = D.torchrun_command(["--data", "d"], nproc=2, max_restarts=3)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                       "--max-restarts=3", "--standalone", "-m", "vggnet", "train", "--data", "d"]
    multi = D.torchrun_command([], nproc=1, nnodes="2", rdzv_endpoint="127.0.0.1:29400")
    assert "--rdzv-endpoint=127.0.0.1:29400" in multi and "--standalone" not in multi
