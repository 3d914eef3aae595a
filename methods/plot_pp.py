"""PLOT++: Chen, Yao, Mi, Chen, Lin, Huang, Zhang, "PLOT: Prompt Learning with Optimal Transport for
Vision-Language Models", ICLR 2023. Follows CHENGY12/PLOT, folder `plot-pp/` (`trainers/plotpp.py`,
`clip/model.py`, `configs/trainers/PLOTPP/vit.yaml`, `scripts/main_visiononly.sh`, `main_joint.sh`).

- N = 4 text prompts, CoOp-style shared contexts of n_ctx = the number of words of the dataset's
  first hand-written string (table below); prompt i starts from the first n_ctx token embeddings
  of string i alone and is followed by the fixed tokens of "{string i} {class}." from position
  1 + n_ctx. Where a string's token count differs from n_ctx this reproduces the official quirks
  (ImageNet's "this is a": its 4th vector starts as the EOT embedding and covers the first class
  token; EuroSAT strings 3 and 4 keep their last word fixed);
- M = 4 vision prompt sets of 2 tokens each, N(0, 0.02^2), appended after the patch tokens (after
  the positional embedding, before ln_pre): each image runs through the ViT once per set, so M
  features per image (the M passes run as one batch);
- optimal transport per (image, class) between the M image features and the N prompt features:
  cost 1 - cos, Sinkhorn with epsilon 0.1, uniform marginals 1/M and 1/N, at most 100 iterations,
  stopped when the mean |delta r| < 0.01, the plan computed without gradient; logit = 100 sum(T * cos);
  with `trade_off` the global term 100 cos(mean of the M raw image features, mean of the N raw
  prompt features) is added (means of unnormalised features, then normalised, as the official code);
- two stages, each SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, 50 epochs (every shot
  count and dataset), epoch 1 constant 1e-5 then cosine per epoch: stage 1 trains the vision
  prompts only with trade_off; stage 2 trains both from stage 1's result without it; the last
  epoch of stage 2 is evaluated (M passes, N prompts, OT score);
- new classes and other datasets: the learned prompts with the new class names.

Seeds: independent by default (each seed trains its own stage 1 on its own shots). The released
scripts train stage 1 once, on seed 1's shots, and start every seed's stage 2 from it: with
`share_stage1=true` each stage 1 is cached under the subset it was trained on (sampler, shots,
seed 1's images) and seeds other than 1 start from seed 1's.

Deviations: precision fp32 (CPU) / bf16 autocast (CUDA) with fp32 parameters instead of fp16;
crops augmented on tensors (AUGMENT_DEVIATION); widths from the backbone (the official code
hard-codes 768), and timm image towers and non-CLIP text towers (no official counterpart) take the
prompts as methods/deep_prompts.py decides; datasets without an official string set (the demo's) use Caltech101's; Sinkhorn
returning NaN fails the run (the official forward returns None and crashes); epoch_scale < 1 only
in the demo suite.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from harness.backbones import encode_token_embeddings, text_tower
from harness.cards import DatasetCard

from methods import dassl_loop
from methods.base import ImageSet, Method, Task, register
from methods.coop import PromptLearner
from methods.dassl_loop import DASSL_DEFAULTS, DASSL_SCHEMA
from methods.deep_prompts import vision_tower
from methods.hparams import Param
from methods.maple import tower_widths

# plot-pp's template_dict: the N text prompts' init strings per dataset (n_ctx = words of the first).
TEMPLATES = {
    "caltech101": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "dtd": ["a photo of a texture", "this is a photo texture", "this is a picture texture", "one picture of a texture"],
    "eurosat": ["a centered satellite photo of", "a centered satellite picture of", "this is centered satellite photo of",
                "one centered satellite photo of a"],
    "fgvc_aircraft": ["a photo of an aircraft", "a picture of an aircraft", "this is aircraft picture of", "one picture of an aircraft"],
    "food101": ["a photo of a food", "this is a food photo", " this is food picture of", "one picture of a food"],
    "imagenet": ["a photo of a", "this is a photo ", "this is a", "one picture of a"],
    "oxford_flowers": ["a photo of a flower", "one picture of a flower", "this is flower picture of", "one picture of a flower"],
    "oxford_pets": ["a photo of a pet", "one picture of a pet", "this is pet picture of", "one picture of a pet"],
    "stanford_cars": ["a photo of a", "this is a photo ", "this is picture of", "one picture of a"],
    "sun397": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "ucf101": ["a photo of a person doing", "this is a photo people doing", "this is picture of people doing",
               "one picture of a person doing"],
}


@torch.no_grad()
def sinkhorn(kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int = 100, thresh: float = 1e-2) -> torch.Tensor:
    """Transport plans [P, M, N] for kernels exp(-cost / eps) [P, M, N] and marginals u [P, M], v [P, N]."""
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = v / (kernel.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean() < thresh:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * kernel


def ot_scores(image: torch.Tensor, text: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """sum(T * sim) [B, C] for normalised image features [M, B, E] and prompt features [N, C, E]."""
    m, b = image.shape[:2]
    n, c = text.shape[:2]
    sim = torch.einsum("mbe,nce->bcmn", image, text).reshape(b * c, m, n)
    plan = sinkhorn(torch.exp(-(1.0 - sim) / eps), sim.new_full((b * c, m), 1.0 / m), sim.new_full((b * c, n), 1.0 / n))
    if torch.isnan(plan).any():
        raise FloatingPointError("Sinkhorn produced NaN; the run diverged")
    return (plan * sim).sum(dim=(1, 2)).view(b, c)


@register
class PlotPP(Method):
    name = "plot_pp"
    requires = ("text_tokens", "vit_tokens")
    family = "prompt learning"
    paper = "Chen et al., PLOT: Prompt Learning with Optimal Transport for Vision-Language Models, ICLR 2023 (PLOT++)"
    source = "CHENGY12/PLOT@728539feac3f (plot-pp/trainers/plotpp.py)"
    deviations = (
        "precision fp32 (CPU) / bf16 autocast (CUDA) instead of fp16; crops augmented on tensors; widths from the "
        "backbone; seeds independent by default (share_stage1=true: the released scripts' shared seed-1 stage 1); "
        "Caltech101's prompt strings for datasets without official ones; epoch_scale < 1 only in the demo; timm image "
        "towers and non-CLIP text towers (no official counterpart) take the prompts as methods/deep_prompts.py decides"
    )
    open_vocabulary = True
    defaults = {
        "n_text": 4,
        "n_vision_sets": 4,
        "n_ctx_vision": 2,
        "eps": 0.1,
        "epochs": 50,  # per stage
        "epoch_scale": 1.0,
        "share_stage1": False,
        **DASSL_DEFAULTS,
    }
    schema = {
        "n_text": Param(int, ge=1, le=4),
        "n_vision_sets": Param(int, ge=1),
        "n_ctx_vision": Param(int, ge=1),
        "eps": Param(float, gt=0),
        "epochs": Param(int, ge=1),
        "epoch_scale": Param(float, gt=0),
        "share_stage1": Param(bool),
        **DASSL_SCHEMA,
    }

    def strings(self, task: Task) -> list[str]:
        return TEMPLATES.get(task.card.name, TEMPLATES["caltech101"])[: self.hp["n_text"]]

    def prompt_tokens(self, task: Task, classnames: list[str] | None = None) -> list[PromptLearner]:
        """The fixed tokens of each text prompt ("{string i} {class}.", context at 1..n_ctx)."""
        return [PromptLearner(task, self.n_ctx, 0.02, s, classnames) for s in self.strings(task)]

    def build(self, task: Task) -> None:
        """The N text contexts (from the strings' own token embeddings) and the M vision prompt sets."""
        hp, model = self.hp, task.backbone.model
        strings = self.strings(task)
        self.n_ctx = len(strings[0].split())
        with torch.no_grad():
            words = text_tower(model).token_embedding(task.backbone.tokenize(strings)).float()  # each string alone
        start = task.backbone.prompt_start
        self.ctx = words[:, start : start + self.n_ctx].clone().requires_grad_(True)  # [N, n_ctx, W]
        vision_width = tower_widths(model)[1]
        self.ctx_vision = torch.empty(hp["n_vision_sets"], hp["n_ctx_vision"], vision_width, device=task.device)
        self.ctx_vision = self.ctx_vision.normal_(std=0.02).requires_grad_(True)
        self.tokens = self.prompt_tokens(task)
        self.logit_scale = float(model.logit_scale.exp())

    @classmethod
    def planned_epochs(cls, hp: dict, card: DatasetCard, shots: int) -> int:
        """Per stage (each stage runs its own warm-up and cosine)."""
        return max(1, round(hp["epochs"] * hp["epoch_scale"]))

    def fit(self, task: Task) -> None:
        hp = self.hp
        epochs = self.planned_epochs(hp, task.card, task.shots)
        if hp["share_stage1"] and task.seed != 1:  # the released scripts: seed 1's stage 1, as seed 1's own run trains it
            devices = [task.device] if task.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(1)
                self.build(task)
                self.stage_one(dataclasses.replace(task, train=task.train_of_seed(1)), epochs)
        else:
            self.build(task)
            self.stage_one(task, epochs)
        self.trade_off = False  # stage 2: both, from stage 1
        self.stage_lrs.append(dassl_loop.train(task, [self.ctx, self.ctx_vision], hp, epochs, self.forward_backward(task), f"{self.name} stage 2"))
        with torch.no_grad():
            self.text_weights = self.text_features(task, self.tokens)

    def stage_one(self, task: Task, epochs: int) -> None:
        """The vision prompts alone, with the global term; the text side is fixed, so encoded once."""
        self.trade_off = True
        with torch.no_grad():
            text = self.text_features(task, self.tokens)
        self.stage_lrs = [dassl_loop.train(task, [self.ctx_vision], self.hp, epochs, self.forward_backward(task, text), f"{self.name} stage 1")]
        self.stage1_vision = self.ctx_vision.detach().clone()

    def text_features(self, task: Task, tokens: list[PromptLearner]) -> torch.Tensor:
        """Unnormalised prompt features [N, C, E] (the global term averages them raw)."""
        out = []
        for ctx, t in zip(self.ctx, tokens):
            emb = torch.cat([t.prefix, ctx.unsqueeze(0).expand(t.prefix.shape[0], -1, -1), t.suffix], dim=1)
            with task.autocast():
                out.append(encode_token_embeddings(task.backbone.model, emb, t.eot_index).float())
        return torch.stack(out)

    def image_features(self, task: Task, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised features [M, B, E]: every image under every vision prompt set."""
        with task.autocast():
            return vision_tower(task.backbone.model, task.normalize(pixels), self.ctx_vision).float()

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """OT logits (plus the global term in stage 1) for raw image features [M, B, E] and raw prompt
        features [N, C, E]. Official `plotpp.py` (CHENGY12/PLOT@728539f, lines 222 and 227-238): both
        global means are taken over the RAW features and normalised afterwards; OT uses each
        normalised feature."""
        scores = ot_scores(F.normalize(image, dim=-1), F.normalize(text, dim=-1), self.hp["eps"])
        logits = self.logit_scale * scores
        if self.trade_off:
            pooled_image = F.normalize(image.mean(0), dim=-1)
            pooled_text = F.normalize(text.mean(0), dim=-1)
            logits = logits + self.logit_scale * pooled_image @ pooled_text.T
        return logits

    def forward_backward(self, task: Task, text: torch.Tensor | None = None):
        """A training step; `text`: fixed prompt features (stage 1), else the learned prompts' (stage 2)."""

        def step(crops, labels, scaler):
            prompts = text if text is not None else self.text_features(task, self.tokens)
            loss = F.cross_entropy(self.logits(self.image_features(task, crops), prompts), labels)
            scaler.scale(loss).backward()
            return loss.detach()

        return step

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        text = self.text_weights if classnames is None else self.text_features(task, self.prompt_tokens(task, classnames))
        pixels = images.eval_pixels()
        return task.in_batches(lambda batch: self.logits(self.image_features(task, batch), text), pixels, 128)

    def trainable_parameters(self) -> int:
        return self.ctx.numel() + self.ctx_vision.numel() if hasattr(self, "ctx") else 0
