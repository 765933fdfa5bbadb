"""The control API's model of a GPU pool (``kvd.tiers.gpu``): what a client needs to map it.

Kept apart from ``kvd.core.protocol`` (which imports it into the lease and reserve answers) because it
describes a transport, not an operation: the bytes of a daemon-owned GPU allocation reach an engine
process through CUDA IPC (``kvd.core.gpu_ipc``), and this is the handle that crosses the socket.

A client maps each ``pool_id`` once and keeps it while the daemon lives (a restarted daemon's pool
has another id). The GPU is named by UUID, not index: two processes may number their devices
differently (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

# "cuda_ipc": torch's CUDA IPC (cudaIpcGetMemHandle and the reference counter torch keeps beside it).
# "in_process": the tests' stand-in, the pool tensor passed inside one process (``InProcessIpc``).
Transport = Literal["cuda_ipc", "in_process"]


class GpuPoolInfo(BaseModel):
    """One GPU pool of the daemon (one per tenant), as a client maps it."""

    model_config = ConfigDict(extra="forbid")

    pool_id: str
    device_uuid: str  # the GPU, as ``str(torch.cuda.get_device_properties(i).uuid)`` names it
    capacity_bytes: int
    transport: Transport
    # CUDA IPC (hex strings of torch's ``UntypedStorage._share_cuda_()``; empty for the stand-in)
    handle: str = ""
    storage_bytes: int = 0
    storage_offset: int = 0
    ref_counter: str = ""
    ref_counter_offset: int = 0
    event: str = ""
    event_sync: bool = False
