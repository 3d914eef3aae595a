"""Timers that mean the same on a GPU and a CPU: every bracket synchronises the device first."""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sections:
    """`with sections("text"): ...` adds the bracket's wall time (device synchronised at both ends)
    to `totals["text"]`. Synchronising removes CPU/GPU overlap, so throughput is measured in a
    separate pass without sections; the split comes from this one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.totals[name] += time.perf_counter() - t0


def timed(device: torch.device, fn, *args, **kwargs) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since `reset_peak` (CUDA); the process's peak RSS (CPU, never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
