"""CLIP-Adapter: Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023 (arXiv 2110.04544); the model follows the official gaopengcuhk/CLIP-Adapter `clip_adapter.py`.

Model (official file):
- adapter A = Linear(D -> D/4, no bias) -> ReLU -> Linear(D/4 -> D, no bias) -> ReLU on the image
  feature (D = the backbone's embedding dim; the official file hard-codes RN50's 1024);
- f' = ratio * A(f) + (1 - ratio) * f on the RAW (unnormalised) image feature, ratio 0.2 (hard-coded
  there), then f' and the text weights are L2-normalised, logits = 100 f' t^T;
- t: the zero-shot classifier of the dataset's single CoOp template (the card's `template`), fp32.
  A has no bias and ends in ReLU, so A(c f) = c A(f) for c > 0: blending the raw feature and then
  normalising gives the same logits as blending the normalised feature (the test images use the
  harness's cached normalised features; training uses the raw cached views);
- the text side is the frozen prompt classifier, so any class names can be scored (open vocabulary).

Training recipe: the authors never released it (no config, no script; the official trainer takes
optimizer and epochs from an unpublished Dassl yaml). The default is the re-implementation in the LP++
repo (FereshteShakeri/FewShot-CLIP-Strong-Baseline `methods/clip_adapter.py`, `configs/base.yaml`):
plain SGD lr 0.01 (no momentum, no weight decay), batch 32 (last partial batch kept), 1 warm-up
epoch at 1e-5 then cosine, per epoch (as Dassl steps it; the LP++ file steps its scheduler per batch
with T_max = epochs, which we take for a bug), epochs by shots 50 / 100 / 100 / 200 / 200 (the shot
table commented in that file, CoOp's). Chosen over CLAP's re-implementation because CLAP picks its
lr and ratio on the test set. Train features: `augment_views` (20) cached augmented views of each
image (RandomResizedCrop scale 0.08-1 + flip, Dassl's transform as the official trainer gets it),
epoch e uses view (e - 1) mod 20 (official: a fresh crop every epoch). The LAST epoch is kept: LP++
selects the best epoch on a few-shot val set, which the official Dassl trainer does not do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ImageSet, Method, Task, register
from methods.coop import epochs_for_shots
from methods.dassl_loop import DASSL_SCHEMA, train_on_views
from methods.feature_bank import augmented_views
from methods.hparams import Param


class Adapter(nn.Module):
    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def adapter_parameters(dim: int, reduction: int = 4) -> int:
    """2 * D * D/4: 131,072 for ViT-B/16 and B/32 (D = 512), 294,912 for ViT-L/14 (768)."""
    return 2 * dim * (dim // reduction)


def adapter_logits(adapter: nn.Module, features: torch.Tensor, text: torch.Tensor, ratio: float) -> torch.Tensor:
    """100 cos(ratio A(f) + (1 - ratio) f, t) for image features f [B, D] (raw or normalised) and text t [C, D]."""
    blended = ratio * adapter(features) + (1 - ratio) * features
    return 100.0 * F.normalize(blended, dim=-1) @ F.normalize(text, dim=-1).T


@register
class CLIPAdapter(Method):
    name = "clip_adapter"
    paper = "Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2023"
    deviations = (
        "training recipe is not the authors' (never released): LP++'s re-implementation (SGD lr 0.01, no momentum or "
        "weight decay, batch 32, warm-up + cosine per epoch, CoOp's epochs by shots), last epoch instead of LP++'s "
        "best val epoch; frozen features of 20 cached augmented views (official: a fresh crop each epoch)"
    )
    open_vocabulary = True  # the adapter is on the image side; classes come from the prompt classifier
    defaults = {
        "ratio": 0.2,
        "reduction": 4,
        "lr": 0.01,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "batch_size": 32,
        "epochs": None,  # None: by shots (50 / 100 / 100 / 200 / 200)
        "warmup_epochs": 1,
        "warmup_lr": 1e-5,
        "augment_views": 20,
        "crop_scale": [0.08, 1.0],
    }
    schema = {
        "ratio": Param(float, ge=0, le=1),
        "reduction": Param(int, ge=1),
        "epochs": Param(int, ge=1, optional=True),
        "augment_views": Param(int, ge=1),
        **DASSL_SCHEMA,
    }

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.template = task.card.template
        self.text = task.text_classifier((self.template,))  # [C, D], normalised
        self.adapter = Adapter(task.backbone.embed_dim, hp["reduction"]).to(task.device)
        views = augmented_views(task, hp["augment_views"], tuple(hp["crop_scale"]))  # raw [V, N, D]
        labels = task.train.labels.to(task.device)
        self.epochs = hp["epochs"] or epochs_for_shots(task.shots)
        optimizer = torch.optim.SGD(self.adapter.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])

        def loss_fn(feats, y):
            return F.cross_entropy(adapter_logits(self.adapter, feats, self.text, hp["ratio"]), y)

        train_on_views(task, optimizer, views, labels, self.epochs, hp, loss_fn, "clip-adapter", drop_last=False)
        self.adapter.eval().requires_grad_(False)

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        text = self.text if classnames is None else task.text_classifier((self.template,), classnames=classnames)
        return adapter_logits(self.adapter, task.frozen_features(images), text, self.hp["ratio"])

    def trainable_parameters(self) -> int:
        """The adapter's weights (frozen after fit, so counted by size)."""
        return sum(p.numel() for p in self.adapter.parameters()) if hasattr(self, "adapter") else 0
