"""Check on a GPU (no kvd import: the device's Python lacks pydantic) that pools allocated the way
``kvd.core.gpu_ipc.CudaIpc.allocate`` does (each in a private ``torch.cuda.MemPool``) get CUDA IPC
handles of their own, and that another process opens such a handle and reads and writes the pool.
Before: two 4 MiB pools from the default allocator shared one handle (audit 11). Writes a JSON to $OUT."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.multiprocessing as mp

MIB = 1 << 20


def allocate_private(nbytes: int, keep: list) -> torch.Tensor:
    pool = torch.cuda.MemPool()
    keep.append(pool)
    with torch.cuda.use_mem_pool(pool, device=torch.device("cuda", 0)):
        return torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")


def handle(t: torch.Tensor) -> tuple[bytes, int]:
    """(IPC handle, offset of the tensor's storage in the allocation) as torch shares it."""
    _, h, _, offset, *_ = t.untyped_storage()._share_cuda_()
    return h, offset


def child(q_in, q_out) -> None:
    t = q_in.get()  # rebuilt from its IPC handle in this process
    q_out.put(int(t[:16].sum().item()))
    t[16:32] = 7
    torch.cuda.synchronize()
    q_out.put("written")


def kvd_child(info_json: str, q_out) -> None:
    from kvd.core.gpu_ipc import CudaIpc
    from kvd.core.protocol_gpu import GpuPoolInfo

    pool = CudaIpc(0).open(GpuPoolInfo.model_validate_json(info_json))
    q_out.put(int(pool[:8].sum().item()))
    pool[8:16] = 5
    torch.cuda.synchronize()
    q_out.put("written")


def kvd_check(out: dict) -> None:
    """kvd's own ``CudaIpc``: three pools (as three tenants'), their handles, and another process
    opening one by the ``GpuPoolInfo`` a client is answered with."""
    from kvd.core.gpu_ipc import CudaIpc

    ipc = CudaIpc(0)
    pools = [ipc.allocate(n) for n in (4 * MIB, 4 * MIB, 512 * 1024)]
    infos = [ipc.export(f"p{i}", t) for i, t in enumerate(pools)]
    out["kvd_distinct_handles"] = len({i.handle for i in infos}) == len(infos)
    pools[1][:8] = 2
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    q_out = ctx.Queue()
    proc = ctx.Process(target=kvd_child, args=(infos[1].model_dump_json(), q_out))
    proc.start()
    out["kvd_child_read_sum"] = q_out.get(timeout=120)
    out["kvd_child_wrote"] = q_out.get(timeout=120)
    proc.join(60)
    out["kvd_parent_sees_child_write"] = bool((pools[1][8:16] == 5).all().item())


def main() -> None:
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    for size in (512 * 1024, 4 * MIB, 12 * MIB):
        a, b = (torch.empty(size, dtype=torch.uint8, device="cuda:0") for _ in range(2))
        out[f"default_same_handle_{size}"] = handle(a)[0] == handle(b)[0]
        keep: list = []
        p, q = allocate_private(size, keep), allocate_private(size, keep)
        hp, hq = handle(p), handle(q)
        out[f"private_same_handle_{size}"] = hp[0] == hq[0]
        out[f"private_offsets_{size}"] = [hp[1], hq[1]]
        del a, b
    keep = []
    pool = allocate_private(64 * MIB, keep)
    pool[:16] = 3
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=child, args=(q_in, q_out))
    proc.start()
    q_in.put(pool)
    out["child_read_sum"] = q_out.get(timeout=120)
    out["child_wrote"] = q_out.get(timeout=120)
    proc.join(60)
    out["parent_sees_child_write"] = bool((pool[16:32] == 7).all().item())
    try:
        kvd_check(out)
    except ImportError as e:  # kvd's dependencies missing on this host: the torch-level check stands alone
        out["kvd_check"] = f"skipped: {e}"
    out["ok"] = (out["child_read_sum"] == 48 and out["parent_sees_child_write"]
                 and not any(v for k, v in out.items() if k.startswith("private_same_handle"))
                 and out.get("kvd_distinct_handles", True) and out.get("kvd_child_read_sum", 16) == 16
                 and out.get("kvd_parent_sees_child_write", True))
    print(json.dumps(out, indent=1))
    dest = os.environ.get("OUT")
    if dest:
        with open(os.path.join(dest, "gpu_ipc_mempool.json"), "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
