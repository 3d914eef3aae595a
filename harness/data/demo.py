"""The demo suite: small image datasets drawn deterministically on first use, in CoOp's layout.

Each dataset has 8 classes a model can learn to tell apart (shapes, colours, textures), real PNG
files under `images/<class>/` and a `split_zhou_<Title>.json`, so it goes through exactly the same
reader, sampler and cache code as the real datasets. Nothing here depends on the machine: the
same bytes are drawn everywhere for a given generator version. A dataset counts as present only
with its completion marker (written last, holding a hash of what drew it), so a folder left half
drawn, or drawn by another generator, is drawn again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from harness.cards import DatasetCard
from harness.paths import ENVIRONMENT_ERRNOS, cache_dir, environment_error, writable_folder

GENERATOR_VERSION = 1
SIZE = 64
PER_CLASS = {"train": 24, "val": 8, "test": 30}

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "cyan": (30, 210, 220), "pink": (250, 140, 200),
}
TEXTURES = ["striped", "checkered", "dotted", "zigzagged", "grid", "speckled", "banded", "blotchy"]
# shapes_outline and shapes_recolour: the shapes' classes under a domain shift (the demo's
# ImageNet-Sketch / ImageNet-R): outlines only, or inverted contrast with light fills on dark.
CLASSNAMES = {"shapes": SHAPES, "colours": list(COLOURS), "textures": TEXTURES,
              "shapes_outline": SHAPES, "shapes_recolour": SHAPES}
MARKER = ".complete"  # written last, inside the dataset folder


def fingerprint(card: DatasetCard) -> str:
    """What the drawn bytes depend on: the generator version and settings, and the card's layout."""
    fields = [GENERATOR_VERSION, SIZE, PER_CLASS, CLASSNAMES[card.generator],
              card.name, card.generator, card.folder, card.image_dir, card.split_file]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def is_complete(card: DatasetCard, root: Path) -> bool:
    try:
        return (root / card.folder / MARKER).read_text().strip() == fingerprint(card)
    except OSError:
        return False


def demo_root() -> Path:
    return cache_dir() / f"demo-v{GENERATOR_VERSION}"


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + math.pi * 2 * k / (n * (2 if inner else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, rng: np.random.Generator, fill) -> None:
    r = rng.uniform(14, 24)
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=int(r / 3))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def texture_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, period)
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta) + phase
    v = -x * math.sin(theta) + y * math.cos(theta) + phase
    if name == "striped":
        m = (u % period) < period / 2
    elif name == "checkered":
        m = ((u // (period / 2)) + (v // (period / 2))) % 2 == 0
    elif name == "dotted":
        m = ((u % period - period / 2) ** 2 + (v % period - period / 2) ** 2) < (period / 4) ** 2
    elif name == "zigzagged":
        m = ((u + period / 2 * np.abs(((v / period) % 2) - 1)) % period) < period / 2
    elif name == "grid":
        m = ((u % period) < 1.6) | ((v % period) < 1.6)
    elif name == "speckled":
        m = rng.random((SIZE, SIZE)) < 0.25
    elif name == "banded":
        m = (u % (period * 3)) < period * 0.6
    else:  # blotchy: smooth random field, thresholded
        coarse = rng.random((6, 6))
        field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC))
        m = field > 128
    return m


def draw_shifted(generator: str, cls: str, rng: np.random.Generator) -> Image.Image:
    """A shape of class `cls` under a shift: its outline only, or light on a dark background."""
    if generator == "shapes_outline":
        mask = Image.new("L", (SIZE, SIZE), 0)
        draw_shape(ImageDraw.Draw(mask), cls, rng, 255)
        edges = np.asarray(mask.filter(ImageFilter.FIND_EDGES)) > 0
        bg = np.array([int(c) for c in rng.integers(150, 240, size=3)], np.uint8)
        ink = np.array([int(c) for c in rng.integers(0, 90, size=3)], np.uint8)
        arr = np.where(edges[..., None], ink, bg)
    else:
        bg = tuple(int(c) for c in rng.integers(0, 50, size=3))
        img = Image.new("RGB", (SIZE, SIZE), bg)
        draw_shape(ImageDraw.Draw(img), cls, rng, tuple(int(c) for c in rng.integers(180, 256, size=3)))
        arr = np.asarray(img)
    noise = rng.normal(0, 8, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr.astype(np.float32) + noise, 0, 255).astype(np.uint8))


def draw_image(generator: str, cls: str, rng: np.random.Generator) -> Image.Image:
    if generator in ("shapes_outline", "shapes_recolour"):
        return draw_shifted(generator, cls, rng)
    bg = tuple(int(c) for c in rng.integers(60, 200, size=3))
    if generator == "textures":
        fg = tuple(int(c) for c in rng.integers(0, 256, size=3))
        mask = texture_mask(cls, rng)
        arr = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
        img = Image.fromarray(arr.astype(np.uint8))
    else:
        gray = int(rng.integers(70, 190))
        if generator == "colours":
            fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[cls])
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            bg = (gray, gray, gray)
        else:
            fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
            shape = cls
        img = Image.new("RGB", (SIZE, SIZE), bg)
        draw_shape(ImageDraw.Draw(img), shape, rng, fill)
    noise = rng.normal(0, 8, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def draw_into(card: DatasetCard, folder: Path) -> None:
    """Every image, the split file, then the marker that says the folder is complete."""
    classes = CLASSNAMES[card.generator]
    rng = np.random.default_rng(zlib.crc32(card.name.encode()) + GENERATOR_VERSION)
    split = {}
    for part, n in PER_CLASS.items():
        split[part] = []
        for label, cls in enumerate(classes):
            for k in range(n):
                rel = f"{cls}/{part}_{k:03d}.png"
                path = folder / card.image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                draw_image(card.generator, cls, rng).save(path)
                split[part].append([rel, label, cls])
    (folder / card.split_file).write_text(json.dumps(split))
    (folder / MARKER).write_text(fingerprint(card))


def generate(card: DatasetCard, root: Path) -> None:
    """Draw the dataset into a temporary folder, marker last, then move it into place in one rename;
    a folder without the right marker (a killed run, an older generator) is moved aside and drawn again."""
    target = root / card.folder
    if is_complete(card, root):
        return
    tmp = root / f".{card.folder}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        draw_into(card, tmp)
    except BaseException as exc:  # a full disk, Ctrl-C: leave no half-drawn folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            raise environment_error(exc, "the demo datasets") from None
        raise
    if target.exists() and not is_complete(card, root):  # half drawn: rename first, so no reader sees it go
        stale = root / f".{card.folder}.{os.getpid()}.stale"
        try:
            os.rename(target, stale)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo(cards: list[DatasetCard]) -> Path:
    root = writable_folder(demo_root(), "demo data folder (under the cache: HARNESS_CACHE)")
    for card in cards:
        generate(card, root)
    return root
