"""torch.distributed for `torchrun` runs: joining the process group, and waiting for rank 0."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# ranks wait for rank 0 at barriers while it captures calibration or evaluates: allow hours, not gloo's 30 min
DIST_TIMEOUT = datetime.timedelta(hours=6)


def init_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) join the process group: nccl on CUDA (one GPU
    per local rank), gloo on CPU. Returns (this rank's device, whether this call initialised the group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return device, True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
