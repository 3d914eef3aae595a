"""CoOp: Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022.

Follows the official KaiyangZhou/CoOp + Dassl.pytorch code (config `rn50_epXX` with
`vit_b16`, class token at the end, shared context, random init):

- prompt `[SOS][V1..Vn][class name tokens][.][EOS]`, n = `n_ctx` (16), context vectors shared by
  all classes, drawn from N(0, 0.02^2);
- `ctx_init` (CoOp's CTX_INIT): the context starts from the token embeddings of these words instead,
  and n_ctx must equal their number. The published CoOp (4) rows are `n_ctx=4`,
  `ctx_init="a photo of a"` (CoOp's `vit_b16_ep*_ctxv1` configs), shown as `coop_ctx4`;
- the fixed parts (SOS, class name, full stop, EOS) are the token embeddings of the prompt
  "X X ... X {classname}." (or "{ctx_init} {classname}."); the EOT position pooled by CLIP is the
  argmax of its token ids;
- text encoder: CLIP's own with the token-embedding lookup replaced by these embeddings;
- logits = CLIP's logit scale (100 for OpenAI weights) * cos(image, text); cross-entropy;
- SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32 (last incomplete batch dropped when
  the set holds at least one batch), epochs by shots (50 / 100 / 100 / 200 / 200; ImageNet's card
  sets 50); per-epoch LR: epoch 1 constant 1e-5, then cosine (`coop_lr`);
- train augmentation RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip;
- the last epoch is evaluated; the val split is not used.

Deviations: precision is fp32 on CPU and bf16 autocast (fp32 parameters) on CUDA, where the
official code runs CLIP and the context vectors in pure fp16 (`--precision fp16` is fp16 autocast
with fp32 parameters and dynamic loss scaling, the closest stable equivalent). The image encoder is frozen and gets
no gradient, so train crops are encoded under no_grad and test images through the cached frozen
features (identical results, less work). The text encoder runs on the tokens up to the longest
prompt's EOT (exact under the causal mask). `epoch_scale` < 1 shrinks the epoch budget (demo suite
only; recorded in the run's config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.backbones import encode_token_embeddings, text_is_causal, text_tower
from harness.cards import DatasetCard
from harness.data.images import AUGMENT_DEVIATION
from methods import dassl_loop
from methods.base import ImageSet, Method, Task, register
from methods.dassl_loop import DASSL_DEFAULTS, DASSL_SCHEMA, coop_lr  # noqa: F401  (coop_lr: CoOp's schedule, re-exported)
from methods.hparams import Param


def epochs_for_shots(shots: int) -> int:
    """CoOp's configs: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4, rn50 (200 epochs) for 8 and 16."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


