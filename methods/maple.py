"""MaPLe: Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023.
Follows muzairkhattak/multimodal-prompt-learning (`trainers/maple.py`, `clip/model.py`, configs
`vit_b16_c2_ep5_batch4_2ctx.yaml` and `..._cross_datasets.yaml`).

- text: the prompt is the whole "a photo of a {class}."; its first n_ctx = 2 word tokens ("a photo")
  are the learnable `ctx` (init: their token embeddings), "of a" stay fixed tokens;
- coupling: `proj` = Linear(text width -> vision width) maps `ctx` to the 2 vision prompt tokens,
  appended after the patch tokens (after the positional embedding, before ln_pre);
- deep prompts: for layers 1 .. depth-1 (depth 9), text prompts `compound_text[i]` [2, text width]
  drawn from N(0, 0.02^2) replace the 2 context positions of the text tower, and
  `compound_proj[i](compound_text[i])` replace the 2 vision prompt tokens; the depth-1 projections
  start as copies of one initialised layer (the official `_get_clones`);
- logits = 100 cos(image, text); cross-entropy; both towers frozen, all prompts and projections
  trained: 3,555,072 parameters on ViT-B/16 and ViT-B/32;
- widths come from the backbone (ViT-L/14 works; the official code hard-codes 512 and 768); timm
  image towers (EVA-02, SigLIP 2, PE-Core) and non-causal text towers take the prompts as
  methods/deep_prompts.py describes (no official counterpart): 3,555,072 parameters on EVA-02 B/16,
  5,329,152 on SigLIP 2 B/16 (text width 768); a ResNet has no token sequence and is refused;
- recipe (default, the base-to-new config, which the CLIP-LoRA paper ran at every shot count):
  SGD lr 0.0035, momentum 0.9, weight decay 5e-4, batch 4, 5 epochs, epoch 1 constant 1e-5 then
  cosine per epoch, last epoch; cross-dataset and domain shift use the `_cross_datasets` config
  (lr 0.0026, 2 epochs, depth 3: the protocol recipe in datasets/_protocols.yaml);
- new classes and other datasets: the same prompts with the new names.

Deviations: precision fp32 (CPU) / bf16 autocast (CUDA) with fp32 parameters instead of the
official hard-coded fp16; crops augmented on tensors (AUGMENT_DEVIATION); text encoder truncated to
the longest prompt (exact); prompt_depth is limited by the backbone's layers (the demo's tiny
backbone has 2: its suite sets depth 2 and more epochs, recorded in the config).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbones import text_tower, tower_blocks
from harness.cards import DatasetCard

from methods import dassl_loop
from methods.base import ImageSet, Method, Task, count_trainable, register
from methods.coop import PromptLearner
from methods.dassl_loop import DASSL_DEFAULTS, DASSL_SCHEMA
from methods.deep_prompts import prompted_text_features, vision_tower
from methods.hparams import Param


def tower_widths(model) -> tuple[int, int]:
    """(text token width, vision token width) of open_clip's towers or a timm image tower."""
    visual = model.visual
    vision = visual.trunk.embed_dim if hasattr(visual, "trunk") else visual.conv1.out_channels
    return text_tower(model).token_embedding.weight.shape[1], vision


def shared_depth(model) -> int:
    """The number of layers both towers have (the deepest a prompt may go)."""
    return min(len(tower_blocks(model, "text")[0]), len(tower_blocks(model, "vision")[0]))


