"""2SFS: Farina, Mancini, Iacca, Ricci, "Rethinking Few-Shot Adaptation of Vision-Language Models in
Two Stages", CVPR 2025. Follows FarinaMatteo/rethinking_fewshot_vlms@64ac143 (`fs/twostage.py`,
`fs/utils/model_utils.py`, `main.py`, `datasets/*.py`): one fixed recipe for every dataset, shot
count, backbone and setting.

- budget: M x K iterations (M = 300, K the shots per class; main.py:63, twostage.py:261), the first
  int(0.6 M K) in stage 1 (main.py:65, twostage.py:262), the rest in stage 2;
- stage 1: the LayerNorms of both encoders train, everything else frozen (`--peft ln --ln_modality
  both`, main.py:67-77). As released, `named_modules_with_index` (model_utils.py:12-20, 26-38) yields
  ln_pre, ln_post and ln_final a second time and freezes them, so only the blocks' ln_1 and ln_2
  train: 61,440 parameters on ViT-B/16 (`outer_layernorms=true` trains those three too: 65,536).
  Cross-entropy on 100 cos(image, text) with every class prompt "a photo of a {}." (every dataset,
  e.g. datasets/oxford_pets.py:14-17) re-encoded each step; the loop is CLIP-LoRA's;
- stage 2: a linear head, one row per class, initialised to the stage-1 text encoder's normalised
  prompt features (twostage.py:59-65); only the head trains (twostage.py:291), the encoders run
  without gradients on fresh crops every iteration (twostage.py:151-158); logits 100 cos(image, row);
- each stage: AdamW lr 2e-4, weight decay 0.01, betas (0.9, 0.999), its own cosine to 1e-6 over its
  iterations, no warm-up (twostage.py:258-263, 291-297); batch 32 (last partial batch kept,
  datasets/utils.py:427-433); RandomResizedCrop 0.08-1 bicubic + flip (datasets/__init__.py:62-67);
- selective inference (twostage.py:80-113): a class the head was trained on is scored by its row, any
  other class by the adapted text encoder's prompt feature, so base-to-new's new classes (and other
  datasets' classes) are scored through the text side.

Deviations: precision fp32 on CPU / bf16 autocast on CUDA (official: fp32 weights, fp16 autocast with
a GradScaler, whose skipped steps it does not count; --precision fp16 runs that scaler); crops on
tensors (as CLIP-LoRA here); the harness's CoOp subsets (official: its published split files, which
`--splits` reads).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbones import encode_text, text_tower, tower_blocks
from harness.data.images import AUGMENT_DEVIATION, random_resized_crops
from methods.base import FiniteGuard, ImageSet, Task, register
from methods.clip_lora import CLIPLoRA, shuffled_batches
from methods.hparams import Param


def layernorms(model: nn.Module, encoders=("vision", "text"), outer: bool = False) -> list[nn.LayerNorm]:
    """The LayerNorms 2SFS trains: ln_1 and ln_2 of every block of the encoders (norm1 and norm2 in a
    timm image tower), and with `outer` ln_pre and ln_post of the image tower and ln_final of the text
    tower, which the released code leaves frozen (a timm tower: its final norms)."""
    norms, ends = [], []
    for e in encoders:
        blocks, kind = tower_blocks(model, e)
        norms += [m for block in blocks for m in ((block.norm1, block.norm2) if kind == "timm" else (block.ln_1, block.ln_2))]
        if e == "text":
            ends += [text_tower(model).ln_final]
        elif kind == "open_clip":
            ends += [model.visual.ln_pre, model.visual.ln_post]
        else:
            ends += [m for m in (getattr(model.visual.trunk, "norm_pre", None), getattr(model.visual.trunk, "norm", None))
                     if isinstance(m, nn.LayerNorm)]
    return norms + (ends if outer else [])


def head_logits(features: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(features, dim=-1) @ F.normalize(rows, dim=-1).T


@register
class TwoSFS(CLIPLoRA):
    name = "two_sfs"
    requires = ("block_layernorms",)
    paper = "Farina, Mancini, Iacca, Ricci, Rethinking Few-Shot Adaptation of Vision-Language Models in Two Stages, CVPR 2025"
    source = "FarinaMatteo/rethinking_fewshot_vlms@64ac143c7d22 (fs/twostage.py, fs/utils/model_utils.py, main.py)"
    deviations = (
        "bf16 autocast on CUDA / fp32 on CPU (official: fp16 autocast + GradScaler, skipped steps not counted; --precision "
        f"fp16 runs the scaler); {AUGMENT_DEVIATION}; CoOp subsets by default (its split files: --splits)"
    )
    defaults = {
        "iterations_per_shot": 300,  # M: M x K iterations in all
        "stage1_fraction": 0.6,
        "outer_layernorms": False,  # True: also ln_pre, ln_post, ln_final (the released code freezes them)
        "encoders": "both",
        "lr": 2e-4,
        "min_lr": 1e-6,
        "weight_decay": 1e-2,
        "betas": [0.9, 0.999],
        "batch_size": 32,
        "crop_scale": [0.08, 1.0],
        "template": "a photo of a {}.",
        "logit_scale": 100.0,
        "max_short_side": None,
    }
    schema = {
        "iterations_per_shot": Param(int, ge=1),
        "stage1_fraction": Param(float, gt=0, lt=1),
        "outer_layernorms": Param(bool),
        **{k: CLIPLoRA.schema[k] for k in ("encoders", "lr", "min_lr", "weight_decay", "betas", "batch_size", "crop_scale",
                                           "template", "logit_scale", "max_short_side")},
    }

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        return None if "{}" in hp["template"] else f"template '{hp['template']}' has no {{}} for the class name."

    def stage_iterations(self, task: Task) -> tuple[int, int]:
        total = int(self.hp["iterations_per_shot"]) * task.shots
        first = int(total * float(self.hp["stage1_fraction"]))
        return first, total - first

    def total_steps(self, task: Task) -> int:
        return self.stage_iterations(task)[0]  # CLIP-LoRA's loop runs stage 1

    def build_model(self, task: Task, encoders: tuple[str, ...]) -> tuple[nn.Module, list[torch.Tensor]]:
        model = copy.deepcopy(task.backbone.model).requires_grad_(False)
        params = [p for m in layernorms(model, encoders, self.hp["outer_layernorms"]) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return model, params

    def merge(self) -> None:
        """LayerNorm tuning changes the weights in place: nothing to fold."""

    def fit(self, task: Task) -> None:
        super().fit(task)  # stage 1
        self.n_stage1 = self.n_trainable
        self.train_head(task, self.stage_iterations(task)[1])

    def train_head(self, task: Task, iterations: int) -> None:
        """Stage 2: the head from the adapted text features, trained alone on fresh crops."""
        hp = self.hp
        self.model.eval()
        with torch.no_grad(), task.autocast():
            init = F.normalize(encode_text(self.model, self.tokens).float(), dim=-1)
        self.head = nn.Parameter(init.clone())
        optimizer = torch.optim.AdamW([self.head], lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), betas=tuple(hp["betas"]))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations), eta_min=float(hp["min_lr"]))
        images = task.train_originals(hp["max_short_side"])
        labels = task.train.labels.to(task.device)
        batches = shuffled_batches(len(images), int(hp["batch_size"]))
        guard, steps = FiniteGuard(), task.start_steps(iterations, f"{self.name} stage 2")
        for it in range(iterations):
            idx = next(batches)
            with torch.no_grad():
                crops = random_resized_crops([images[i] for i in idx.tolist()], task.backbone.image_size, tuple(hp["crop_scale"]))
                with task.autocast():
                    feats = self.model.encode_image(task.normalize(crops)).float()
            loss = F.cross_entropy(head_logits(feats, self.head, float(hp["logit_scale"])), labels[idx.to(labels.device)])
            guard.update(loss, it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps.advance()
        guard.close()
        self.head.requires_grad_(False)

    @torch.no_grad()
    def class_rows(self, task: Task, classnames: list[str] | None) -> torch.Tensor:
        """Selective inference: the head's row for a class it was trained on, the adapted text
        encoder's prompt feature for any other class."""
        head = getattr(self, "head", None)  # None before stage 2 (a benchmark of stage 1's step): all from text
        if classnames is None and head is not None:
            return head
        classnames = task.classnames if classnames is None else classnames
        missing = [c for c in classnames if head is None or c not in task.classnames]
        text = {}
        if missing:
            tokens = task.backbone.tokenize([self.template.format(c) for c in missing])
            with task.autocast():
                text = dict(zip(missing, F.normalize(encode_text(self.model, tokens).float(), dim=-1)))
        return torch.stack([text[c] if c in text else head[task.classnames.index(c)] for c in classnames])

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        self.model.eval()
        feats = task.encode_images(self.model, images.eval_pixels())
        return head_logits(feats, self.class_rows(task, classnames), float(self.hp["logit_scale"]))

    def trainable_parameters(self) -> int:
        """Stage 1's LayerNorm parameters plus the head."""
        return getattr(self, "n_stage1", 0) + (self.head.numel() if hasattr(self, "head") else 0)

