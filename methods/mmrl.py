"""MMRL: Guo, Gu, "MMRL: Multi-Modal Representation Learning for Vision-Language Models", CVPR 2025.
Follows yunncheng/MMRL@27d8821 (`trainers/mmrl.py`, `clip/model_mmrl.py`, `trainers/config.py`,
`configs/trainers/MMRL/*.yaml`, `scripts/mmrl/*.sh`); file:line below are at that commit.

- a shared representation space: K = 5 learnable tokens R [K, d_r = 512] ~ N(0, 0.02) (mmrl.py:171-172),
  mapped into each representation layer of each tower by its own Linear aligner (d_r -> tower width),
  all clones of one default-initialised Linear, so they start identical (mmrl.py:137-138, 174-178);
- layers 6..12 of 12 (1-based, `REP_LAYERS`): at the first the K mapped tokens are inserted right after
  CLS (vision, inside the transformer: after ln_pre, no positional embedding) and right after BOT (text,
  after the positional embedding), and at each later one they replace the previous layer's K outputs
  (model_mmrl.py:207-245); the text's causal mask grows to the new length from that layer on; the text
  feature is read at EOT + K (mmrl.py:84). The text prompt is the dataset's fixed template, nothing
  learned in it (mmrl.py:21-37, the CoOp templates of the cards);
- decoupled features: the class feature is CLS through ln_post and CLIP's frozen projection; the
  representation feature is the mean over the K output tokens, each through ln_post, times a trainable
  `proj_rep` [width, D] ~ N(0, width^-0.5) (model_mmrl.py:330, 365-376); logits at a fixed scale 100;
- loss (mmrl.py:238-255) = alpha CE(class logits) + (1 - alpha) CE(representation logits)
  + lambda (1 - mean cos(class image feature, frozen CLIP's on the same crop))
  + lambda (1 - mean cos(text feature, frozen CLIP's of the same template)), alpha = 0.7;
  lambda per dataset (trainers/config.py:7-41, for every task), else the config's (few-shot 0.5, base-to-new 1.0),
  0.2 for cross-dataset training (its script's command line beats config.py);
- inference (mmrl.py:397-438): the training classes of the training dataset use alpha class + (1 - alpha)
  representation logits; new classes and every other dataset (domain shift included: a target is
  "not ImageNet") use the class logits alone;
- Dassl AdamW lr 1e-3 (betas 0.9 / 0.999, weight decay 5e-4), cosine per epoch after 1 constant warm-up
  epoch at 1e-5; RandomResizedCrop (0.5-1) + flip; the last epoch is evaluated. Few-shot: batch 32,
  50 epochs (ImageNet 5); base-to-new: batch 4, 10 epochs (ImageNet 32, 5); cross-dataset: batch 32,
  1 epoch, no warm-up, lambda 0.2; EuroSAT d_r = 2048 (all in the protocol recipes, datasets/_protocols.yaml).

Deviations: precision fp32 (CPU) / bf16 autocast (CUDA) where the official is fp16 autocast with loss
scaling (`--precision fp16` is that); `proj_rep` draws its random init from the run's seeded stream, the
official from the global stream while building CLIP (the same distribution); crops augmented on tensors; the text
encoder truncated to the longest prompt (exact under the causal mask); the demo's tiny backbone has 2
layers per tower (representation layer 2 only, recorded in the config).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbones import encode_text
from harness.cards import DatasetCard, get_card

from methods import dassl_loop
from methods.base import ImageSet, Method, Task, count_trainable, register
from methods.dassl_loop import DASSL_DEFAULTS, DASSL_SCHEMA
from methods.deep_prompts import resblocks
from methods.hparams import Param
from methods.maple import tower_widths

SCALE = 100.0  # mmrl.py:227-229: fixed, not CLIP's logit_scale


class RepresentationLearner(nn.Module):
    """The shared tokens, one aligner pair per representation layer, and the representation projection."""

    def __init__(self, task: Task, hp: dict):
        super().__init__()
        model = task.backbone.model
        text_width, vision_width = tower_widths(model)
        layers = min(len(model.transformer.resblocks), len(model.visual.transformer.resblocks))
        rep_layers = hp["rep_layers"]
        if rep_layers != sorted(set(rep_layers)) or not 1 <= rep_layers[0] <= rep_layers[-1] <= layers:
            raise ValueError(f"rep_layers {rep_layers} must be increasing layer numbers in 1..{layers} (this backbone's layers)")
        self.tokens = nn.Parameter(torch.empty(hp["n_rep_tokens"], hp["rep_dim"]).normal_(std=0.02))
        to_vision, to_text = nn.Linear(hp["rep_dim"], vision_width), nn.Linear(hp["rep_dim"], text_width)
        self.to_vision = nn.ModuleList([copy.deepcopy(to_vision) for _ in rep_layers])
        self.to_text = nn.ModuleList([copy.deepcopy(to_text) for _ in rep_layers])
        embed = model.visual.proj.shape[1]
        self.proj_rep = nn.Parameter(vision_width**-0.5 * torch.randn(vision_width, embed))
        self.to(task.device)

    def mapped(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per representation layer: the tokens in the vision tower's and the text tower's width."""
        return [a(self.tokens) for a in self.to_vision], [a(self.tokens) for a in self.to_text]


