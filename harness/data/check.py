"""`harness data check`: is each dataset present and complete, and if not, why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.cards import DatasetCard
from harness.data.readers import dataset_folder, read_dataset
from harness.errors import DataError


@dataclass
class CheckResult:
    card: DatasetCard
    path: Path
    status: str  # present | incomplete | missing
    detail: str


def check_dataset(card: DatasetCard, data_root: Path) -> CheckResult:
    folder = dataset_folder(card, data_root)
    if not folder.is_dir():
        return CheckResult(card, folder, "missing", "folder not found")
    try:
        splits = read_dataset(card, data_root)
    except DataError as exc:
        return CheckResult(card, folder, "incomplete", str(exc))
    problems = []
    if len(splits.classnames) != card.num_classes:
        problems.append(f"{len(splits.classnames)} classes, card expects {card.num_classes}")
    if len(splits.test) != card.test_size:
        problems.append(f"{len(splits.test)} test images, card expects {card.test_size}")
    missing = [it.path for it in splits.test[:1] + splits.train[:1] if not (folder / it.path).is_file()]
    if missing:
        problems.append(f"image file {folder / missing[0]} not found (wrong image_dir?)")
    if problems:
        return CheckResult(card, folder, "incomplete", "; ".join(problems))
    return CheckResult(card, folder, "present", f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test")
