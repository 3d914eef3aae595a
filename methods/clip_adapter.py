"""CLIP-Adapter: Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023 (arXiv 2110.04544). The model is the official gaopengcuhk/CLIP-Adapter@08d07f8
`clip_adapter.py`; the training recipe is the one CLAP's code runs for its CLIP-Adapter baseline
(jusiro/CLAP@dbdf409, `ClipA`), because the authors released no recipe of their own.

Model (official `clip_adapter.py`:97, :104; CLAP `trainers/adapters.py`:183-191, :372-389):
- adapter A = Linear(D -> D/4, no bias) -> ReLU -> Linear(D/4 -> D, no bias) -> ReLU on the image
  feature (D from the text features, as CLAP; the official file hard-codes RN50's 1024);
- f' = ratio * A(f) + (1 - ratio) * f on the RAW image feature, ratio 0.2 (`init_clipA` default,
  adapters.py:183; the official file's :104), then f' and the text weights are L2-normalised,
  logits = 100 f' t^T (CLIP's logit scale; adapters.py:386);
- t: per class the mean of the UNnormalised text features over the templates (adapters.py:112-127:
  ImageNet the 7 select templates + "a photo of a {}.", else the dataset's single CoOp template),
  the base that TaskRes and CLAP share. A has no bias and ends in ReLU, so A(c f) = c A(f) for
  c > 0: the test images' cached normalised features give the same logits as raw ones;
- the text side is frozen, so any class names can be scored (open vocabulary).

Why this recipe: the official repository holds only the model file (README:14-16: "complete codes
will be released soon"; its trainer takes optimizer and epochs from a Dassl yaml that was never
published). LP++'s re-implementation (FereshteShakeri/FewShot-CLIP-Strong-Baseline@f81054f) cannot
run as shipped: its live `configs/base.yaml` values (lr 0.001, batch 256, 300 epochs) differ from
the ones in its comments, its epoch table sits in a string literal, its cosine is stepped per batch,
D is fixed at 1024 (no ViT-B/16), and after training it loads a checkpoint it never writes. CLAP's
shipped script (`experiments/experiment_baselines.txt`:3, `SGD_lr1e-1_B256_ep300 ... ClipA`) is
complete, and selects nothing on the test set: test accuracy is only logged (adapters.py:712-717);
only its `grid_search` mode, which no shipped script uses, picks lr and ratio on test.

Recipe (CLAP@dbdf409, `configs/trainers/SGD_lr1e-1_B256_ep300.yaml` = yaml, Dassl@c61a1b5 defaults):
- SGD lr 0.1 (yaml:16-17), momentum 0.9 (Dassl `defaults.py`:154, not overridden), weight decay 0
  (yaml:23); 300 epochs (yaml:18), batch 256 (yaml:3); 1 constant warm-up epoch at 1e-5 then cosine
  with T_max 300 (yaml:19-22), stepped per epoch (adapters.py:720-721); last epoch (no val); fp32
  training (adapters.py:520);
- features: 20 augmented passes over the few-shot images (adapters.py:142-143, :537-538), crops
  RandomResizedCrop (0.08, 1) bicubic + flip (yaml:10, :13; Dassl `defaults.py`:40), encoded once and
  pooled into one bank of 20N; each epoch shuffles the bank and takes as many batches of 256 as
  Dassl's loader over the N images holds (adapters.py:431, :445-455), `dassl_loop.train_on_features`.

Deviations: the 20 views are the harness's shared bank (`feature_bank.augmented_views`: its own crop
stream, shared with TaskRes and CLAP); frozen features and text base in the run's precision (CLAP
computes them with the fp16 CLIP, adapters.py:520 casts only afterwards); class names with
underscores replaced by spaces. Whether the CLIP-LoRA paper's CLIP-Adapter row came from this
recipe is unknown (its repository names no source).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.cards import DatasetCard
from methods.base import ImageSet, Method, Task, register
from methods.dassl_loop import DASSL_SCHEMA, train_on_features
from methods.feature_bank import augmented_views
from methods.hparams import Param
from methods.taskres import base_templates, raw_text_base


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
    family = "adapter on frozen features"
    paper = "Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2023"
    source = "gaopengcuhk/CLIP-Adapter@08d07f8b2eca (model); jusiro/CLAP@dbdf4095b3d8 (training recipe, ClipA)"
    deviations = (
        "training recipe is CLAP's CLIP-Adapter baseline (the authors released none): SGD lr 0.1, momentum 0.9, no "
        "weight decay, batch 256, 300 epochs over a pooled bank of 20 augmented views, last epoch; the views are the "
        "harness's shared bank; frozen features and text base in the run's precision (CLAP: fp16 CLIP); class names "
        "with underscores replaced by spaces"
    )
    open_vocabulary = True  # the adapter is on the image side; classes come from the prompt classifier
    defaults = {
        "ratio": 0.2,
        "reduction": 4,
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
        "ratio": Param(float, ge=0, le=1),
        "reduction": Param(int, ge=1),
        "epochs": Param(int, ge=1),
        "augment_views": Param(int, ge=1),
        **DASSL_SCHEMA,
    }

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return hp["epochs"]

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.text = raw_text_base(task, base_templates(task))  # [C, D], unnormalised
        self.adapter = Adapter(task.backbone.embed_dim, hp["reduction"]).to(task.device)
        views = augmented_views(task, hp["augment_views"], tuple(hp["crop_scale"]))  # raw [V, N, D]
        labels = task.train.labels.to(task.device)
        optimizer = torch.optim.SGD(self.adapter.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])

        def loss_fn(feats, y):
            return F.cross_entropy(adapter_logits(self.adapter, feats, self.text, hp["ratio"]), y)

        steps = task.start_steps(hp["epochs"], "clip-adapter epochs")
        train_on_features(optimizer, views, labels, hp["epochs"], hp, loss_fn, steps, pooled=True)
        self.adapter.eval().requires_grad_(False)

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        text = self.text if classnames is None else raw_text_base(task, base_templates(task), classnames)
        return adapter_logits(self.adapter, task.frozen_features(images), text, self.hp["ratio"])

    def trainable_parameters(self) -> int:
        """The adapter's weights (frozen after fit, so counted by size)."""
        return sum(p.numel() for p in self.adapter.parameters()) if hasattr(self, "adapter") else 0
