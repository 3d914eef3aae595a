"""CLIP-LoRA: Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models",
CVPR Workshops 2024 (arXiv 2405.18541; official code MaxZanella/CLIP-LoRA, `lora.py`, `loralib/`).

Recipe (the defaults below): LoRA on q, k, v of every attention block of both encoders, r = 2,
alpha = 1, scaling alpha / sqrt(r), dropout 0.25 on the branch input; AdamW lr 2e-4, wd 1e-2,
betas (0.9, 0.999); cosine from 2e-4 to 1e-6 over 500 * K steps, stepped every step, no warm-up;
batch 32 drawn from shuffled passes over the few-shot set (last partial batch kept, as the
official DataLoader's drop_last=False); RandomResizedCrop(scale 0.08-1, bicubic) + flip; prompt
"a photo of a {}." for every dataset, all class prompts re-encoded through the adapted text
encoder every step; cross-entropy on 100 * cos(image, text); the last step is evaluated.

Deviations (named, and recorded in each run's config through the precision field / hparams):
- precision: bf16 autocast on CUDA by default (official: fp16 autocast + GradScaler, which
  `--precision fp16` runs), fp32 on CPU;
- LoRA computed factored, (x A^T) B^T, instead of materialising B @ A at every forward (same
  function; see methods/lora.py), and merged into the weights for evaluation;
- augmentation runs on uint8 tensors on the device (torchvision v2, antialiased bicubic) instead of
  PIL in a DataLoader (at most 2/255 apart per pixel on the demo images, bench/resize_fidelity.py); the text tower runs on the prompt tokens only (identical features);
- `steps_per_shot` may be scaled down by a suite override (the demo suite does);
- a ResNet image tower (no official counterpart) has attention only in its final pooling: LoRA adapts
  that pooling's q, k, v projections (methods/lora.py `AdaptedAttentionPool`), the text tower as usual;
- `max_short_side` (default None: off) downscales few-shot originals before they go to the device
  (16-shot ImageNet at full resolution would hold ~10 GB on the GPU); recorded in the config.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from harness.backbones import encode_text
from harness.data.images import AUGMENT_DEVIATION, random_resized_crops
from methods.base import FiniteGuard, ImageSet, Method, Task, register
from methods.hparams import Param
from methods.lora import adapted_copy, lora_factory, merge_adapters

ENCODERS = {"both": ("vision", "text"), "vision": ("vision",), "text": ("text",)}


def parse_params(value) -> tuple[str, ...]:
    """'q,k,v' | 'qkv' | ['q', 'k', 'v'] -> ('q', 'k', 'v')."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")] if "," in value else list(value.strip())
    return tuple(v for v in value if v)


def shuffled_batches(n: int, batch_size: int):
    """Index batches from successive shuffled passes; the last batch of a pass may be short."""
    while True:
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def no_section(name: str):
    return contextlib.nullcontext()


@dataclass
class LoRATraining:
    """The state of one CLIP-LoRA training run between `start_training` and `finish_training`."""

    images: list[torch.Tensor]  # few-shot originals, uint8, on the device
    labels: torch.Tensor
    total: int  # optimiser steps of the run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    text_frozen: torch.Tensor | None  # text features when the text tower is not adapted
    encoders: tuple[str, ...]
    batches: Iterator[torch.Tensor]
    guard: FiniteGuard
    scaler: torch.amp.GradScaler  # fp16: dynamic loss scaling (official recipe); otherwise a pass-through