class PromptLearner:
    """Learnable shared context between the fixed SOS token (none where the tokenizer has none: SigLIP's)
    and the '{classname}.' suffix."""

    def __init__(self, task: Task, n_ctx: int, init_std: float, ctx_init: str = "", classnames: list[str] | None = None):
        model = task.backbone.model
        placeholder = ctx_init or " ".join(["X"] * n_ctx)
        tokens = task.backbone.tokenize([f"{placeholder} {name}." for name in (classnames or task.classnames)])
        self.eot_index = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        if text_is_causal(model):
            tokens = tokens[:, : int(self.eot_index.max()) + 1]  # causal mask: later tokens never matter
        with torch.no_grad():
            embedding = text_tower(model).token_embedding(tokens).float()
        self.tokens, self.start = tokens, task.backbone.prompt_start
        self.prefix = embedding[:, : self.start]  # SOS
        self.suffix = embedding[:, self.start + n_ctx :]  # class name, '.', EOS (and padding up to the longest)
        if ctx_init:  # CoOp: the context starts as the words' own token embeddings
            self.ctx = embedding[0, self.start : self.start + n_ctx].clone().requires_grad_(True)
        else:
            width = embedding.shape[-1]
            self.ctx = torch.empty(n_ctx, width, device=task.device).normal_(std=init_std).requires_grad_(True)

    def embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts' token embeddings with `ctx` [n_ctx, W] (default: this learner's own) between
        the fixed SOS and the class-name suffix (MaPLe and PromptSRC pass the context they learn)."""
        ctx = (self.ctx if ctx is None else ctx).unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def text_features(self, task: Task) -> torch.Tensor:
        """L2-normalised class text features through the learned prompts (with gradients)."""
        with task.autocast():
            feats = encode_token_embeddings(task.backbone.model, self.embeddings(), self.eot_index)
        return F.normalize(feats.float(), dim=-1)


@register
class CoOp(Method):
    name = "coop"
    requires = ("text_tokens",)  # learned context in any open_clip text tower (CLIP's, EVA-02's, SigLIP's)
    family = "prompt learning"
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"
    source = "KaiyangZhou/CoOp@ff61507c7904 (trainers/coop.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "precision fp32 (CPU) / bf16 autocast (CUDA) instead of pure fp16 (--precision fp16: fp16 autocast with "
        f"loss scaling); {AUGMENT_DEVIATION}; frozen image encoder run without autograd (same result); text encoder "
        "truncated to the longest prompt (exact); epoch_scale < 1 only in the demo"
    )
    open_vocabulary = True
    defaults = {
        "n_ctx": 16,
        "ctx_init": "",  # "": random N(0, init_std^2); else the words the context starts from
        "init_std": 0.02,
        "epochs": None,  # None: by shots (50 / 100 / 100 / 200 / 200); ImageNet's card sets 50
        "epoch_scale": 1.0,
        **DASSL_DEFAULTS,
    }
    schema = {
        "n_ctx": Param(int, ge=1, le=72),
        "ctx_init": Param(str),
        "init_std": Param(float, gt=0),
        "epochs": Param(int, ge=1, optional=True),
        "epoch_scale": Param(float, gt=0),
        **DASSL_SCHEMA,
    }

    def build(self, task: Task) -> None:
        """The learnable prompt, before training."""
        self.prompts = PromptLearner(task, self.hp["n_ctx"], self.hp["init_std"], self.hp["ctx_init"])

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        return max(1, round((hp["epochs"] or epochs_for_shots(shots)) * hp["epoch_scale"]))

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.build(task)
        self.logit_scale = float(task.backbone.model.logit_scale.exp())
        self.epochs = self.planned_epochs(hp, task.card, task.shots)
        self.epoch_lrs = dassl_loop.train(task, [self.prompts.ctx], hp, self.epochs, self.forward_backward(task), self.name)
        with torch.no_grad():
            self.text_weights = self.prompts.text_features(task)

    @torch.no_grad()
    def image_features(self, task: Task, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of a batch of crops through the frozen image encoder (no autograd)."""
        with task.autocast():
            feats = task.backbone.model.encode_image(task.normalize(crops))
        return F.normalize(feats.float(), dim=-1)

    def logits(self, task: Task, crops: torch.Tensor) -> torch.Tensor:
        """Training logits: the crops' frozen features against the learned prompts' text features."""
        return self.logit_scale * self.image_features(task, crops) @ self.prompts.text_features(task).T

    def forward_backward(self, task: Task) -> dassl_loop.ForwardBackward:
        def step(crops, labels, scaler):
            loss = F.cross_entropy(self.logits(task, crops), labels)
            scaler.scale(loss).backward()
            return loss.detach()

        return step

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        words = len(hp["ctx_init"].split()) if hp.get("ctx_init") else hp["n_ctx"]
        if words != hp["n_ctx"]:
            return f"ctx_init '{hp['ctx_init']}' has {words} words, so n_ctx must be {words} (CoOp derives it from them); add --set n_ctx={words}."
        return None

    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        return self.logit_scale * task.frozen_features(images) @ self.class_text(task, classnames).T

    @torch.no_grad()
    def class_text(self, task: Task, classnames: list[str] | None) -> torch.Tensor:
        """The learned context with other class names (CoCoOp's new-class evaluation: the prompt
        learner rebuilt over the new names, its context vectors loaded)."""
        if classnames is None:
            return self.text_weights
        hp = self.hp
        other = PromptLearner(task, hp["n_ctx"], hp["init_std"], hp["ctx_init"], classnames)
        other.ctx = self.prompts.ctx.detach()
        return other.text_features(task)

    def trainable_parameters(self) -> int:
        return self.prompts.ctx.numel() if hasattr(self, "prompts") else 0