def enter_tokens(x: torch.Tensor, tokens: list[torch.Tensor], rep_layers: list[int], layer: int) -> torch.Tensor:
    """Before block `layer` (1-based) of rep_layers[j], tokens[j] [K, W] go after the first token (CLS or
    BOT): inserted at the first such layer, replacing the previous ones after it."""
    if layer not in rep_layers:
        return x
    j = rep_layers.index(layer)
    rest = x[:, 1:] if j == 0 else x[:, 1 + tokens[j].shape[0] :]
    return torch.cat([x[:, :1], tokens[j].to(x.dtype).expand(x.shape[0], -1, -1), rest], dim=1)


def vision_features(model, pixels: torch.Tensor, rep_layers: list[int], tokens: list[torch.Tensor], proj_rep: torch.Tensor):
    """(class feature, representation feature), unnormalised, of normalised pixels; tokens[j] [K, W]
    enters before block rep_layers[j] (1-based): inserted after CLS at the first, replacing after."""
    visual = model.visual
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    k = tokens[0].shape[0]
    for i, block in enumerate(resblocks(visual.transformer)):
        x = block(enter_tokens(x, tokens, rep_layers, i + 1))
    rep = visual.ln_post(x[:, 1 : 1 + k]).mean(dim=1) @ proj_rep.to(x.dtype)
    return visual.ln_post(x[:, 0]) @ visual.proj, rep


def text_features(model, tokens: torch.Tensor, rep_layers: list[int], reps: list[torch.Tensor]) -> torch.Tensor:
    """Unnormalised text features of token ids [C, L]; reps[j] [K, W] enters after BOT before block
    rep_layers[j], the causal mask growing with it; the feature is read at EOT + K."""
    eot = tokens.argmax(dim=-1)
    tokens = tokens[:, : int(eot.max()) + 1]  # causal: later positions never matter
    x = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[1]]
    k = reps[0].shape[0]
    for i, block in enumerate(resblocks(model.transformer)):
        x = enter_tokens(x, reps, rep_layers, i + 1)
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf"), device=x.device).triu_(1)
        x = block(x, attn_mask=mask.to(x.dtype))
    x = model.ln_final(x)
    shift = k if rep_layers else 0
    return x[torch.arange(x.shape[0], device=x.device), eot + shift] @ model.text_projection


