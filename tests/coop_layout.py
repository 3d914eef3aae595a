"""Builders for small CoOp-layout datasets on disk: split JSON, FGVCAircraft txt, ImageNet folders."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 30, 30), (30, 170, 40), (30, 60, 220)]


def _image(path: Path, label: int, k: int) -> None:
    rng = np.random.default_rng(label * 1000 + k)
    arr = np.clip(np.array(COLOURS[label % 3]) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_split_json(root: Path, per_split=(6, 3, 5), classes=("annual crop", "forest", "river")) -> Path:
    """An EuroSAT-named dataset: eurosat/2750/<class>/*.jpg + split_zhou_EuroSAT.json."""
    folder = root / "eurosat"
    split = {}
    for part, n in zip(("train", "val", "test"), per_split):
        split[part] = []
        for label, name in enumerate(classes):
            for k in range(n):
                rel = f"{name.replace(' ', '')}/{part}_{k}.jpg"
                _image(folder / "2750" / rel, label, hash((part, k)) % 997)
                split[part].append([rel, label, name])
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return folder


def make_fgvc(root: Path, per_split=(5, 3, 4), variants=("707-320", "A300B4", "Cessna 172")) -> Path:
    folder = root / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for part, count in zip(("train", "val", "test"), per_split):
        lines = []
        for label, name in enumerate(variants):
            for k in range(count):
                n += 1
                image_id = f"{1000000 + n}"
                _image(folder / "images" / f"{image_id}.jpg", label, n)
                lines.append(f"{image_id} {name}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_imagenet(root: Path, train=8, val=4, classes=(("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"))) -> Path:
    folder = root / "imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {name}\n" for w, name in classes))
    for label, (wnid, _) in enumerate(classes):
        for split, count in (("train", train), ("val", val)):
            for k in range(count):
                _image(folder / "images" / split / wnid / f"{wnid}_{k}.JPEG", label, k + (100 if split == "val" else 0))
    return folder


IMAGENET_CLASSES = (("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"))


def make_imagenet_shifts(root: Path, per_class: int = 3, subset=("n01443537", "n01484850")) -> None:
    """ImageNet-V2 (folders 0..2), -Sketch (all wnids) and -A/-R (the wnids in `subset`) in CoOp's
    layout, each with its copy of classnames.txt."""
    names = "".join(f"{w} {n}\n" for w, n in IMAGENET_CLASSES)
    layouts = {
        "imagenetv2/imagenetv2-matched-frequency-format-val": [str(i) for i in range(len(IMAGENET_CLASSES))],
        "imagenet-sketch/images": [w for w, _ in IMAGENET_CLASSES],
        "imagenet-adversarial/imagenet-a": list(subset),
        "imagenet-rendition/imagenet-r": list(subset),
    }
    for where, folders in layouts.items():
        base = root / where
        (base.parent / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
        (base.parent / "classnames.txt").write_text(names)
        for folder in folders:
            label = int(folder) if folder.isdigit() else [w for w, _ in IMAGENET_CLASSES].index(folder)
            for k in range(per_class):
                _image(base / folder / f"{k}.jpg", label, 500 + k)
