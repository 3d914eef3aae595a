"""Few-shot subsets, saved as manifests. Two samplers, each the exact draw of an official codebase.

Both follow Dassl's `generate_fewshot_dataset` (KaiyangZhou/Dassl.pytorch
`dassl/data/datasets/base_dataset.py`): labels are visited in order of first appearance in the split
list; a label with at least K items draws `random.sample(items, K)`. They differ on a label with
fewer than K items:

- `coop` (KaiyangZhou/CoOp and its forks CoCoOp, KgCoOp, ProGrad, MaPLe, which never pass `repeat`):
  Dassl's default `repeat=False` since commit e3a15da (2021-10-09, "set repeat=False as default in
  generate_fewshot_dataset()"), unchanged at master (checked at HEAD DASSL_HEAD): the label keeps
  all its items, in split order, and draws nothing from the random stream. `random.seed(seed)`, then
  the train subset (K per label), then the val subset (min(K, 4) per label from the val split), one
  random stream. ImageNet has no val split: CoOp draws exactly K per label from train (its val is
  the test set); the harness then draws min(K, 4) per label from the train images not chosen,
  continuing the stream, so the training subset is CoOp's own.
- `clip_lora` (MaxZanella/CLIP-LoRA, `datasets/*.py`, seeded once in `main.py`): its own copy of the
  function pads a short label by `random.choices(items, k=K)` (with replacement). `random.seed(seed)`,
  then the val subset FIRST (min(K, 4) per label), then the train subset, one stream. ImageNet
  (`datasets/imagenet.py`, torchvision ImageFolder order: sorted folders, sorted files): per label
  one `random.sample(items, K + min(K, 4))`, the first K train, the rest val, never padded.

The protocol version (`harness.PROTOCOL_VERSION`, in every run's config) was bumped to coop-v3 when
`coop` stopped padding: subsets of datasets with a class shorter than K changed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from harness import PROTOCOL_VERSION
from harness.data.readers import DatasetSplits, Item
from harness.errors import DataError, HarnessError
from harness.paths import atomic_write_text, cache_dir


@dataclass
class Manifest:
    dataset: str
    shots: int
    seed: int
    train: list[Item]
    val: list[Item]
    source: str  # the sampler's name, or the split files' description

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
                "source": self.source,
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


def dassl_sample(items: list[Item], per_label: int, repeat: bool) -> list[Item]:
    """Dassl's generate_fewshot_dataset on the global `random` stream: a label shorter than
    `per_label` is padded with replacement when `repeat`, else kept whole without a draw."""
    out = []
    for group in _by_label(items).values():
        if len(group) >= per_label:
            out.extend(random.sample(group, per_label))
        else:
            out.extend(random.choices(group, k=per_label) if repeat else group)
    return out


def sample_coop(splits: DatasetSplits, shots: int, seed: int) -> Manifest:
    n_val = min(shots, 4)
    random.seed(seed)
    train = dassl_sample(splits.train, shots, repeat=False)
    if splits.val:
        val = dassl_sample(splits.val, n_val, repeat=False)
    else:  # ImageNet: val from the train images CoOp did not choose, after CoOp's own draw
        val = val_from_rest(splits, train, n_val)
    return Manifest(splits.card.name, shots, seed, train, val, "coop")


def val_from_rest(splits: DatasetSplits, train: list[Item], n_val: int) -> list[Item]:
    """A val subset for a dataset without a val split (ImageNet): `n_val` per label, drawn on the
    current `random` stream from the train images not in `train`, so the training draw is untouched."""
    chosen = set(train)
    return dassl_sample([it for it in splits.train if it not in chosen], n_val, repeat=False)


def sample_clip_lora(splits: DatasetSplits, shots: int, seed: int) -> Manifest:
    n_val = min(shots, 4)
    random.seed(seed)
    if splits.val:
        val = dassl_sample(splits.val, n_val, repeat=True)
        train = dassl_sample(splits.train, shots, repeat=True)
    else:
        train, val = [], []
        for label, group in _by_label(splits.train).items():
            if len(group) < shots + n_val:
                raise DataError(
                    f"{splits.card.name}: class {label} has {len(group)} training images; CLIP-LoRA's ImageNet sampler "
                    f"needs {shots + n_val} ({shots} train + {n_val} val) and cannot pad. Use fewer shots or --sampler coop."
                )
            drawn = random.sample(group, shots + n_val)
            train.extend(drawn[:shots])
            val.extend(drawn[shots:])
    return Manifest(splits.card.name, shots, seed, train, val, "clip_lora")


SAMPLERS = {"coop": sample_coop, "clip_lora": sample_clip_lora}


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise HarnessError(f"--sampler must be one of {', '.join(SAMPLERS)}, not '{name}'.")


def manifest_for(splits: DatasetSplits, shots: int, seed: int, sampler: str = "coop") -> Manifest:
    """Sample the subset and persist it under the cache, so a run can be re-checked and shared."""
    manifest = SAMPLERS[sampler](splits, shots, seed)
    path = cache_dir() / "manifests" / splits.card.name / f"{sampler}_shots{shots}_seed{seed}.json"
    text = manifest.to_json()
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return manifest
