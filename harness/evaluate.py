"""Evaluate a fitted method on a protocol's targets: one closed-set problem per target, each with
its own images and class names.

How a target is scored depends only on its class names, not on the protocol:
- the training classes: `predict(task, images)`;
- a subset of them (ImageNet-A/-R's 200 classes, a shifted copy): the training logits restricted
  to those classes' columns, matched by class name, as CoOp's dataset classes build a 200-way head;
- other classes (base-to-new's new classes, another dataset): `predict(task, images, classnames)`
  for an open-vocabulary method; for a class-specific head or cache, "not applicable", with why.
"""

from __future__ import annotations

import torch

from harness.data.readers import DatasetSplits
from harness.errors import DataError, DivergedError
from harness.protocols import Target, base_new_labels, restrict
from methods.base import ImageSet, Method, Task


def check_predictions(logits: torch.Tensor, n_images: int, n_classes: int) -> None:
    """A number is stored only from finite logits of the right shape (argmax of NaN is class 0:
    chance accuracy that would look like a result)."""
    if tuple(logits.shape) != (n_images, n_classes):
        raise ValueError(f"predict returned logits of shape {tuple(logits.shape)}, expected ({n_images}, {n_classes})")
    bad = int((~torch.isfinite(logits)).any(-1).sum())
    if bad:
        raise DivergedError(f"non-finite logits for {bad} of {n_images} test images (NaN/inf features or weights); no accuracy is stored")


def clean(names: list[str]) -> list[str]:
    return [c.replace("_", " ") for c in names]


def target_set(target: Target, source: DatasetSplits, datasets: dict[str, DatasetSplits], test: ImageSet) -> tuple[ImageSet, list[str]]:
    """The target's test images (labels 0..C-1) and class names."""
    if target.subset != "all":  # base or new classes of the source dataset
        base, new = base_new_labels(range(len(source.classnames)))
        labels = base if target.subset == "base" else new
        items = restrict(source.test, labels, source.classnames)
        return ImageSet(source.root, source.card.name, items, test.size, evaluation=True, resize_mode=test.resize_mode), clean([source.classnames[label] for label in labels])
    if target.dataset == source.card.name:
        return test, clean(source.classnames)
    splits = datasets[target.dataset]
    return ImageSet(splits.root, target.dataset, splits.test, test.size, evaluation=True, resize_mode=test.resize_mode), clean(splits.classnames)


def score(method: Method, task: Task, images: ImageSet, names: list[str]) -> tuple[float | None, str]:
    """Top-1 on a target, or (None, why it does not apply)."""
    if names == task.classnames:
        logits = method.predict(task, images)
    elif set(names) <= set(task.classnames):
        if len(set(task.classnames)) != len(task.classnames):
            raise DataError(f"The training classes of {task.card.name} repeat a name, so a target's classes cannot be matched by name.")
        columns = [task.classnames.index(n) for n in names]
        logits = method.predict(task, images)[:, columns]
    elif method.open_vocabulary:
        logits = method.predict(task, images, names)
    else:
        return None, f"{method.name} scores only the classes it was trained on (a class-specific head or cache)"
    check_predictions(logits, len(images), len(names))
    return (logits.argmax(-1).cpu() == images.labels).float().mean().item() * 100, ""


@torch.no_grad()
def evaluate(method: Method, task: Task, targets: list[Target], source: DatasetSplits,
             datasets: dict[str, DatasetSplits], test: ImageSet) -> list[dict]:
    out = []
    for target in targets:
        images, names = target_set(target, source, datasets, test)
        top1, reason = score(method, task, images, names)
        out.append({"target": target.name, "dataset": target.dataset, "class_subset": target.subset,
                    "status": "ok" if top1 is not None else "not_applicable", "top1": top1, "n_test": len(images),
                    "n_classes": len(names), "reason": reason or None})
    return out
