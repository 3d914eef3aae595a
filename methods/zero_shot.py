"""Zero-shot CLIP (Radford et al., ICML 2021), as evaluated in CoOp and CLIP-LoRA.

logits = 100 * normalised image features @ normalised text features, one hand-written template
per dataset (CoOp's CUSTOM_TEMPLATES, from the dataset card). `ensemble=true` averages the card's
template set instead (ImageNet: the 7-template set).
"""

from __future__ import annotations

import torch

from methods.base import ImageSet, Method, Task, register


@register
class ZeroShot(Method):
    name = "zero_shot"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    deviations = "none"
    defaults = {"ensemble": False}
    uses_shots = False

    def fit(self, task: Task) -> None:
        templates = task.card.ensemble if self.hp["ensemble"] else (task.card.template,)
        self.weights = task.text_classifier(templates)

    def predict(self, task: Task, images: ImageSet) -> torch.Tensor:
        return 100.0 * task.frozen_features(images) @ self.weights.T