class MultiModalPrompts(nn.Module):
    """MaPLe's MultiModalPromptLearner: the learned tensors; the fixed tokens live in a PromptLearner per class list."""

    def __init__(self, task: Task, n_ctx: int, ctx_init: str, depth: int):
        super().__init__()
        text_width, vision_width = tower_widths(task.backbone.model)
        layers = shared_depth(task.backbone.model)
        if depth > layers:
            raise ValueError(f"prompt_depth {depth} exceeds the backbone's {layers} layers (--set prompt_depth={layers})")
        with torch.no_grad():
            words = text_tower(task.backbone.model).token_embedding(task.backbone.tokenize([ctx_init]))[0].float()
        start = task.backbone.prompt_start
        self.ctx = nn.Parameter(words[start : start + n_ctx].clone())
        self.proj = nn.Linear(text_width, vision_width)
        self.compound_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_width).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        single = nn.Linear(text_width, vision_width)
        self.compound_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        self.to(task.device)

    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer-0 vision tokens [1, n, Wv] and the deep ones, each [1, n, Wv]."""
        deep = [proj(p).unsqueeze(0) for proj, p in zip(self.compound_proj, self.compound_text)]
        return self.proj(self.ctx).unsqueeze(0), deep


@register
class MaPLe(Method):
    name = "maple"
    requires = ("text_tokens", "vit_tokens")
    family = "prompt learning"
    paper = "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023"
    source = "muzairkhattak/multimodal-prompt-learning@69bce21ae8ed (trainers/maple.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "precision fp32 (CPU) / bf16 autocast (CUDA), all parameters fp32; the official fp16 is mixed: the context "
        "vectors and the coupling projection are fp16 parameters updated by SGD in fp16 without loss scaling, the deep "
        "prompts and their projections fp32 (trainers/maple.py:90-117, 281-285); crops augmented on tensors; "
        "widths from the backbone (ViT-L/14 runs); few-shot uses the base-to-new recipe as the CLIP-LoRA paper did; "
        "demo suite: depth 2 and more epochs (tiny backbone); timm image towers and non-CLIP text towers (no official "
        "counterpart) take the prompts as methods/deep_prompts.py decides"
    )
    open_vocabulary = True
    defaults = {
        "n_ctx": 2,
        "ctx_init": "a photo of a",
        "prompt_depth": 9,
        "epochs": 5,
        **DASSL_DEFAULTS,
        "lr": 0.0035,
        "batch_size": 4,
    }
    schema = {
        "n_ctx": Param(int, ge=1, le=16),
        "ctx_init": Param(str),
        "prompt_depth": Param(int, ge=1, le=48),
        "epochs": Param(int, ge=1),
        **DASSL_SCHEMA,
    }

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        words = len(hp["ctx_init"].split())
        if hp["n_ctx"] > words:
            return f"n_ctx {hp['n_ctx']} is more than the {words} words of ctx_init '{hp['ctx_init']}' (MaPLe learns the first n_ctx of them)."
        return None

    def build(self, task: Task) -> None:
        hp = self.hp
        self.prompts = MultiModalPrompts(task, hp["n_ctx"], hp["ctx_init"], hp["prompt_depth"])
        self.tokens = PromptLearner(task, hp["n_ctx"], 0.02, hp["ctx_init"])

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return hp["epochs"]

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.build(task)
        self.logit_scale = float(task.backbone.model.logit_scale.exp())
        params = [p for p in self.prompts.parameters()]
        self.epoch_lrs = dassl_loop.train(task, params, hp, hp["epochs"], self.forward_backward(task), self.name)
        with torch.no_grad():
            self.text_weights = self.text_features(task, self.tokens)

    def text_features(self, task: Task, tokens: PromptLearner) -> torch.Tensor:
        return prompted_text_features(task, tokens, self.prompts.ctx, self.prompts.compound_text)

    def image_features(self, task: Task, crops: torch.Tensor) -> torch.Tensor:
        first, deep = self.prompts.vision_prompts()
        with task.autocast():
            feats = vision_tower(task.backbone.model, task.normalize(crops), first, deep)[0]
        return F.normalize(feats.float(), dim=-1)

    def forward_backward(self, task: Task):
        def step(crops, labels, scaler):
            logits = self.logit_scale * self.image_features(task, crops) @ self.text_features(task, self.tokens).T
            loss = F.cross_entropy(logits, labels)
            scaler.scale(loss).backward()
            return loss.detach()

        return step

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        text = self.text_weights
        if classnames is not None:
            text = self.text_features(task, PromptLearner(task, self.hp["n_ctx"], 0.02, self.hp["ctx_init"], classnames))
        pixels = images.eval_pixels()
        feats = task.in_batches(lambda batch: self.image_features(task, batch), pixels)
        return self.logit_scale * feats @ text.T

    def trainable_parameters(self) -> int:
        return count_trainable(self.prompts.parameters()) if hasattr(self, "prompts") else 0
