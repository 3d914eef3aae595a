"""KgCoOp: Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context
Optimization", CVPR 2023. Follows htyao89/KgCoOp (`trainers/kgcoop.py`, config
`vit_b16_ep100_ctxv1.yaml`, scripts with `TRAINER.COOP.W 8.0`).

- CoOp's prompt: unified context, class token at the end. `CTX_INIT: True` forces the init words
  "a photo of a", so n_ctx = 4 whatever N_CTX says (the default here: 4 words, 4 vectors);
- loss = CE(100 cos(image, t_c)) + W * (1 - mean_c cos(t_c, t_c^hand)), t_c the learned prompt's
  text feature, t_c^hand the frozen CLIP feature of the dataset's hand-written template
  (KgCoOp's table: CoOp's CUSTOM_TEMPLATES, except DTD "a photo of a {}, a type of texture."),
  computed once; W = 8 (every script; the code default is 1);
- SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 128, 100 epochs for every shot count and
  dataset (ImageNet included), epoch 1 constant 1e-5 then cosine per epoch; last epoch;
- inference as CoOp: the learned context with any class names (new classes, other datasets).

At initialisation the prompt is "a photo of a {class}.", so the knowledge term is exactly 0 on
datasets whose template is that sentence.

Deviations: as CoOp's (precision, frozen image encoder without autograd, truncated text encoder);
epoch_scale < 1 only in the demo suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import Task, register
from methods.coop import CoOp
from methods.hparams import Param

# KgCoOp's CUSTOM_TEMPLATES where they differ from the harness cards' (CoOp's) template.
TEMPLATES = {"dtd": "a photo of a {}, a type of texture."}


@register
class KgCoOp(CoOp):
    name = "kgcoop"
    paper = "Yao et al., Visual-Language Prompt Tuning with Knowledge-guided Context Optimization, CVPR 2023"
    deviations = (
        CoOp.deviations + "; the knowledge term's hand-crafted text features in the run's precision (official: a fresh "
        "fp16 CLIP, kgcoop.py:132-144, whatever the precision)"
    )
    source = "htyao89/KgCoOp@c43ccc32c873 (trainers/kgcoop.py, its bundled Dassl.ProGrad.pytorch)"
    defaults = {
        **CoOp.defaults,
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "epochs": 100,
        "batch_size": 128,
        "w": 8.0,
    }
    schema = {**CoOp.schema, "w": Param(float, ge=0)}

    def fit(self, task: Task) -> None:
        template = TEMPLATES.get(task.card.name, task.card.template)
        self.hand_text = task.text_classifier([template])  # frozen, L2-normalised, once
        super().fit(task)

    def knowledge_loss(self, text: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine between the learned and the hand-crafted class text features."""
        return 1.0 - F.cosine_similarity(text, self.hand_text, dim=-1).mean()

    def forward_backward(self, task: Task):
        def step(crops, labels, scaler):
            text = self.prompts.text_features(task)
            feats = self.image_features(task, crops)
            loss = F.cross_entropy(self.logit_scale * feats @ text.T, labels) + self.hp["w"] * self.knowledge_loss(text)
            scaler.scale(loss).backward()
            return loss.detach()

        return step