@register
class CLIPLoRA(Method):
    name = "clip_lora"
    requires = ("attention_blocks",)
    family = "fine-tuning inside the encoders"
    paper = "Zanella & Ben Ayed, Low-Rank Few-Shot Adaptation of Vision-Language Models, CVPRW 2024 (arXiv 2405.18541)"
    source = "MaxZanella/CLIP-LoRA@358f0d7361f5 (lora.py, loralib/, main.py)"
    deviations = (
        "bf16 autocast on CUDA by default instead of fp16 + GradScaler (--precision fp16 runs the official one; fp32 on CPU); LoRA factored (x A^T) B^T in training "
        f"and merged for evaluation instead of B@A at every forward (same function); {AUGMENT_DEVIATION}; "
        "text tower on the prompt tokens only (same features); suite overrides may lower steps_per_shot; "
        "few-shot subsets from CoOp's draw by default (CLIP-LoRA's own draw, val first and padded: --sampler clip_lora); "
        "on a ResNet image tower (no official counterpart) the q, k, v of its attention pooling"
    )
    open_vocabulary = True
    defaults = {
        "r": 2,
        "alpha": 1.0,
        "dropout": 0.25,
        "encoders": "both",  # both | vision | text
        "params": "q,k,v",  # any of q, k, v, o
        "lr": 2e-4,
        "min_lr": 1e-6,
        "weight_decay": 1e-2,
        "betas": [0.9, 0.999],
        "batch_size": 32,
        "steps_per_shot": 500,  # total optimizer steps = steps_per_shot * K
        "crop_scale": [0.08, 1.0],
        "template": "a photo of a {}.",  # the same prompt for every dataset
        "logit_scale": 100.0,
        # None: few-shot originals at full resolution (official). An int S downscales (bicubic,
        # antialiased) originals whose shorter side exceeds S before they go to the device, so
        # 16-shot ImageNet fits in GPU memory; a named deviation when set (it is in the config).
        "max_short_side": None,
    }
    schema = {
        "r": Param(int, ge=1),
        "alpha": Param(float, gt=0),
        "dropout": Param(float, ge=0, lt=1),
        "encoders": Param(str, choices=tuple(ENCODERS)),
        "params": Param(str),
        "lr": Param(float, gt=0),
        "min_lr": Param(float, ge=0),
        "weight_decay": Param(float, ge=0),
        "betas": Param(list, item=float, length=2, ge=0, lt=1),
        "batch_size": Param(int, ge=1),
        "steps_per_shot": Param(int, ge=1),
        "crop_scale": Param(list, item=float, length=2, gt=0, le=1),
        "template": Param(str),
        "logit_scale": Param(float, gt=0),
        "max_short_side": Param(int, ge=1, optional=True),
    }

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        if "{}" not in hp["template"]:
            return f"template '{hp['template']}' has no {{}} for the class name."
        unknown = set(parse_params(hp["params"])) - set("qkvo")
        if unknown or not parse_params(hp["params"]):
            return f"params '{hp['params']}' must name some of q, k, v, o."
        return None

    def make_adapter_factory(self):
        hp = self.hp
        return lora_factory(int(hp["r"]), float(hp["alpha"]), float(hp["dropout"]))

    # What a method that trains inside the encoders with this loop changes (CLIP-SVD, 2SFS):
    def build_model(self, task: Task, encoders: tuple[str, ...]) -> tuple[torch.nn.Module, list[torch.Tensor]]:
        """A copy of the backbone to train (task.backbone.model is shared by the sweep's runs and must
        stay untouched) and its trainable parameters."""
        return adapted_copy(task.backbone.model, self.make_adapter_factory(), encoders, parse_params(self.hp["params"]))

    def prompt(self, task: Task) -> str:
        return self.hp["template"]

    def total_steps(self, task: Task) -> int:
        return int(self.hp["steps_per_shot"]) * task.shots

    def merge(self) -> None:
        """Fold what was learned into plain weights for evaluation (no adapter overhead)."""
        merge_adapters(self.model)

    def fit(self, task: Task) -> None:
        state = self.start_training(task)
        steps = task.start_steps(state.total, f"{self.name} steps")
        for step in range(state.total):
            self.train_step(task, state, step)
            steps.advance()
        self.finish_training(state)

    def start_training(self, task: Task) -> "LoRATraining":
        """Everything before the first step: adapted copy, few-shot images on the device, optimiser."""
        hp = self.hp
        if hp["encoders"] not in ENCODERS:
            raise ValueError(f"encoders must be one of {', '.join(ENCODERS)}, not '{hp['encoders']}'.")
        encoders = ENCODERS[hp["encoders"]]
        self.model, params = self.build_model(task, encoders)
        self.n_trainable = sum(p.numel() for p in params)
        self.template = self.prompt(task)
        self.tokens = task.backbone.tokenize([self.template.format(c) for c in task.classnames])

        # decoded once, kept on the device (and shared by the sweep's runs on the same few-shot set)
        images = task.train_originals(hp["max_short_side"])
        labels = task.train.labels.to(task.device)
        total = self.total_steps(task)
        optimizer = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), betas=tuple(hp["betas"]))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=float(hp["min_lr"]))

        text_frozen = None
        if "text" not in encoders:  # text tower untouched: its features are constant
            with torch.no_grad(), task.autocast():
                text_frozen = F.normalize(encode_text(self.model, self.tokens).float(), dim=-1)

        self.model.train()  # activates the adapters' dropout (CLIP itself has none)
        return LoRATraining(
            images=images, labels=labels, total=total, optimizer=optimizer, scheduler=scheduler, text_frozen=text_frozen,
            encoders=encoders, batches=shuffled_batches(len(images), int(hp["batch_size"])), guard=FiniteGuard(),
            scaler=task.grad_scaler(),
        )

    def train_step(self, task: Task, state: "LoRATraining", step: int, section=no_section) -> torch.Tensor:
        """One optimiser step. `section(name)` brackets its parts (data, text, image, backward,
        optimizer) for the benchmark's timers; by default it does nothing."""
        hp = self.hp
        with section("data"):
            idx = next(state.batches)
            pixels = random_resized_crops([state.images[i] for i in idx.tolist()], task.backbone.image_size, tuple(hp["crop_scale"]))
            pixels = task.normalize(pixels)
        with task.autocast():
            with section("text"):
                if state.text_frozen is None:
                    text = F.normalize(encode_text(self.model, self.tokens).float(), dim=-1)
                else:
                    text = state.text_frozen
            with section("image"), torch.set_grad_enabled("vision" in state.encoders):
                image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with section("backward"):
            loss = F.cross_entropy(float(hp["logit_scale"]) * image @ text.T, state.labels[idx.to(state.labels.device)])
            state.guard.update(loss, step)  # no host sync per step; a non-finite loss still fails the run
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
        with section("optimizer"):
            state.scaler.step(state.optimizer)
            state.scaler.update()
            with warnings.catch_warnings():
                # fp16: when the scaler skips an overflowing step, torch warns that the schedule moved before the
                # optimizer; the official loop steps the schedule every iteration regardless, and so does this one
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
                state.scheduler.step()
        return loss

    def finish_training(self, state: "LoRATraining") -> None:
        state.guard.close()
        self.model.eval()
        self.merge()  # the last step is evaluated

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        self.merge()
        self.model.eval()
        tokens = self.tokens if classnames is None else task.backbone.tokenize([self.template.format(c) for c in classnames])
        with task.autocast():
            text = F.normalize(encode_text(self.model, tokens).float(), dim=-1)
        feats = F.normalize(task.encode_images(self.model, images.eval_pixels()), dim=-1)
        return float(self.hp["logit_scale"]) * feats @ text.T

    def trainable_parameters(self) -> int:
        return getattr(self, "n_trainable", 0)
