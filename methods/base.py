"""The one interface every method implements, and the run-time context (`Task`) it receives.

A method is a class with a name, its paper, its known deviations from the official code, and a
dict of hyper-parameter defaults (the official recipe). The runner builds it with the resolved
hyper-parameters, calls `fit(task)` on the few-shot data, then `predict(task, task.test)` for
logits on the test split, and asks `trainable_parameters()` for the record.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from harness.backbones import Backbone, encode_text
from harness.cache import cached_tensor, digest
from harness.cards import DatasetCard
from harness.data.images import decode_items, eval_pixels, normalize
from harness.data.readers import Item
from harness.errors import DivergedError

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    REGISTRY[cls.name] = cls
    return cls


class Method:
    name: ClassVar[str]
    paper: ClassVar[str]
    deviations: ClassVar[str] = "none"
    defaults: ClassVar[dict] = {}
    uses_shots: ClassVar[bool] = True  # False: one run per dataset at shots=0 (zero-shot)

    def __init__(self, **hparams):
        self.hp = {**self.defaults, **hparams}

    def fit(self, task: "Task") -> None:
        """Learn from task.train (and task.val where the recipe selects on it)."""

    def predict(self, task: "Task", images: "ImageSet") -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        return 0


@dataclass
class ImageSet:
    """A list of images of one dataset: labels, evaluation pixels (cached), originals (for augmentation)."""

    root: Path
    dataset: str
    items: list[Item]
    size: int
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([it.label for it in self.items], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def key(self) -> str:
        return digest(str(self.root.resolve()), self.dataset, [(i.path, i.label) for i in self.items])

    def eval_pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = eval_pixels(self.root, self.dataset, self.items, self.size)
        return self._pixels

    def originals(self) -> list[torch.Tensor]:
        return decode_items(self.root, self.items)


class Steps:
    """Progress of a training loop; the runner shows it, tests may pass a silent one."""

    def __init__(self, advance: Callable[[int], None] = lambda n: None):
        self._advance = advance

    def advance(self, n: int = 1) -> None:
        self._advance(n)


@dataclass
class Task:
    card: DatasetCard
    classnames: list[str]  # underscores already replaced by spaces
    shots: int
    seed: int
    backbone: Backbone
    precision: str  # fp32 | bf16 | fp16 (autocast dtype on CUDA)
    train: ImageSet
    val: ImageSet
    test: ImageSet
    start_steps: Callable[[int, str], Steps] = lambda total, desc: Steps()
    feature_cache: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def encode_images(self, model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unnormalised image features of uint8 pixels through `model`, batched, under autocast."""
        out = []
        for start in range(0, len(pixels), batch_size):
            with self.autocast():
                out.append(model.encode_image(normalize(pixels[start : start + batch_size], self.device)).float())
        return torch.cat(out) if out else torch.empty(0, self.backbone.embed_dim, device=self.device)

    @torch.no_grad()
    def frozen_features(self, images: ImageSet) -> torch.Tensor:
        """L2-normalised features of the frozen backbone on the evaluation view (cached per sweep)."""
        name = f"{images.dataset}/{digest(self.backbone.name, self.backbone.weights, self.precision)}_{images.key}"
        if name not in self.feature_cache:
            feats = cached_tensor("features", name, lambda: self.encode_images(self.backbone.model, images.eval_pixels()))
            self.feature_cache[name] = F.normalize(feats.to(self.device), dim=-1)
        return self.feature_cache[name]

    @torch.no_grad()
    def text_classifier(self, templates: tuple[str, ...] | list[str], model=None) -> torch.Tensor:
        """Zero-shot weights [C, D]: per class, normalise each template's embedding, average, renormalise."""
        model = model or self.backbone.model
        per_template = []
        for template in templates:
            tokens = self.backbone.tokenize([template.format(c) for c in self.classnames])
            with self.autocast():
                per_template.append(F.normalize(encode_text(model, tokens).float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop a diverging run with a clear error instead of letting it write a number."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DivergedError(f"loss became {value} at step {step}; the run diverged (try a lower learning rate)")


def count_trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