@register
class MMRL(Method):
    name = "mmrl"
    requires = ("clip_text", "clip_vit")
    family = "multi-modal representation learning"
    paper = "Guo, Gu, MMRL: Multi-Modal Representation Learning for Vision-Language Models, CVPR 2025"
    source = "yunncheng/MMRL@27d8821f6ac1 (trainers/mmrl.py, clip/model_mmrl.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "precision fp32 (CPU) / bf16 autocast (CUDA) instead of fp16 autocast with loss scaling (--precision fp16); "
        "proj_rep's random init from the run's seeded stream; crops augmented on tensors; text encoder truncated to the "
        "longest prompt (exact); demo suite: representation layer 2 of the tiny backbone's 2"
    )
    open_vocabulary = True
    defaults = {
        "n_rep_tokens": 5,
        "rep_dim": 512,  # EuroSAT's card: 2048
        "rep_layers": [6, 7, 8, 9, 10, 11, 12],
        "alpha": 0.7,
        "reg_weight": 0.5,  # the few-shot yaml; per dataset in datasets/_protocols.yaml (trainers/config.py)
        "epochs": 50,
        **{k: v for k, v in DASSL_DEFAULTS.items() if k != "momentum"},  # AdamW: betas 0.9 / 0.999 (Dassl's defaults)
        "optim": "adamw",
        "lr": 1e-3,
        "batch_size": 32,
        "crop_scale": [0.5, 1.0],
    }
    schema = {
        "n_rep_tokens": Param(int, ge=1, le=64),
        "rep_dim": Param(int, ge=1),
        "rep_layers": Param(list, item=int, ge=1, le=48),
        "alpha": Param(float, ge=0, le=1),
        "reg_weight": Param(float, ge=0),
        "epochs": Param(int, ge=1),
        **{k: v for k, v in DASSL_SCHEMA.items() if k != "momentum"},
        "optim": Param(str, choices=("adamw",)),
    }

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return hp["epochs"]

    def build(self, task: Task) -> None:
        hp = self.hp
        self.learner = RepresentationLearner(task, hp)
        self.tokens = self.tokenize(task, task.card.template, task.classnames)
        model = task.backbone.model
        with torch.no_grad():  # frozen CLIP's text features of the same template (mmrl.py:113-134, 280-283)
            self.clip_text = F.normalize(encode_text(model, self.tokens).float(), dim=-1)

    @staticmethod
    def tokenize(task: Task, template: str, classnames: list[str]) -> torch.Tensor:
        return task.backbone.tokenize([template.format(c) for c in classnames]).to(task.device)

    def image_features(self, task: Task, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised class and representation features of normalised pixels."""
        with task.autocast():
            image, rep = vision_features(task.backbone.model, pixels, self.hp["rep_layers"], self.learner.mapped()[0], self.learner.proj_rep)
        return F.normalize(image.float(), dim=-1), F.normalize(rep.float(), dim=-1)

    def text_features(self, task: Task, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of the template's token ids, with the representation tokens inside."""
        with task.autocast():
            words = text_features(task.backbone.model, tokens, self.hp["rep_layers"], self.learner.mapped()[1])
        return F.normalize(words.float(), dim=-1)

    def loss(self, image, rep, text, clip_image, labels) -> torch.Tensor:
        alpha, lam = self.hp["alpha"], self.hp["reg_weight"]
        ce = alpha * F.cross_entropy(SCALE * image @ text.T, labels) + (1 - alpha) * F.cross_entropy(SCALE * rep @ text.T, labels)
        image_reg = 1 - F.cosine_similarity(image, clip_image, dim=1).mean()
        text_reg = 1 - F.cosine_similarity(text, self.clip_text, dim=1).mean()
        return ce + lam * image_reg + lam * text_reg

    def fit(self, task: Task) -> None:
        self.build(task)
        model = task.backbone.model

        def step(crops, labels, scaler):
            pixels = task.normalize(crops)
            with torch.no_grad(), task.autocast():
                clip_image = F.normalize(model.encode_image(pixels).float(), dim=-1)
            image, rep = self.image_features(task, pixels)
            loss = self.loss(image, rep, self.text_features(task, self.tokens), clip_image, labels)
            scaler.scale(loss).backward()
            return loss.detach()

        self.epoch_lrs = dassl_loop.train(task, list(self.learner.parameters()), self.hp, self.hp["epochs"], step, self.name)

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        """The training classes of the training dataset: alpha class + (1 - alpha) representation logits;
        anything else (new classes, another dataset): the class logits (mmrl.py:419-426)."""
        own = classnames is None and images.dataset == task.card.name
        template = task.card.template if images.dataset == task.card.name else get_card(images.dataset).template
        text = self.text_features(task, self.tokenize(task, template, classnames or task.classnames))

        def scores(batch):
            image, rep = self.image_features(task, task.normalize(batch))
            logits = SCALE * image @ text.T
            return self.hp["alpha"] * logits + (1 - self.hp["alpha"]) * SCALE * rep @ text.T if own else logits

        return task.in_batches(scores, images.eval_pixels())

    def trainable_parameters(self) -> int:
        return count_trainable(self.learner.parameters()) if hasattr(self, "learner") else 0
