"""GDA: Wang, Liang, Sheng, He, Wang, Tan, "A Hard-to-Beat Baseline for Training-free CLIP-based
Adaptation", ICLR 2024. Follows mrflogs/ICLR24@560fe21 (`main_few_shots.py`, `utils.py`,
`configs/few_shots/*.yaml`); training-free Gaussian discriminant analysis on cached features.

- features: `augment_views` (10, every config's `augment_epoch`) augmented views of each few-shot
  image, RandomResizedCrop scale (0.5, 1) bicubic + flip (main_few_shots.py:24-29; ImageNet (0.08, 1),
  datasets/imagenet.py:210, its card's recipe), each L2-normalised and all pooled (lines 45-52);
- class means mu_c (line 56); the shared precision by the KS estimator (lines 59-60), with X the
  pooled features centred on their class mean, n rows, d dimensions and S = X^T X / (n - 1):
  P = d * pinv((n - 1) S + tr(S) I);
- the linear classifier of a Gaussian with shared covariance and uniform priors (lines 62-64):
  W = P mu^T, b_c = log(1/C) - mu_c^T P mu_c / 2;
- logits = 100 f T^T + alpha (f W + b), T the zero-shot classifier of the card's templates (one CoOp
  template; ImageNet's 7-template ensemble; utils.py:18-35), f the normalised test feature (line 80);
- alpha: the first best of [1e-4, 1e-3, 0.01, 0.1, 1, 10, 100] by accuracy on a val set (lines
  67-79, strict `>`, 0.1 when no alpha scores above 0); `alpha` set to a number skips the search.

Deviations: alpha is searched on the harness's few-shot val subset (min(K, 4) per class) by default;
the official code searches on the full val split, and on ImageNet on the TEST set
(main_few_shots.py:137); `search_split=full_val` gives the official search where a val split exists
(refused on ImageNet). The views are the harness's shared bank (its own crop stream). Base-to-new:
the official code builds Gaussians for new classes from their text embeddings and base features
(main_base2new.py:85-111, with another estimator for the base classes); here GDA is class-specific
and new classes are not applicable. Features in the run's precision (official: fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.cards import DatasetCard
from methods.base import ImageSet, Method, Task, register
from methods.feature_bank import augmented_views
from methods.hparams import Param

ALPHAS = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def gaussian_classifier(feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [D, C] and b [C] of GDA with the KS shrinkage estimator, from normalised features [n, D]."""
    mus = torch.stack([feats[labels == c].mean(0) for c in range(n_classes)])  # [C, D]
    centred = feats - mus[labels]
    n, d = centred.shape
    cov = centred.T.cov()  # X^T X / (n - 1)
    precision = d * torch.linalg.pinv((n - 1) * cov + cov.trace() * torch.eye(d, device=feats.device))
    weights = precision @ mus.T
    bias = math.log(1.0 / n_classes) - 0.5 * torch.einsum("cd,de,ce->c", mus, precision, mus)
    return weights, bias


@register
class GDA(Method):
    name = "gda"
    family = "training-free on frozen features"
    paper = "Wang et al., A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation, ICLR 2024"
    source = "mrflogs/ICLR24@560fe2117009 (main_few_shots.py, utils.py)"
    deviations = (
        "alpha searched on the few-shot val subset, min(K, 4) per class (official: the full val split, the TEST set on "
        "ImageNet; search_split=full_val gives the official search where a val split exists); views from the harness's "
        "shared bank; new classes of base-to-new not applicable (official: synthesised Gaussians)"
    )
    defaults = {
        "augment_views": 10,
        "crop_scale": [0.5, 1.0],  # ImageNet's card: [0.08, 1.0]
        "alpha": None,  # None: searched over ALPHAS on the search split; a number: fixed (validation-free)
        "search_split": "fewshot_val",  # or full_val (the official code's search split)
    }
    schema = {
        "augment_views": Param(int, ge=1),
        "crop_scale": Param(list, item=float, length=2, gt=0, le=1),
        "alpha": Param(float, ge=0, optional=True),
        "search_split": Param(str, choices=("fewshot_val", "full_val")),
    }

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.text = task.text_classifier(task.card.ensemble)  # [C, D], normalised
        views = F.normalize(augmented_views(task, hp["augment_views"], tuple(hp["crop_scale"])), dim=-1)  # [V, N, D]
        feats = views.reshape(-1, views.shape[-1])
        labels = task.train.labels.to(task.device).repeat(len(views))
        self.weights, self.bias = gaussian_classifier(feats, labels, len(task.classnames))
        self.searched_on = None
        self.alpha = hp["alpha"]
        if self.alpha is None:
            search_set = task.val if hp["search_split"] == "fewshot_val" else task.full_val
            self.alpha = 0.1  # the official start value, kept when no alpha scores above 0 (or no val images)
            if len(search_set):
                self.searched_on = hp["search_split"]
                f, y = task.frozen_features(search_set), search_set.labels.to(task.device)
                best = 0.0
                for alpha in ALPHAS:
                    acc = (self.logits(f, alpha).argmax(-1) == y).float().mean().item()
                    if acc > best:
                        best, self.alpha = acc, alpha

    def logits(self, features: torch.Tensor, alpha: float) -> torch.Tensor:
        return 100.0 * features @ self.text.T + alpha * (features @ self.weights + self.bias)

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        """The training classes only: one Gaussian per training class."""
        return self.logits(task.frozen_features(images), self.alpha)

    def selection(self) -> str:
        if self.searched_on is None:
            return "fixed recipe" if self.hp["alpha"] is not None else "fixed recipe (no val images: alpha 0.1)"
        where = "few-shot val" if self.searched_on == "fewshot_val" else "full val"
        return f"{where} search over {len(ALPHAS)} alphas"

    @classmethod
    def config_error(cls, hp: dict, card: DatasetCard) -> str | None:
        if hp.get("search_split") == "full_val" and hp.get("alpha") is None and card.reader == "imagenet":
            return ("search_split=full_val: ImageNet has no val split (the official code searches alpha on the test set "
                    "there, which the harness never does). Use search_split=fewshot_val.")
        return None

    def trainable_parameters(self) -> int:
        """Training-free: the estimated W and b are statistics, not trained parameters."""
        return 0
