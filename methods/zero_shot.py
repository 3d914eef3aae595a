"""Zero-shot CLIP (Radford et al., ICML 2021), as evaluated in CoOp and CLIP-LoRA.

logits = 100 * normalised image features @ normalised text features. The text classifier comes
from `templates`:
- `card` (default): the dataset's one hand-written template (CoOp's CUSTOM_TEMPLATES);
- `ensemble`: the card's template set, each template's embedding normalised, averaged,
  renormalised: ImageNet's 7-template set (Tip-Adapter's); the other 10 cards hold one template,
  so there it equals `card`. CLIP's paper used larger per-dataset ensembles (18 to 80 prompts);
- a path to a text file with one template per line (`{}` for the class name): the file's
  templates themselves are stored in the run's config, so the run is keyed by them, not the path.
Template choice alone moves zero-shot accuracy by points; the report shows the spread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.cards import get_card
from harness.errors import HarnessError
from methods.base import ImageSet, Method, Task, register
from methods.hparams import Param


def read_templates(value) -> list[str] | str:
    """'card' | 'ensemble' stay names; a file path becomes its list of templates."""
    if isinstance(value, list) or value in ("card", "ensemble"):
        return value
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise HarnessError(f"zero_shot: templates='{value}' is neither card, ensemble nor a file of templates (one per line).")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in lines if t.count("{}") != 1]
    if not lines or bad:
        raise HarnessError(f"zero_shot: {path} must hold one template per line, each with one {{}} for the class name; "
                           f"{'it is empty' if not lines else 'not: ' + repr(bad[0])}.")
    return lines


@register
class ZeroShot(Method):
    name = "zero_shot"
    family = "zero-shot"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    source = "openai/CLIP@d05afc436d78 (model, logit scale); templates from KaiyangZhou/CoOp@ff61507c7904"
    deviations = (
        "templates=ensemble is the 7-template set on ImageNet only; on the other datasets it is the single CoOp "
        "template (CLIP's own per-dataset ensembles are not reproduced)"
    )
    defaults = {"templates": "card"}
    schema = {"templates": Param(str)}  # card | ensemble | a file of templates (stored as the list)
    uses_shots = False
    open_vocabulary = True

    @classmethod
    def resolve(cls, hp: dict) -> dict:
        return {**hp, "templates": read_templates(hp["templates"])}

    def templates_for(self, card) -> tuple[str, ...] | list[str]:
        choice = self.hp["templates"]
        if choice == "card":
            return (card.template,)
        if choice == "ensemble":
            return card.ensemble
        return choice  # the templates read from the user's file

    def fit(self, task: Task) -> None:
        self.templates = self.templates_for(task.card)
        self.weights = task.text_classifier(self.templates)

    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        """Another dataset's classes (cross-dataset) are scored with that dataset's own template(s), as every
        paper's zero-shot row is; new classes of the same dataset (base-to-new) with its own."""
        if classnames is None:
            weights = self.weights
        else:
            templates = self.templates_for(get_card(images.dataset)) if images.dataset != task.card.name else self.templates
            weights = task.text_classifier(templates, classnames=classnames)
        return 100.0 * task.frozen_features(images) @ weights.T
