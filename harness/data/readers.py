"""Readers for CoOp's on-disk layouts: split JSON, FGVCAircraft txt files, ImageNet folders.

Every reader returns items whose paths are relative to the dataset folder, so manifests and caches
do not depend on where the data root is mounted.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from harness.cards import DatasetCard
from harness.errors import DataError


@dataclass(frozen=True)
class Item:
    path: str  # relative to the dataset folder
    label: int
    classname: str


@dataclass
class DatasetSplits:
    card: DatasetCard
    root: Path  # the dataset folder
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]


def dataset_folder(card: DatasetCard, data_root: Path) -> Path:
    return Path(data_root) / card.folder


def read_dataset(card: DatasetCard, data_root: Path) -> DatasetSplits:
    root = dataset_folder(card, data_root)
    if not root.is_dir():
        raise DataError(f"Dataset '{card.name}' is missing: expected CoOp's folder {root}.")
    reader = {"coop_split": _read_coop_split, "fgvc_aircraft": _read_fgvc, "imagenet": _read_imagenet,
              "imagenet_variant": _read_imagenet_variant}[card.reader]
    train, val, test, classnames = reader(card, root)
    validate_labels(card, root / (card.split_file or ""), train + val + test, classnames)
    return DatasetSplits(card, root, train, val, test, classnames)


def validate_labels(card: DatasetCard, source: Path, items: list[Item], classnames: list[str]) -> None:
    """Labels must be exactly 0..C-1, one class name each, C as the card says: otherwise every class
    after a gap would be scored against the wrong class name and the run would store a wrong number."""
    names: dict[int, str] = {}
    for it in items:
        if names.setdefault(it.label, it.classname) != it.classname:
            raise DataError(
                f"Dataset '{card.name}': {source} gives label {it.label} two class names, '{names[it.label]}' and "
                f"'{it.classname}' (e.g. at {it.path}). Each label must have one class name: fix the split file."
            )
    labels = sorted(names)
    if labels != list(range(len(labels))):
        odd = [label for label in labels if not 0 <= label < len(labels)]
        gaps = sorted(set(range(len(labels))) - set(labels))
        raise DataError(
            f"Dataset '{card.name}': {source} has labels {', '.join(map(str, odd[:5]))} outside 0..{len(labels) - 1}"
            f"{' (no image has label ' + ', '.join(map(str, gaps[:5])) + ')' if gaps else ''}. Labels must be exactly "
            "0..C-1, in the order of the class names; restore the original split file."
        )
    if len(labels) != card.num_classes:
        raise DataError(
            f"Dataset '{card.name}': {source} has {len(labels)} classes, its card expects {card.num_classes}. Restore the "
            "full split file, or declare your subset with your own card (a YAML file in a folder named by $HARNESS_CARDS)."
        )


def _rel(card: DatasetCard, name: str) -> str:
    return posixpath.normpath(posixpath.join(card.image_dir, name))


def _classnames(items: list[Item]) -> list[str]:
    names: dict[int, str] = {}
    for it in items:
        names.setdefault(it.label, it.classname)
    return [names[i] for i in sorted(names)]


def _read_coop_split(card: DatasetCard, root: Path):
    split_path = root / card.split_file
    if not split_path.is_file():
        raise DataError(f"Dataset '{card.name}': split file {split_path} is missing (CoOp's {card.split_file}).")
    try:
        raw = json.loads(split_path.read_text())
        splits = {
            key: [Item(_rel(card, p), int(label), str(name)) for p, label, name in raw[key]]
            for key in ("train", "val", "test")
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"Dataset '{card.name}': split file {split_path} is unreadable ({exc}); "
            "expected {\"train\"|\"val\"|\"test\": [[image_path, label, classname], ...]}."
        ) from exc
    return splits["train"], splits["val"], splits["test"], _classnames(splits["train"] + splits["test"])


def _read_fgvc(card: DatasetCard, root: Path):
    variants_path = root / "variants.txt"
    if not variants_path.is_file():
        raise DataError(f"Dataset '{card.name}': {variants_path} is missing (FGVCAircraft's class list).")
    classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}

    def read(split: str) -> list[Item]:
        path = root / f"images_variant_{split}.txt"
        if not path.is_file():
            raise DataError(f"Dataset '{card.name}': split file {path} is missing.")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image, _, name = line.strip().partition(" ")
            if name not in label_of:
                raise DataError(f"Dataset '{card.name}': {path}:{n} names variant '{name}', not in variants.txt.")
            items.append(Item(_rel(card, image + ".jpg"), label_of[name], name))
        return items

    return read("train"), read("val"), read("test"), classnames


def _read_imagenet(card: DatasetCard, root: Path):
    names_path = root / "classnames.txt"
    if not names_path.is_file():
        raise DataError(f"Dataset '{card.name}': {names_path} is missing ('<wnid> <class name>' per line).")
    wnid_name = {}
    for line in names_path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            wnid_name[wnid] = name

    def read(split: str) -> list[Item]:
        split_dir = root / card.image_dir / split
        if not split_dir.is_dir():
            raise DataError(f"Dataset '{card.name}': image folder {split_dir} is missing.")
        folders = sorted(f.name for f in split_dir.iterdir() if f.is_dir() and not f.name.startswith("."))
        items = []
        for label, wnid in enumerate(folders):
            if wnid not in wnid_name:
                raise DataError(f"Dataset '{card.name}': folder {split_dir / wnid} has no line in {names_path}.")
            for image in sorted(p for p in (split_dir / wnid).iterdir() if not p.name.startswith(".")):
                items.append(Item(_rel(card, f"{split}/{wnid}/{image.name}"), label, wnid_name[wnid]))
        return items

    train, test = read("train"), read("val")  # ImageNet's official val is the test split
    return train, [], test, _classnames(train + test)


def _read_imagenet_variant(card: DatasetCard, root: Path):
    """ImageNet-V2 / -Sketch / -A / -R in CoOp's layout: test images only, in class folders named by
    label index (V2: folder i is the i-th line of classnames.txt) or by wnid (the others: labels by
    sorted wnid, so A and R have 200 classes, each named from classnames.txt)."""
    names_path = root / "classnames.txt"
    if not names_path.is_file():
        raise DataError(f"Dataset '{card.name}': {names_path} is missing (a copy of ImageNet's classnames.txt, as CoOp's DATASETS.md says).")
    lines = [line.strip().partition(" ") for line in names_path.read_text().splitlines() if line.strip()]
    image_dir = root / card.image_dir
    if not image_dir.is_dir():
        raise DataError(f"Dataset '{card.name}': image folder {image_dir} is missing.")
    if card.folders == "index":
        classes = [(str(i), name) for i, (_, _, name) in enumerate(lines)]
    else:
        wnid_name = {wnid: name for wnid, _, name in lines}
        folders = sorted(f.name for f in image_dir.iterdir() if f.is_dir() and not f.name.startswith("."))
        unknown = [f for f in folders if f not in wnid_name]
        if unknown:
            raise DataError(f"Dataset '{card.name}': folder {image_dir / unknown[0]} has no line in {names_path}.")
        classes = [(wnid, wnid_name[wnid]) for wnid in folders]
    test = []
    for label, (folder, name) in enumerate(classes):
        path = image_dir / folder
        if not path.is_dir():
            raise DataError(f"Dataset '{card.name}': class folder {path} is missing.")
        for image in sorted(p for p in path.iterdir() if not p.name.startswith(".")):
            test.append(Item(_rel(card, f"{folder}/{image.name}"), label, name))
    return [], [], test, [name for _, name in classes]
