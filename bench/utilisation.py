"""Vision tower forward + backward as a fraction of the GPU's peak: the issue's "40 % of bf16 peak".

FLOPs of one adapted (CLIP-LoRA) vision forward + backward on a batch are counted by torch's own
FlopCounterMode (matmuls and convolutions, which is what a peak figure counts), then the same step
is timed; achieved TFLOP/s over the device's dense bf16 peak is the utilisation.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import sync
from harness.backbones import Backbone
from methods.lora import adapted_copy, lora_factory

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def vision_utilisation(backbone: Backbone, batch: int, steps: int, precision: str, peak: float | None) -> dict:
    device = backbone.device
    model, params = adapted_copy(backbone.model, lora_factory(2, 1.0, 0.25), ("vision",), ("q", "k", "v"))
    model.train()
    size = backbone.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model.encode_image(x).float()
        out.square().mean().backward()
        for p in params:
            p.grad = None

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    tflops = flops / seconds / 1e12
    return {"batch": batch, "gflop_per_step": flops / 1e9, "step_s": seconds, "tflops": tflops,
            "peak_tflops": peak, "peak_fraction": tflops / peak if peak else None}
