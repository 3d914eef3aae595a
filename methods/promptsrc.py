"""PromptSRC: Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023. Follows muzairkhattak/PromptSRC@bb95c77 (`trainers/promptsrc.py`,
`clip/model.py`, `configs/trainers/PromptSRC/*.yaml`); file:line below are at that commit.

- prompts (IVLP, independent vision and language prompting): the text prompt is "a photo of a {class}."
  whose first n_ctx_text = 4 tokens are the learnable `ctx`, initialised from their own token embeddings
  (promptsrc.py:88-96; random N(0, 0.02) when ctx_init is empty); the vision prompt is n_ctx_vision = 4
  learnable tokens N(0, 0.02) appended after the patch tokens, after the positional embedding and before
  ln_pre (clip/model.py:370-380, 406-408); deep prompts: each of layers 1 .. depth-1 of each tower owns its
  own n_ctx tokens N(0, 0.02) that replace the previous layer's (clip/model.py:210-252); depth 9 in both
  towers (few-shot and base-to-new configs), 3 in the cross-dataset config. Unlike MaPLe nothing couples
  the towers: the text and vision prompts are independent tensors;
- loss (promptsrc.py:297-313) = CE(logit_scale * cos(image, text)) + 25 * L1(text, teacher text)
  + 10 * L1(image, teacher image) + KL(p_teacher || p_prompted) summed and divided by B * C (not by B),
  temperature 1; all features L2-normalised; the teacher image features are frozen CLIP's on the same
  augmented crop; the teacher text features are frozen CLIP's averaged, unnormalised, over 60 ImageNet
  templates (the first 60 of CLIP's 80, the set of trainers/imagenet_templates.py:3-64), normalised at use;
  the teacher logits use the same logit scale;
- Gaussian prompt aggregation (GPA, promptsrc.py:263-270, 320-335): after every epoch the prompts are added
  to a running sum with weight N(e; gpa_mean, gpa_std), the weights normalised over epochs 1..E to sum to 1;
  the sum replaces the prompts at the end. Few-shot config: 50 epochs, GPA 30/30 (ImageNet, Caltech, Pets,
  Food, UCF, SUN) or 45/5 (Cars, Flowers, Aircraft, DTD, EuroSAT), ..._few_shot.yaml:42-47 (the few-shot protocol recipe);
  base-to-new: 20 epochs, 15/1; cross-dataset and domain shift: 20 epochs, depth 3, 6/10 (the protocol
  recipes in datasets/_protocols.yaml);
- Dassl SGD lr 0.0025, momentum 0.9, weight decay 5e-4, batch 4, epoch 1 constant 1e-5 then cosine per
  epoch; RandomResizedCrop (0.08-1) + flip; the GPA model is evaluated (no selection on any split).

Deviations: GPA sums the learned prompt tensors only; the official code sums the whole state dict in fp16
(promptsrc.py:338-356), which also rounds the frozen CLIP weights it reloads by about 1 ulp in 39-61 % of
entries (../shared/FRONTIER.md); precision fp32 (CPU) / bf16 autocast (CUDA) with fp32 prompts, where the
official run is fp16 only (its amp and fp32 paths crash: promptsrc.py:289-291, 202-205) with an fp16 text
ctx updated without a master copy; crops augmented on tensors; the text encoder truncated to the longest
prompt (exact); the demo's tiny backbone has 2 layers per tower (depth 2, recorded in the config).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from harness.backbones import encode_text
from harness.cards import DatasetCard

from methods import dassl_loop
from methods.base import ImageSet, Method, Task, count_trainable, register
from methods.coop import PromptLearner
from methods.dassl_loop import DASSL_DEFAULTS, DASSL_SCHEMA
from methods.deep_prompts import prompted_text_features, vision_tower
from methods.hparams import Param
from methods.maple import shared_depth, tower_widths

# PromptSRC's "textual diversity" templates: the same 60 strings as its trainers/imagenet_templates.py
# IMAGENET_TEMPLATES, which are the first 60 of CLIP's 80 (its list puts "a photo of a {}." first; an
# average does not depend on the order).
TEACHER_TEMPLATES = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES[:60]]


def gpa_weights(epochs: int, mean: float, std: float) -> torch.Tensor:
    """Each epoch's GPA weight: the normal density N(e; mean, std) at e = 1..epochs, normalised to sum 1."""
    e = torch.arange(1, epochs + 1, dtype=torch.float64)
    density = torch.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return density / density.sum()


