"""`harness data check`: is each dataset present and complete, and if not, why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.cards import DatasetCard
from harness.data.images import load_rgb
from harness.data.readers import dataset_folder, read_dataset
from harness.errors import DataError


@dataclass
class CheckResult:
    card: DatasetCard
    path: Path
    status: str  # present | incomplete | missing
    detail: str


def check_dataset(card: DatasetCard, data_root: Path, deep: bool = False) -> CheckResult:
    """Reads the splits (labels validated as for a run), checks every listed image exists and, with
    `deep`, decodes each one."""
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
    items = list(dict.fromkeys(splits.train + splits.val + splits.test))
    missing = [it.path for it in items if not (folder / it.path).is_file()]
    if missing:
        problems.append(f"{len(missing)} of {len(items)} listed images not found, e.g. {folder / missing[0]} (wrong image_dir?)")
    elif deep:
        for it in items:
            try:
                load_rgb(folder / it.path)
            except DataError as exc:
                problems.append(str(exc))
                break
    if problems:
        return CheckResult(card, folder, "incomplete", "; ".join(problems))
    return CheckResult(card, folder, "present", f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test")
