"""CLAP: Silva-Rodriguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language
Models", CVPR 2024; follows the official jusiro/CLAP code (`trainers/adapters.py`, INIT=ZS,
CONSTRAINT=l2, `configs/trainers/SGD_lr1e-1_B256_ep300.yaml`).

- prototypes W [C, D] initialised to the zero-shot text embeddings t: per class the mean of the
  UNnormalised text features over the templates (ImageNet: the 7 select templates + "a photo of a
  {}."; other datasets: the card's single CoOp template), as TaskRes's base;
- logits = 100 cos(f, w_c) (CLIP's scale, fixed);
- loss = CE + mean_c(lambda_c ||w_c - t_c||^2), lambda_c fixed before training ("l2" mode of
  `init_lagrangian_multipliers`): the zero-shot model's mean softmax probability of the true class
  over class c's augmented support features (all views);
- support features: 20 augmented views per image, encoded once (RandomResizedCrop scale 0.08-1 +
  flip, Dassl's), the bank shared with TaskRes; 300 epochs, each shuffling the 20N-feature bank and
  taking as many batches of 256 as Dassl's image loader holds (N // 256 with the last partial batch
  dropped, at least 1: about N samples); SGD lr 0.1, momentum 0.9, weight decay 0; 1 warm-up epoch
  at 1e-5 then cosine, per epoch; last epoch (no validation); fp32.
- `constraint: none` is the paper's ZS-LP baseline (same initialisation, CE only).

Deviations: class names with underscores replaced by spaces (the official code formats the raw CoOp
names); none otherwise known. ImageNet-A/-R use their 200 classes' rows (the harness restricts the
logits by class name, as the official `load_model` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.cards import DatasetCard
from methods.base import ImageSet, Method, Task, register
from methods.dassl_loop import DASSL_SCHEMA, train_on_features
from methods.feature_bank import augmented_views
from methods.hparams import Param
from methods.taskres import base_templates, raw_text_base


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return 100.0 * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T


@torch.no_grad()
def lagrangian_multipliers(features: torch.Tensor, labels: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """lambda_c: mean zero-shot softmax probability of the true class over class c's support features [M, D]."""
    probs = cosine_logits(features, base).softmax(-1)
    true = probs.gather(1, labels[:, None]).squeeze(1)
    c = base.shape[0]
    total = torch.zeros(c, device=features.device).index_add_(0, labels, true)
    count = torch.zeros(c, device=features.device).index_add_(0, labels, torch.ones_like(true))
    return total / count.clamp(min=1)


def clap_loss(features, labels, prototypes, base, lam) -> torch.Tensor:
    """CE(100 cos(f, w), y) + mean_c(lambda_c ||w_c - t_c||^2)."""
    ce = F.cross_entropy(cosine_logits(features, prototypes), labels)
    return ce + (lam * (prototypes - base).pow(2).sum(-1)).mean()


def train_prototypes(views: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, lam: torch.Tensor, hp: dict,
                     steps=None) -> torch.Tensor:
    """SGD on prototypes initialised to `base` over the pooled bank of normalised view features
    [V, N, D] (labels [N]); returns W."""
    prototypes = base.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([prototypes], lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])

    def loss_fn(feats, y):
        return clap_loss(feats, y, prototypes, base, lam)

    train_on_features(optimizer, views, labels, hp["epochs"], hp, loss_fn, steps, pooled=True)
    return prototypes.detach()


@register
class CLAP(Method):
    name = "clap"
    family = "linear probe on frozen features"
    paper = "Silva-Rodriguez et al., A Closer Look at the Few-Shot Adaptation of Large Vision-Language Models, CVPR 2024"
    source = "jusiro/CLAP@dbdf4095b3d8 (trainers/adapters.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "class names with underscores replaced by spaces (official: raw CoOp names); text base and frozen features in "
        "the run's precision (official: the fp16 CLIP, adapters.py:91-128, cast to fp32 only at :520)"
    )
    defaults = {
        "constraint": "l2",  # none: ZS-LP
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "batch_size": 256,
        "epochs": 300,
        "warmup_epochs": 1,
        "warmup_lr": 1e-5,
        "augment_views": 20,
        "crop_scale": [0.08, 1.0],
    }
    schema = {
        "constraint": Param(str, choices=("l2", "none")),
        "epochs": Param(int, ge=1),
        "augment_views": Param(int, ge=1),
        **DASSL_SCHEMA,
    }

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return hp["epochs"]

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.base = raw_text_base(task, base_templates(task))  # [C, D]
        views = F.normalize(augmented_views(task, hp["augment_views"], tuple(hp["crop_scale"])), dim=-1)  # [V, N, D]
        labels = task.train.labels.to(task.device)
        if hp["constraint"] == "l2":  # over all views
            self.lam = lagrangian_multipliers(views.reshape(-1, views.shape[-1]), labels.repeat(len(views)), self.base)
        else:
            self.lam = torch.zeros(len(self.base), device=task.device)
        steps = task.start_steps(hp["epochs"], "clap epochs")
        self.prototypes = train_prototypes(views, labels, self.base, self.lam, hp, steps)

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        """The training classes only: one prototype per training class."""
        return cosine_logits(task.frozen_features(images), self.prototypes)

    def trainable_parameters(self) -> int:
        return self.prototypes.numel() if hasattr(self, "prototypes") else 0