class IndependentPrompts(nn.Module):
    """IVLP's learned tensors: the text ctx and deep text prompts, the vision prompt and deep vision prompts."""

    def __init__(self, task: Task, hp: dict):
        super().__init__()
        model = task.backbone.model
        text_width, vision_width = tower_widths(model)
        layers = shared_depth(model)
        for key in ("prompt_depth_text", "prompt_depth_vision"):
            if hp[key] > layers:
                raise ValueError(f"{key} {hp[key]} exceeds the backbone's {layers} layers (--set {key}={layers})")
        n_text, n_vision = hp["n_ctx_text"], hp["n_ctx_vision"]
        tokens = PromptLearner(task, n_text, 0.02, hp["ctx_init"])  # ctx from the words' embeddings, or N(0, 0.02)
        self.ctx = nn.Parameter(tokens.ctx.detach().clone())
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_text, text_width).normal_(std=0.02)) for _ in range(hp["prompt_depth_text"] - 1)]
        )
        self.vision = nn.Parameter(torch.empty(n_vision, vision_width).normal_(std=0.02))
        self.deep_vision = nn.ParameterList(
            [nn.Parameter(torch.empty(n_vision, vision_width).normal_(std=0.02)) for _ in range(hp["prompt_depth_vision"] - 1)]
        )
        self.to(task.device)


