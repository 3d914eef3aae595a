"""Few-shot subsets under CoOp's protocol (Dassl's `generate_fewshot_dataset`), saved as manifests.

`random.seed(seed)` is set immediately before sampling; labels are visited in order of first
appearance; each label draws `random.sample(items, K)` (all items if fewer). The val subset uses
min(K, 4) per label from the val split, continuing the same random stream. ImageNet has no val
split: K + min(K, 4) items per label come from train, the first K train, the rest val.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from harness import PROTOCOL_VERSION
from harness.data.readers import DatasetSplits, Item
from harness.paths import atomic_write_text, cache_dir


@dataclass
class Manifest:
    dataset: str
    shots: int
    seed: int
    train: list[Item]
    val: list[Item]

    @property
    def content_hash(self) -> str:
        payload = json.dumps([[(i.path, i.label) for i in self.train], [(i.path, i.label) for i in self.val]])
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> str:
        def rows(items):
            return [{"path": i.path, "label": i.label, "classname": i.classname} for i in items]

        return json.dumps(
            {
                "dataset": self.dataset,
                "protocol": PROTOCOL_VERSION,
                "shots": self.shots,
                "seed": self.seed,
                "hash": self.content_hash,
                "train": rows(self.train),
                "val": rows(self.val),
            },
            indent=1,
        )


def _by_label(items: list[Item]) -> dict[int, list[Item]]:
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    return groups


def _sample(items: list[Item], per_label: int) -> list[Item]:
    out = []
    for group in _by_label(items).values():
        out.extend(random.sample(group, per_label) if len(group) >= per_label else group)
    return out


def sample_fewshot(splits: DatasetSplits, shots: int, seed: int) -> Manifest:
    n_val = min(shots, 4)
    random.seed(seed)
    if splits.val:
        train = _sample(splits.train, shots)
        val = _sample(splits.val, n_val)
    else:
        train, val = [], []
        for group in _by_label(splits.train).values():
            drawn = random.sample(group, min(len(group), shots + n_val))
            train.extend(drawn[:shots])
            val.extend(drawn[shots:])
    return Manifest(splits.card.name, shots, seed, train, val)


def manifest_for(splits: DatasetSplits, shots: int, seed: int) -> Manifest:
    """Sample the subset and persist it under the cache, so a run can be re-checked and shared."""
    manifest = sample_fewshot(splits, shots, seed)
    path = cache_dir() / "manifests" / splits.card.name / f"shots{shots}_seed{seed}.json"
    text = manifest.to_json()
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return manifest
