"""ProLIP: Fahes, Vu, Bursuc, Pérez, de Charette, "CLIP's Visual Embedding Projector is a Few-shot
Cornucopia", WACV 2026 (arXiv 2410.05270). Follows astra-vision/ProLIP@b43e795 (`methods/ProLIP.py`, `main.py`, `clip/model.py`,
`configs/experiments/few_shot_no_val_lr1e-5_lambda_1_N.yaml`), the validation-free recipe.

- trains only CLIP's visual projection W (ViT: `visual.proj`, width x D: 393,216 on ViT-B/16), from
  its pretrained value W0, on cached features of the image tower before the projection (ln_post of
  the class token; clip/model.py:228-235);
- logits = 100 normalise(x W) T^T, T the frozen zero-shot classifier of the card's templates (one
  CoOp template; ImageNet's 7-template ensemble; utils.py:31-56), logit scale fixed at 100 (line 193);
- loss = CE + lambda ||W - W0||^2 (squared Frobenius norm, summed: MSELoss(reduction='sum'),
  lines 79, 198-205), lambda = 1/N with N the shots per class (lines 140-141);
- Adam lr 1e-5, eps 1e-4, cosine annealing over the 300 iterations stepped every iteration, no
  warm-up (lines 165-166, 216); each iteration is ONE full-batch step on all C*K features of one
  cached augmented view, iteration e using view (e + 1) mod V (its counter, lines 177-183), with
  V = 300 views (save_feat*.yaml:14) of RandomResizedCrop scale (0.5, 1) bicubic + flip
  (main.py:72-77; ImageNet (0.08, 1), datasets/imagenet.py:192: its card's recipe);
- no validation: the last iterate (the val loader is built but unused in this recipe);
- any class names go through the frozen text encoder with the learned projection on the image
  side (ProLIP_eval.py:75-91): open vocabulary; another dataset's classes use that dataset's templates.

Deviations: W trained in fp32 (official: the fp16 checkpoint's own fp16 tensor, hence its eps);
views from the harness's shared bank (its own crop stream; the official code saves 300 views per
image, which the demo suite lowers); the harness's CoOp subsets and seeds 1-3 (official: 10 seeds
of its own random draws). Not on ResNets (the RN `attnpool.c_proj` variant is not built). On a
timm image tower whose projection is a Linear (EVA-02, PE-Core; no official counterpart) W is that
Linear's weight, transposed, and its bias stays frozen; SigLIP's towers have no projection: refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.backbones import visual_projection
from harness.cards import get_card
from methods.base import FiniteGuard, ImageSet, Method, Task, register
from methods.feature_bank import augmented_views
from methods.hparams import Param


def prolip_logits(pre_features: torch.Tensor, projection: torch.Tensor, text: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """100 cos(x W (+ b), t) for pre-projection features x [B, width], W [width, D], normalised text t [C, D]
    (b: the frozen bias of a timm tower's projection Linear)."""
    projected = pre_features @ projection
    return 100.0 * F.normalize(projected if bias is None else projected + bias, dim=-1) @ text.T


def prolip_loss(pre_features, labels, projection, initial, text, lam: float, bias=None) -> torch.Tensor:
    """CE + lambda * ||W - W0||^2 (summed squares, as MSELoss(reduction='sum'))."""
    return F.cross_entropy(prolip_logits(pre_features, projection, text, bias), labels) + lam * (projection - initial).pow(2).sum()


@register
class ProLIP(Method):
    name = "prolip"
    requires = ("visual_proj",)
    family = "projection tuning on frozen features"
    paper = "Fahes et al., CLIP's Visual Embedding Projector is a Few-shot Cornucopia (ProLIP), WACV 2026 (arXiv 2410.05270)"
    source = "astra-vision/ProLIP@b43e795cbf0b (methods/ProLIP.py, validation-free config lr 1e-5, lambda 1/N)"
    deviations = (
        "projection trained in fp32 (official: fp16 tensor); views from the harness's shared bank; CoOp subsets and "
        "seeds 1-3 (official: 10 seeds of its own draws); not on ResNets; on a timm tower's projection Linear (EVA-02, "
        "PE-Core; no official counterpart) its weight is W and its bias stays frozen"
    )
    open_vocabulary = True
    defaults = {
        "lr": 1e-5,
        "eps": 1e-4,
        "iterations": 300,
        "lam": None,  # None: 1/N, N the shots per class
        "augment_views": 300,
        "crop_scale": [0.5, 1.0],  # ImageNet's card: [0.08, 1.0]
    }
    schema = {
        "lr": Param(float, gt=0),
        "eps": Param(float, gt=0),
        "iterations": Param(int, ge=1),
        "lam": Param(float, ge=0, optional=True),
        "augment_views": Param(int, ge=1),
        "crop_scale": Param(list, item=float, length=2, gt=0, le=1),
    }

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.text = task.text_classifier(task.card.ensemble)  # [C, D], normalised
        self.initial, self.bias = visual_projection(task.backbone.model)  # W0 [width, D]; a timm Linear's bias, frozen
        self.lam = hp["lam"] if hp["lam"] is not None else 1.0 / task.shots
        views = augmented_views(task, hp["augment_views"], tuple(hp["crop_scale"]), pre_projection=True)  # [V, N, width]
        labels = task.train.labels.to(task.device)
        projection = self.initial.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([projection], lr=hp["lr"], eps=hp["eps"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, hp["iterations"])
        guard, steps = FiniteGuard(), task.start_steps(hp["iterations"], "prolip iterations")
        for it in range(hp["iterations"]):
            loss = prolip_loss(views[(it + 1) % len(views)], labels, projection, self.initial, self.text, self.lam, self.bias)
            guard.update(loss, it)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps.advance()
        guard.close()
        self.projection = projection.detach()

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        if classnames is None:
            text = self.text
        else:
            card = get_card(images.dataset) if images.dataset != task.card.name else task.card
            text = task.text_classifier(card.ensemble, classnames=classnames)
        return prolip_logits(task.frozen_features(images, pre_projection=True), self.projection, text, self.bias)

    def trainable_parameters(self) -> int:
        return self.projection.numel() if hasattr(self, "projection") else 0