@register
class PromptSRC(Method):
    name = "promptsrc"
    requires = ("text_tokens", "vit_tokens")
    family = "prompt learning"
    paper = "Khattak et al., Self-regulating Prompts: Foundational Model Adaptation without Forgetting, ICCV 2023"
    source = "muzairkhattak/PromptSRC@bb95c77b634d (trainers/promptsrc.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "GPA averages the prompt tensors only (official: the whole state dict in fp16, re-rounding the frozen CLIP "
        "weights); precision fp32 (CPU) / bf16 autocast (CUDA) with fp32 prompts instead of the official fp16 (its text "
        "ctx an fp16 parameter updated without a master copy); crops augmented on tensors; text encoder truncated to the "
        "longest prompt (exact); demo suite: depth 2 and 20 epochs (tiny backbone); timm image towers and non-CLIP "
        "text towers (no official counterpart) take the prompts as methods/deep_prompts.py decides"
    )
    open_vocabulary = True
    defaults = {
        "n_ctx_text": 4,
        "n_ctx_vision": 4,
        "ctx_init": "a photo of a",
        "prompt_depth_text": 9,
        "prompt_depth_vision": 9,
        "text_loss_weight": 25.0,
        "image_loss_weight": 10.0,
        "gpa_mean": 30.0,  # few-shot config; 45 / 5 on five datasets (datasets/_protocols.yaml, fewshot)
        "gpa_std": 30.0,
        "epochs": 50,
        **DASSL_DEFAULTS,
        "lr": 0.0025,
        "batch_size": 4,
    }
    schema = {
        "n_ctx_text": Param(int, ge=1, le=16),
        "n_ctx_vision": Param(int, ge=1, le=64),
        "ctx_init": Param(str),
        "prompt_depth_text": Param(int, ge=1, le=48),
        "prompt_depth_vision": Param(int, ge=1, le=48),
        "text_loss_weight": Param(float, ge=0),
        "image_loss_weight": Param(float, ge=0),
        "gpa_mean": Param(float),
        "gpa_std": Param(float, gt=0),
        "epochs": Param(int, ge=1),
        **DASSL_SCHEMA,
    }

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        words = len(hp["ctx_init"].split())
        if hp["ctx_init"] and hp["n_ctx_text"] > words:
            return (f"n_ctx_text {hp['n_ctx_text']} is more than the {words} words of ctx_init '{hp['ctx_init']}' "
                    "(PromptSRC learns the first n_ctx_text of them; ctx_init '' starts them at random).")
        return None

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return hp["epochs"]

    def build(self, task: Task) -> None:
        self.prompts = IndependentPrompts(task, self.hp)
        self.tokens = PromptLearner(task, self.hp["n_ctx_text"], 0.02, self.hp["ctx_init"])
        self.logit_scale = float(task.backbone.model.logit_scale.exp())
        self.teacher_text = F.normalize(self.teacher_text_features(task, task.classnames), dim=-1)

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.build(task)
        weights = gpa_weights(hp["epochs"], hp["gpa_mean"], hp["gpa_std"])
        params = list(self.prompts.parameters())
        aggregate = [torch.zeros_like(p) for p in params]

        def gather(epoch: int) -> None:  # GPA: this epoch's prompts, weighted
            with torch.no_grad():
                for total, p in zip(aggregate, params):
                    total.add_(p, alpha=float(weights[epoch - 1]))

        self.epoch_lrs = dassl_loop.train(task, params, hp, hp["epochs"], self.forward_backward(task), self.name, on_epoch_end=gather)
        with torch.no_grad():
            for p, total in zip(params, aggregate):
                p.copy_(total)
            self.text_weights = self.text_features(task, self.tokens)

    @torch.no_grad()
    def teacher_text_features(self, task: Task, classnames: list[str]) -> torch.Tensor:
        """Frozen CLIP's text features averaged over the 60 templates, unnormalised (promptsrc.py:122-128)."""
        model = task.backbone.model
        per_template = [encode_text(model, task.backbone.tokenize([t.format(c) for c in classnames]).to(task.device)).float()
                        for t in TEACHER_TEMPLATES]
        return torch.stack(per_template).mean(0)

    def text_features(self, task: Task, tokens: PromptLearner) -> torch.Tensor:
        return prompted_text_features(task, tokens, self.prompts.ctx, self.prompts.deep_text)

    def image_features(self, task: Task, pixels: torch.Tensor, prompted: bool = True) -> torch.Tensor:
        """L2-normalised image features of normalised pixels, through the prompted tower or frozen CLIP's."""
        first = self.prompts.vision.unsqueeze(0) if prompted else None
        deep = [p.unsqueeze(0) for p in self.prompts.deep_vision] if prompted else []
        with task.autocast():
            feats = vision_tower(task.backbone.model, pixels, first, deep)[0]
        return F.normalize(feats.float(), dim=-1)

    def losses(self, logits, text, image, teacher_image) -> dict[str, torch.Tensor]:
        """The three self-regularising terms against frozen CLIP (promptsrc.py:297-311)."""
        teacher_logits = self.logit_scale * teacher_image @ self.teacher_text.T
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(teacher_logits, dim=1), reduction="sum", log_target=True)
        return {
            "text": F.l1_loss(text, self.teacher_text) * self.hp["text_loss_weight"],
            "image": F.l1_loss(image, teacher_image) * self.hp["image_loss_weight"],
            "logits": kl / logits.numel(),
        }

    def forward_backward(self, task: Task):
        def step(crops, labels, scaler):
            pixels = task.normalize(crops)
            text = self.text_features(task, self.tokens)
            image = self.image_features(task, pixels)
            with torch.no_grad():
                teacher_image = self.image_features(task, pixels, prompted=False)
            logits = self.logit_scale * image @ text.T
            loss = F.cross_entropy(logits, labels) + sum(self.losses(logits, text, image, teacher_image).values())
            scaler.scale(loss).backward()
            return loss.detach()

        return step

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        text = self.text_weights
        if classnames is not None:
            text = self.text_features(task, PromptLearner(task, self.hp["n_ctx_text"], 0.02, self.hp["ctx_init"], classnames))
        pixels = images.eval_pixels()
        feats = task.in_batches(lambda batch: self.image_features(task, task.normalize(batch)), pixels)
        return self.logit_scale * feats @ text.T

    def trainable_parameters(self) -> int:
        return count_trainable(self.prompts.parameters()) if hasattr(self, "prompts") else 0
