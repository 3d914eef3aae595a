"""The benchmark (bench/) and the speed paths it measures: the CLI's quick mode, the reference-style
loop's model, the deferred finiteness check, the device-resident few-shot originals and their cap."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import methods.base as base
from harness.backbones import Backbone, build_tiny
from harness.data.images import decode_items
from harness.data.readers import Item
from harness.errors import DivergedError
from methods.base import FiniteGuard, ImageSet, Task
from methods.lora import adapted_copy, adapted_modules, lora_factory

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_ends_with_json(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--out", str(tmp_path / "b.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["speedup_vs_reference"] > 0
    assert summary["vision_tflops"]["tiny"] > 0 and summary["vision_peak_fraction"]["tiny"] is None  # no peak known on CPU
    assert summary["harness_train_images_per_s"] > 0 and summary["reference_train_images_per_s"] > 0
    assert "GradScaler disabled" in summary["reference_precision"]  # CPU: fp32, said so
    full = json.loads((tmp_path / "b.json").read_text())
    methods = {(r["loop"], r["method"]) for r in full["runs"]}
    assert {("harness", m) for m in ("zero_shot", "coop", "tip_adapter", "tip_adapter_f", "clip_lora", "block_lora")} <= methods
    assert ("reference", "clip_lora") in methods
    assert time.perf_counter() - t0 < 90


@torch.no_grad()
def test_reference_model_is_the_same_function_as_the_harness_lora():
    """Materialised B @ A (reference) and factored (x A^T) B^T (harness) agree for the same A, B."""
    from bench.reference import reference_model

    torch.manual_seed(0)
    clip = build_tiny().eval()
    ours, _ = adapted_copy(clip, lora_factory(dropout=0.0))
    ref, ref_params = reference_model(clip, dropout=0.0)
    assert sum(p.numel() for p in ref_params) == 4 * 3 * 2 * (64 + 64)
    # the same updates in both: ours lists vision blocks then text; the reference text then vision
    ours_by_tower = {"text": adapted_modules(ours.transformer), "vision": adapted_modules(ours.visual.transformer)}
    for tower, ref_tower in (("text", ref.transformer), ("vision", ref.visual.transformer)):
        for mine, block in zip(ours_by_tower[tower], ref_tower.resblocks):
            for t, proj in zip("qkv", (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)):
                mine.adapters[t].A.normal_()
                mine.adapters[t].B.normal_(std=0.1)
                proj.A.copy_(mine.adapters[t].A)
                proj.B.copy_(mine.adapters[t].B)
    ours.train(), ref.train()  # unmerged in both
    import open_clip

    x, tokens = torch.randn(3, 3, 32, 32), open_clip.tokenize(["a photo of a cat.", "a dog."])
    torch.testing.assert_close(ref.encode_image(x), ours.encode_image(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.encode_text(tokens), ours.encode_text(tokens), rtol=1e-4, atol=1e-4)
    ref.eval()  # merged for evaluation: still the same function
    torch.testing.assert_close(ref.encode_image(x), ours.encode_image(x), rtol=1e-4, atol=1e-4)


def test_finite_guard_defers_the_check_but_still_fails():
    guard = FiniteGuard(every=10)
    for step in range(13):
        guard.update(torch.tensor(1.0), step)
    guard.update(torch.tensor(float("nan")), 13)  # recorded, not yet read back
    guard.update(torch.tensor(float("inf")), 14)
    for step in range(15, 19):
        guard.update(torch.tensor(1.0), step)
    with pytest.raises(DivergedError, match="loss became nan at step 13"):
        guard.update(torch.tensor(1.0), 19)  # the 20th update reads the flag
    tail = FiniteGuard(every=50)
    tail.update(torch.tensor(2.0), 0)
    tail.update(torch.tensor(float("-inf")), 1)
    with pytest.raises(DivergedError, match="at step 1"):
        tail.close()
    ok = FiniteGuard(every=1)
    ok.update(torch.tensor(3.0), 0)
    ok.close()


def _images(tmp_path, sizes):
    items = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(tmp_path / f"{i}.png")
        items.append(Item(f"{i}.png", i % 2, "c"))
    return items


def test_short_side_cap(tmp_path):
    items = _images(tmp_path, [(120, 80), (40, 60), (300, 300)])
    full = decode_items(tmp_path, items)
    capped = decode_items(tmp_path, items, max_short_side=50)
    assert [tuple(t.shape[1:]) for t in full] == [(80, 120), (60, 40), (300, 300)]
    assert [tuple(t.shape[1:]) for t in capped] == [(50, 75), (60, 40), (50, 50)]  # small ones untouched
    assert torch.equal(capped[1], full[1])


def test_train_originals_are_decoded_once_and_shared(tmp_path, monkeypatch):
    from harness.cards import get_card

    items = _images(tmp_path, [(64, 48)] * 4)
    bb = Backbone("tiny", build_tiny(), 32, "tiny-random:seed0", torch.device("cpu"))
    cache: dict = {}

    def task(its):
        s = ImageSet(tmp_path, "x", its, 32)
        return Task(get_card("demo_colours"), ["a", "b"], 2, 1, bb, "fp32", s, s, s, feature_cache=cache)

    first = task(items).train_originals()
    assert task(list(items)).train_originals() is first  # same few-shot set, another run: no decoding
    assert task(items).train_originals(40) is not first and len(cache) == 2  # the cap is part of the key
    monkeypatch.setattr(base, "ORIGINALS_CACHE_MB", 0)  # over budget: only the set in use is kept
    other = task(items[:2]).train_originals()
    assert list(cache.values()) == [other]


def test_vision_utilisation_counts_flops_and_scales_by_peak(tiny):
    from bench.utilisation import peak_tflops, vision_utilisation

    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 100.0) == 100.0
    u = vision_utilisation(tiny, batch=4, steps=1, precision="fp32", peak=1.0)
    assert u["gflop_per_step"] > 0 and u["peak_fraction"] == pytest.approx(u["tflops"] / 1.0)
