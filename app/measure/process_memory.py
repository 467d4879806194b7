"""Process accounting for the benchmark: resident memory of a process and its descendants (psutil)."""

from __future__ import annotations

import os

import psutil

MIB = 2**20


def tree_rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process and every process below it (a Triton server's backend stubs), MiB.
    Processes that end while being read are skipped."""
    try:
        root = psutil.Process(pid or os.getpid())
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / MIB


def rss_mib() -> float:
    """Resident memory of this process alone, MiB."""
    return psutil.Process().memory_info().rss / MIB


def device_used_mib() -> float:
    """GPU memory in use on the current device, by every allocator (TensorRT's too); 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / MIB
