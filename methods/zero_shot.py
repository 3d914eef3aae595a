"""Zero-shot CLIP (Radford et al., ICML 2021), as evaluated in CoOp and CLIP-LoRA.

logits = 100 * normalised image features @ normalised text features, one hand-written template
per dataset (CoOp's CUSTOM_TEMPLATES, from the dataset card). `ensemble=true` averages the card's
template set instead: ImageNet's 7-template set (Tip-Adapter's); the other 10 cards hold one
template, so there `ensemble=true` equals the single template. CLIP's paper used larger
per-dataset ensembles (18 to 80 prompts), which are not reproduced.
"""

from __future__ import annotations

import torch

from methods.base import ImageSet, Method, Task, register
from methods.hparams import Param


@register
class ZeroShot(Method):
    name = "zero_shot"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    deviations = (
        "ensemble=true is the 7-template set on ImageNet only; on the other datasets it is the single CoOp "
        "template (CLIP's own per-dataset ensembles are not reproduced)"
    )
    defaults = {"ensemble": False}
    schema = {"ensemble": Param(bool)}
    uses_shots = False

    def fit(self, task: Task) -> None:
        templates = task.card.ensemble if self.hp["ensemble"] else (task.card.template,)
        self.weights = task.text_classifier(templates)

    def predict(self, task: Task, images: ImageSet) -> torch.Tensor:
        return 100.0 * task.frozen_features(images) @ self.weights.T
