"""Disk cache for tensors that do not depend on trained weights (pixels, frozen features).

Files are safetensors, written atomically; the key must name everything that changes the value.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from harness.paths import cache_dir


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cached_tensor(kind: str, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    path = cache_dir() / kind / f"{name}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["value"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"value": value.detach().cpu().contiguous()}, tmp)
    os.replace(tmp, path)
    return value
