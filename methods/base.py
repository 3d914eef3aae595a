"""The one interface every method implements, and the run-time context (`Task`) it receives.

A method is a class with a name, its paper, the official code it follows (`source`), its known
deviations from that code, and a dict of hyper-parameter defaults (the official recipe). The runner
builds it with the resolved hyper-parameters, calls `fit(task)` on the few-shot data, then
`predict(task, images, classnames)` for logits on each evaluation target (the test split; under the
generalisation protocols also new classes or other datasets), and asks `trainable_parameters()` and
`selection()` for the record.

No method sees the test set while it learns: a `Task` holds the few-shot train and val subsets and
the dataset's full val split, never test images or labels; evaluation images reach a method only as
the `images` of `predict`, and their cached features live in `Task.eval_cache`, which the runner
attaches only after `fit` returns. (A method is code and could read files on its own; the interface
never hands it evaluation data.)
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from harness.backbones import Backbone, encode_text, without_visual_projection
from harness.cache import cached_tensor, digest
from harness.cards import DatasetCard
from harness.data.images import content_key, decode_items, eval_pixels, normalize
from harness.data.readers import Item
from harness.errors import DivergedError
from methods.hparams import Param

REGISTRY: dict[str, type["Method"]] = {}

# Device memory the sweep may keep for decoded few-shot originals across runs (Task.train_originals).
ORIGINALS_CACHE_MB = float(os.environ.get("HARNESS_ORIGINALS_CACHE_MB", 4096))


def register(cls: type["Method"]) -> type["Method"]:
    REGISTRY[cls.name] = cls
    return cls


class Method:
    name: ClassVar[str]
    paper: ClassVar[str]
    family: ClassVar[str] = "other"  # what it adapts, for listings (prompt learning, fine-tuning inside the encoders, ...)
    # The official code this file follows, as repository@commit (and Dassl's commit where it matters),
    # or "none (...)" with why; shown by `harness list methods`, stored with each run, in the report.
    source: ClassVar[str] = "unknown"
    deviations: ClassVar[str] = "none"
    defaults: ClassVar[dict] = {}
    schema: ClassVar[dict[str, Param]] = {}  # type and valid range of each default (methods/hparams.py)
    uses_shots: ClassVar[bool] = True  # False: one run per dataset at shots=0 (zero-shot)
    # True: `predict` classifies any class names it is given (prompts, text encoders), so base-to-new
    # and cross-dataset targets apply; False: a class-specific head or cache, which only ever scores
    # its training classes (a target over other classes is stored as not applicable).
    open_vocabulary: ClassVar[bool] = False
    # What the method needs from a backbone's towers, beyond encode_image / encode_text (keys of
    # harness.backbones.CAPABILITIES); a backbone that lacks one refuses the method before any run.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hparams):
        self.hp = {**self.defaults, **hparams}

    def fit(self, task: "Task") -> None:
        """Learn from task.train (and task.val where the recipe selects on it)."""

    def predict(self, task: "Task", images: "ImageSet", classnames: list[str] | None = None) -> torch.Tensor:
        """Logits [N, C] over `classnames` (None: the training classes, task.classnames). Only an
        open-vocabulary method is ever given other class names."""
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        return 0

    def selection(self) -> str:
        """How this run's hyper-parameters were chosen, asked after `fit`: "fixed recipe", or a search
        on the few-shot val subset or the full val split with its size (e.g. "few-shot val search over
        4000 (alpha, beta) pairs"). Never the test set."""
        return "fixed recipe"

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int | None:
        """The epochs this config trains for (per stage where a recipe has stages); None where the recipe
        is not epoch-based. The grid refuses a warm-up that is not shorter than it, before any run."""
        return None

    @classmethod
    def resolve(cls, hp: dict) -> dict:
        """The validated hyper-parameters with file references replaced by their content, so a run
        is keyed by what it used (e.g. zero-shot's template file), never by a path."""
        return hp

    @classmethod
    def config_error(cls, hp: dict, card: DatasetCard) -> str | None:
        """Why this resolved config cannot run on this dataset (checked before any run), or None."""
        return None


@dataclass
class ImageSet:
    """A list of images of one dataset: labels, evaluation pixels (cached), originals (for augmentation).
    `evaluation`: an evaluation target's images (the runner's test sets), whose features are cached
    in `Task.eval_cache`, out of `fit`'s reach."""

    root: Path
    dataset: str
    items: list[Item]
    size: int
    evaluation: bool = False
    resize_mode: str = "shortest"  # the backbone's evaluation resize (harness.backbones.Preprocess)
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([it.label for it in self.items], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def content(self) -> str:
        """These images' `content_key` (one stat per image, once per ImageSet)."""
        return content_key(self.root, self.items)

    @cached_property
    def key(self) -> str:
        """Names these images by content: pixels, features and originals cached under it are
        recomputed when any image changes on disk."""
        return digest(self.dataset, self.content)

    def eval_pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = eval_pixels(self.root, self.dataset, self.items, self.size, self.content, self.resize_mode)
        return self._pixels

    def originals(self, max_short_side: int | None = None) -> list[torch.Tensor]:
        return decode_items(self.root, self.items, max_short_side)


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
    val: ImageSet  # the few-shot val subset
    full_val: ImageSet | None = None  # the dataset's whole val split (empty for ImageNet)
    start_steps: Callable[[int, str], Steps] = lambda total, desc: Steps()
    feature_cache: dict = field(default_factory=dict)  # train-side features and views, shared by the sweep's runs
    # Features of evaluation images (shared by the sweep's runs); None while the method is fitted.
    eval_cache: dict | None = None
    # The run's few-shot train set drawn with another seed (same dataset, shots, sampler, split files,
    # protocol), for recipes that reuse another seed's training (PLOT++'s shared stage 1).
    train_of_seed: Callable[[int], "ImageSet"] | None = None

    def __getattr__(self, name: str):
        """Only for attributes a Task does not have: `task.test` gets a message instead of a bare name."""
        if name == "test":
            raise AttributeError(
                "a Task has no test set: fit() never sees evaluation images or labels; the runner hands them only to "
                "predict(task, images)"
            )
        raise AttributeError(f"'Task' object has no attribute '{name}'")

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the backbone's normalised input (its own mean and std), on the device."""
        pre = self.backbone.preprocess
        return normalize(pixels, self.device, pre.mean, pre.std)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16 autocast, as the official fp16 recipes (CLIP-LoRA's
        GradScaler); a pass-through for fp32 and bf16. Use: scale(loss).backward(), step(opt), update()."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @staticmethod
    def in_batches(fn, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """fn over consecutive batches of `pixels`, concatenated: evaluation sets are scored in batches
        to bound memory."""
        return torch.cat([fn(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)])

    def encode_images(self, model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unnormalised image features of uint8 pixels through `model`, batched, under autocast."""
        if not len(pixels):
            return torch.empty(0, self.backbone.embed_dim, device=self.device)

        def encode(batch):
            with self.autocast():
                return model.encode_image(self.normalize(batch)).float()

        return self.in_batches(encode, pixels, batch_size)

    def train_originals(self, max_short_side: int | None = None) -> list[torch.Tensor]:
        """The few-shot originals (uint8, decoded once) on the device, shared by the sweep's runs on
        the same few-shot set through `feature_cache` (least recently used sets are dropped beyond
        ORIGINALS_CACHE_MB, the set in use always kept). Callers must not modify them in place."""
        key = ("originals", self.train.key, max_short_side, str(self.device))
        cache = self.feature_cache
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
            return cache[key]
        cache[key] = [im.to(self.device) for im in self.train.originals(max_short_side)]
        budget = ORIGINALS_CACHE_MB * 2**20
        held = [k for k in cache if isinstance(k, tuple) and k[0] == "originals"]
        size = {k: sum(t.numel() * t.element_size() for t in cache[k]) for k in held}
        while len(held) > 1 and sum(size[k] for k in held) > budget:
            del cache[held.pop(0)]
        return cache[key]

    @torch.no_grad()
    def frozen_features(self, images: ImageSet, pre_projection: bool = False) -> torch.Tensor:
        """L2-normalised features of the frozen backbone on the evaluation view (cached per sweep;
        an evaluation target's in `eval_cache`, which exists only once fit has returned). With
        `pre_projection`: the image tower's raw output before CLIP's visual projection."""
        cache = self.feature_cache
        if images.evaluation:
            if self.eval_cache is None:
                raise RuntimeError("evaluation images reached a Task during fit(); only predict() may see them")
            cache = self.eval_cache
        identity = (self.backbone.name, self.backbone.weights, self.precision) + (("pre-projection",) if pre_projection else ())
        name = f"{images.dataset}/{digest(*identity)}_{images.key}"
        if name not in cache:
            model = self.backbone.model
            with without_visual_projection(model) if pre_projection else contextlib.nullcontext():
                feats = cached_tensor("features", name, lambda: self.encode_images(model, images.eval_pixels()))
            feats = feats.to(self.device)
            cache[name] = feats.float() if pre_projection else F.normalize(feats, dim=-1)
        return cache[name]

    @torch.no_grad()
    def text_classifier(self, templates: tuple[str, ...] | list[str], model=None, classnames: list[str] | None = None) -> torch.Tensor:
        """Zero-shot weights [C, D]: per class, normalise each template's embedding, average, renormalise."""
        model = model or self.backbone.model
        per_template = []
        for template in templates:
            tokens = self.backbone.tokenize([template.format(c) for c in (classnames or self.classnames)])
            with self.autocast():
                per_template.append(F.normalize(encode_text(model, tokens).float(), dim=-1))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop a diverging run with a clear error instead of letting it write a number."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DivergedError(f"loss became {value} at step {step}; the run diverged (try a lower learning rate)")


class FiniteGuard:
    """`check_finite` without a host sync at every step: the first non-finite loss (step and value)
    is recorded on the device and read back every `every` steps and at `close()`, so a diverged
    run still fails with the same error, at most `every - 1` steps later."""

    def __init__(self, every: int = 50):
        self.every = every
        self.first_step: torch.Tensor | None = None  # -1 while every loss was finite
        self.first_value: torch.Tensor | None = None
        self.seen = 0

    def update(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.first_value = torch.zeros((), device=loss.device)
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, loss, self.first_value)
        self.seen += 1
        if self.seen % self.every == 0:
            self.check()

    def check(self) -> None:
        if self.first_step is not None and int(self.first_step) >= 0:
            check_finite(self.first_value, int(self.first_step))

    close = check


def count_trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
