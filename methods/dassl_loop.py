"""The Dassl training loop that the prompt learners' official code shares (CoOp, CoCoOp, KgCoOp,
ProGrad, MaPLe, PLOT++ all train through Dassl's `TrainerX`), written once so each method file
holds only what its paper changes: the forward pass and the loss.

Per epoch: the learning rate of `coop_lr` (epoch 1 constant warm-up, then cosine, stepped per
epoch), a fresh permutation, batches of `batch_size` (the last incomplete one dropped when the set
fills at least one batch, Dassl's rule), RandomResizedCrop + flip crops drawn in that order from
torch's global generator, SGD with momentum and weight decay (AdamW where the recipe's `optim` says
so, as Dassl's OPTIM.NAME), the last epoch kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from harness.data.images import random_resized_crops
from methods.base import FiniteGuard, Task
from methods.hparams import Param


def coop_lr(epoch: int, max_epoch: int, lr: float = 0.002, warmup_lr: float = 1e-5, warmup_epochs: int = 1) -> float:
    """Learning rate of 1-based `epoch`: Dassl's ConstantWarmupScheduler around CosineAnnealingLR.

    The warm-up epochs count toward `max_epoch`; the cosine restarts from `lr` right after them,
    so epoch e > warmup gets lr/2 * (1 + cos(pi * (e - warmup - 1) / max_epoch)) (with the defaults:
    0.001 * (1 + cos(pi * (e - 2) / max_epoch))); it never reaches 0 within the run.
    """
    if epoch <= warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs - 1) / max_epoch))


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Dassl drops the last incomplete batch only when the set holds at least one full batch."""
    return n // batch_size if n >= batch_size else math.ceil(n / batch_size)


# forward_backward(crops uint8 [B, 3, S, S], labels [B], scaler) -> the loss (backward already done)
ForwardBackward = Callable[[torch.Tensor, torch.Tensor, torch.amp.GradScaler], torch.Tensor]


def train(task: Task, params: list[torch.Tensor], hp: dict, epochs: int, forward_backward: ForwardBackward, desc: str,
          on_epoch_end: Callable[[int], None] | None = None) -> list[float]:
    """Run the loop; returns each epoch's learning rate. `hp` holds lr, momentum (SGD), weight_decay,
    warmup_epochs, warmup_lr, batch_size, crop_scale and optionally optim (the method's resolved recipe);
    `on_epoch_end(epoch)` runs after each epoch's last step (PromptSRC's prompt aggregation)."""
    images = task.train_originals()  # decoded once per few-shot set, on the device
    labels = task.train.labels.to(task.device)
    n, bs = len(images), hp["batch_size"]
    if hp.get("optim", "sgd") == "adamw":  # Dassl's adamw (MMRL): betas 0.9 / 0.999, decoupled weight decay
        optimizer = torch.optim.AdamW(params, lr=hp["lr"], betas=(0.9, 0.999), weight_decay=hp["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    scaler = task.grad_scaler()
    guard = FiniteGuard()
    steps = task.start_steps(epochs, f"{desc} epochs")
    epoch_lrs, step = [], 0
    for epoch in range(1, epochs + 1):
        lr = coop_lr(epoch, epochs, hp["lr"], hp["warmup_lr"], hp["warmup_epochs"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_lrs.append(lr)
        order = torch.randperm(n).tolist()
        for b in range(batches_per_epoch(n, bs)):
            idx = order[b * bs : (b + 1) * bs]
            with torch.no_grad():
                crops = random_resized_crops([images[i] for i in idx], task.backbone.image_size, tuple(hp["crop_scale"]))
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(crops, labels[idx], scaler)
            guard.update(loss, step)
            scaler.step(optimizer)
            scaler.update()
            step += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        steps.advance()
    guard.close()
    return epoch_lrs


def train_on_features(optimizer: torch.optim.Optimizer, views: torch.Tensor, labels: torch.Tensor, epochs: int, hp: dict,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps=None, pooled: bool = False) -> None:
    """The same schedule on cached features of V augmented views of N images (views [V, N, D],
    labels [N]) instead of fresh crops. Each epoch takes as many shuffled batches of `batch_size` as
    Dassl's loader over the N images holds, from:
    - pooled=False (TaskRes): view (e - 1) mod V of every image in epoch e;
    - pooled=True (CLAP's loop, jusiro/CLAP@dbdf409 `trainers/adapters.py`:431-455, which CLAP and its
      CLIP-Adapter baseline run): the whole bank of V x N features, shuffled every epoch.
    loss_fn(features, labels) -> loss. `hp` holds lr, warmup_epochs, warmup_lr and batch_size."""
    v, n = views.shape[:2]
    bs = hp["batch_size"]
    pool, pool_labels = views.reshape(v * n, -1), labels.repeat(v)
    guard, step = FiniteGuard(), 0
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = coop_lr(epoch, epochs, hp["lr"], hp["warmup_lr"], hp["warmup_epochs"])
        feats, y = (pool, pool_labels) if pooled else (views[(epoch - 1) % v], labels)
        order = torch.randperm(len(y), device=views.device)
        for b in range(batches_per_epoch(n, bs)):
            idx = order[b * bs : (b + 1) * bs]
            loss = loss_fn(feats[idx], y[idx])
            guard.update(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if steps is not None:
            steps.advance()
    guard.close()


DASSL_DEFAULTS = {
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,  # Dassl's default, applied by every prompt learner's config
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "batch_size": 32,
    "crop_scale": [0.08, 1.0],
}

DASSL_SCHEMA = {
    "lr": Param(float, gt=0),
    "momentum": Param(float, ge=0, lt=1),
    "weight_decay": Param(float, ge=0),
    "warmup_epochs": Param(int, ge=0),
    "warmup_lr": Param(float, ge=0),
    "batch_size": Param(int, ge=1),
    "crop_scale": Param(list, item=float, length=2, gt=0, le=1),
}
