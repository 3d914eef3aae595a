"""Synthetic few-shot data for the benchmark: smooth random images written as JPEG files (so both
loops decode real files), seeded class names, and a `Task` around a random-weight backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.backbones import Backbone, build_architecture
from harness.cards import get_card
from harness.data.readers import Item
from methods.base import ImageSet, Task

SYLLABLES = "ka lo mi ru sen tor vel quin dar pho lu zeb nor ith gal fen ost wik ber yum cal ops tre vin".split()


def classnames(n: int, seed: int = 0) -> list[str]:
    """n distinct names of one to three made-up words (prompt lengths vary as in real datasets)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < n:
        words = [
            "".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 4)))
        ]
        name = " ".join(words)
        if name not in names:
            names.append(name)
    return names


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: coarse random colours upsampled (bicubic) plus mild noise."""
    coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, size=img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, n: int, n_classes: int, size: tuple[int, int], seed: int = 0) -> list[Item]:
    """n JPEGs of about `size` (w, h; +-20 %) under folder/, labels cycling over the classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        w, h = (int(s * rng.uniform(0.8, 1.2)) for s in size)
        path = f"img_{i:05d}.jpg"
        smooth_image(rng, w, h).save(folder / path, quality=90)
        items.append(Item(path, i % n_classes, f"c{i % n_classes}"))
    return items


def random_backbone(name: str, device: torch.device) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_architecture(name)
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    return Backbone(name, model, size[0] if isinstance(size, tuple) else size, f"{name}-random:bench", device)


def make_task(backbone: Backbone, names: list[str], root: Path, train: list[Item], test: list[Item], precision: str,
              shots: int = 16) -> tuple[Task, ImageSet]:
    """The task (what fit sees) and the test images (what predict gets)."""
    size = backbone.image_size
    task = Task(
        card=get_card("imagenet"),  # its template(s) and Tip-Adapter settings; the classes are the synthetic ones
        classnames=names,
        shots=shots,
        seed=1,
        backbone=backbone,
        precision=precision,
        train=ImageSet(root, "bench", train, size),
        val=ImageSet(root, "bench", train[: max(1, len(train) // 4)], size),
    )
    return task, ImageSet(root, "bench", test, size)
