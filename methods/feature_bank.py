"""Augmented training views, encoded once by the frozen image encoder and shared.

Why this module exists: CLIP-Adapter, TaskRes, LP++ and CLAP never back-propagate into CLIP, so a
run's cost is almost all in encoding augmented crops of the few-shot images. Their official code
encodes fresh crops every epoch (CLIP-Adapter, TaskRes) or pre-extracts a fixed bank (LP++: one
view per image; CLAP: 20). Here every method draws from one bank of views per few-shot subset,
encoded once and kept in memory for the sweep (`Task.feature_cache`) and on disk
(`harness.cache.cached_tensor`, like `Task.frozen_features`), so the second method, shot count
repeat or process that needs the same views pays nothing for them.

A view is keyed by everything that changes it: the subset's content (`train.key`: which images,
their bytes), the backbone's name and weights identity, the precision, the image size, the crop
scale, the flip, the seed that draws the crops and the view's index. View v is drawn from its own
generator seeded by (seed, v) on the CPU, never from the global generator, so it does not depend on
which method asked first or on what that method drew before; the first V views of a 20-view bank
are therefore the V-view bank (LP++'s one view at scale (0.5, 1) is Tip-Adapter's first view).

Returned features are raw (unnormalised), [V, N, D] in train-item order, fp32 on the task's device.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from harness.backbones import without_visual_projection
from harness.cache import cached_tensor, digest
from harness.data.images import random_resized_crops
from methods.base import Task

# Device memory the sweep may keep for encoded views across runs (least recently used dropped first).
VIEWS_CACHE_MB = float(os.environ.get("HARNESS_VIEWS_CACHE_MB", "2048"))


def view_key(task: Task, view: int, scale: tuple[float, float], seed: int, flip: bool = True, pre_projection: bool = False) -> str:
    """The identity of one encoded view of the task's few-shot subset (file name under the cache's views/)."""
    b = task.backbone
    parts = (b.name, b.weights, task.precision, b.image_size, task.train.key, [float(s) for s in scale], flip, seed, view)
    parts += ("pre-projection",) if pre_projection else ()
    return f"{task.train.dataset}/{digest('augmented-view', *parts)}"


def crop_seed(seed: int, view: int) -> int:
    """The CPU generator seed of one view: a hash of (seed, view), so views are independent draws."""
    return int(digest("crop-seed", seed, view), 16) % (2**63)


@torch.no_grad()
def encode_view(task: Task, view: int, scale: tuple[float, float], seed: int, flip: bool = True,
                batch_size: int = 256, pre_projection: bool = False) -> torch.Tensor:
    """One augmented view of every training image (RandomResizedCrop bicubic + flip), raw features [N, D]
    (before CLIP's visual projection with `pre_projection`: [N, width])."""
    images = task.train_originals()
    out = []
    model = task.backbone.model
    with torch.random.fork_rng(devices=[]), (without_visual_projection(model) if pre_projection else nullcontext()):
        torch.default_generator.manual_seed(crop_seed(seed, view))  # the crops draw from the CPU generator only
        for start in range(0, len(images), batch_size):
            crops = random_resized_crops(images[start : start + batch_size], task.backbone.image_size, scale, flip)
            out.append(task.encode_images(model, crops, batch_size))
    return torch.cat(out) if out else torch.empty(0, task.backbone.embed_dim, device=task.device)


def _remember(cache: dict, key: tuple, value: torch.Tensor) -> None:
    cache[key] = value
    held = [k for k in cache if isinstance(k, tuple) and k[0] == "view"]
    budget = VIEWS_CACHE_MB * 2**20
    while len(held) > 1 and sum(cache[k].numel() * cache[k].element_size() for k in held) > budget:
        del cache[held.pop(0)]


def augmented_views(task: Task, n_views: int, scale=(0.5, 1.0), seed: int | None = None, flip: bool = True,
                    pre_projection: bool = False) -> torch.Tensor:
    """Raw frozen-encoder features [n_views, N, D] of `n_views` augmented views of task.train (the
    image tower's output before CLIP's visual projection with `pre_projection`).

    `seed` draws the crops (default: the run's seed). Each view comes from memory, else disk, else
    the encoder (then both caches are filled)."""
    seed = task.seed if seed is None else seed
    scale = (float(scale[0]), float(scale[1]))
    cache = task.feature_cache
    views = []
    for v in range(n_views):
        name = view_key(task, v, scale, seed, flip, pre_projection)
        key = ("view", name, str(task.device))
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
        else:
            feats = cached_tensor("views", name, lambda v=v: encode_view(task, v, scale, seed, flip, pre_projection=pre_projection))
            _remember(cache, key, feats.to(task.device).float())
        views.append(cache[key])
    if not views:
        return torch.empty(0, len(task.train), task.backbone.embed_dim, device=task.device)
    return torch.stack(views)
