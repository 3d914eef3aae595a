"""What a run costs beyond its time: its own peak memory and how busy the machine was.

Memory is the run's own: on CUDA the allocator's peak over the run (`max_memory_allocated` after a
reset: the weights, activations and caches the run holds on the device); on CPU the rise of the
process's resident memory over the run (Linux's high-water mark, reset at the start, minus the
resident size at the start), since the process also holds the interpreter, the libraries and earlier
runs' caches. Where the high-water mark cannot be reset (not Linux) the figure is the process's
peak so far, and its basis says so.

Load is the 1-minute load average per core at the run's end (1.0: every core busy; the sweep's own
threads count), so a time measured on a busy machine can be told from a slow method.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

CUDA_BASIS = "cuda max allocated"
CPU_BASIS = "cpu resident increase"
PROCESS_BASIS = "cpu process peak"


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class MemoryWindow:
    """Opened at a run's start (`open_window`); `peak_mb()` at its end."""

    device: str
    basis: str
    start_mb: float = 0.0

    def peak_mb(self) -> float:
        if self.basis == CUDA_BASIS:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.basis == CPU_BASIS:
            high = _status_mb("VmHWM")
            if high is not None:
                return max(0.0, high - self.start_mb)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def open_window(device: str) -> MemoryWindow:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return MemoryWindow(device, CUDA_BASIS)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        return MemoryWindow(device, PROCESS_BASIS)
    start = _status_mb("VmRSS")
    return MemoryWindow(device, CPU_BASIS, start) if start is not None else MemoryWindow(device, PROCESS_BASIS)


def machine_load() -> float | None:
    """1-minute load average per core, or None where the system does not report one."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None
