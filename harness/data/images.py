"""Image decoding, CLIP's evaluation preprocessing, GPU-side train augmentation, and the pixel cache.

Evaluation pixels (shorter side resized to the backbone's size with bicubic, centre crop, as CLIP's
own preprocess; never a straight resize) are decoded once per (dataset, split, size) and cached on
disk as uint8 safetensors. Training images stay decoded in memory as uint8 tensors and are
augmented where the model runs, so no JPEG is decoded inside a training loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from harness.cache import cached_tensor, digest
from harness.data.readers import Item
from harness.errors import DataError

# The official codes crop training images with PIL in a DataLoader; the harness crops uint8 tensors
# on the device. Measured by `python -m bench.resize_fidelity` (same crop boxes, demo images).
AUGMENT_DEVIATION = (
    "train crops resized on uint8 tensors (bicubic, antialiased) instead of PIL: at most 2/255, "
    "mean 0.004/255 per pixel apart on the demo images (bench/resize_fidelity.py)"
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"Image {path} is missing. Check the dataset's image_dir with `harness data check`.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"Image {path} is corrupt or unreadable ({exc}). Replace or remove it.") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img)  # uint8 CHW


def eval_view(img: Image.Image, size: int, resize_mode: str = "shortest") -> torch.Tensor:
    """The test transform up to normalisation, with torchvision's own ops as open_clip uses them:
    bicubic resize of the shorter side to `size`, then a centre crop (CLIP); or, `squash`, of the
    whole image to size x size (SigLIP)."""
    if resize_mode == "squash":
        return to_tensor(TF.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC))
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    return to_tensor(TF.center_crop(img, [size, size]))


def _map(fn, items):
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def cap_short_side(img: Image.Image, max_short_side: int | None) -> Image.Image:
    """Downscale (bicubic, antialiased) so the shorter side is at most `max_short_side`; None keeps it."""
    w, h = img.size
    if max_short_side is None or min(w, h) <= max_short_side:
        return img
    scale = max_short_side / min(w, h)
    return img.resize((max(max_short_side, round(w * scale)), max(max_short_side, round(h * scale))), Image.BICUBIC)


def decode_items(root: Path, items: list[Item], max_short_side: int | None = None) -> list[torch.Tensor]:
    """Original-resolution uint8 tensors (shorter side capped at `max_short_side` if given), for
    training-time augmentation."""
    return _map(lambda it: to_tensor(cap_short_side(load_rgb(root / it.path), max_short_side)), items)


def content_key(root: Path, items: list[Item]) -> str:
    """A cache key that changes with the images' bytes: each file's path, label, size, mtime_ns,
    ctime_ns and inode (a replaced, edited or re-copied image changes at least one; ctime cannot be
    set back by hand), so no cache outlives its data. One stat per image, no reading."""
    def fingerprint(it: Item):
        try:
            st = os.stat(root / it.path)
        except FileNotFoundError:
            raise DataError(f"Image {root / it.path} is missing. Check the dataset's image_dir with `harness data check`.") from None
        return it.path, it.label, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino

    return digest(str(Path(root).resolve()), [fingerprint(it) for it in items])


def eval_pixels(root: Path, dataset: str, items: list[Item], size: int, content: str, resize_mode: str = "shortest") -> torch.Tensor:
    """[N, 3, size, size] uint8 evaluation pixels, decoded once and cached on disk under `content`,
    the items' `content_key` (computed once by the caller), per preprocessing (size, resize mode)."""

    def decode() -> torch.Tensor:
        if not items:
            return torch.empty(0, 3, size, size, dtype=torch.uint8)
        return torch.stack(_map(lambda it: eval_view(load_rgb(root / it.path), size, resize_mode), items))

    view = f"{size}px" if resize_mode == "shortest" else f"{size}px-{resize_mode}"
    return cached_tensor("pixels", f"{dataset}/{view}_{len(items)}_{content}", decode)


def normalize(pixels: torch.Tensor, device: torch.device | str, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 normalised by the backbone's mean and std (CLIP's by default), on `device`."""
    x = pixels.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def random_resized_crops(
    images: list[torch.Tensor], size: int, scale: tuple[float, float], flip: bool = True
) -> torch.Tensor:
    """Per-image RandomResizedCrop (bicubic, antialiased) + horizontal flip on uint8 tensors.

    Draws from torch's global generator, so a seeded run repeats exactly. Runs on the images'
    device: keep them on the GPU to augment there.
    """
    out = []
    for img in images:
        top, left, h, w = RandomResizedCrop.get_params(img, scale=list(scale), ratio=[3 / 4, 4 / 3])
        crop = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        if flip and torch.rand(()) < 0.5:
            crop = TF.horizontal_flip(crop)
        out.append(crop)
    return torch.stack(out)
