"""A reference-style CLIP-LoRA training loop: the recipe as the official code (MaxZanella/CLIP-LoRA,
`lora.py` + `loralib/`) runs it, written here from that description to be timed against the harness.

What it does the official way (and the harness does not):
- LoRA on q, k, v through three separate projections per block, with the update B @ A
  materialised at every forward: x (B A)^T instead of (x A^T) B^T;
- fp16 autocast with a GradScaler on CUDA (on CPU there is no fp16 autocast worth timing: fp32,
  scaler disabled);
- the text tower on the full 77-token context through open_clip's own `encode_text`, prompts
  tokenised again every step;
- images decoded from their files and augmented with PIL on the CPU by a torch DataLoader every
  step (RandomResizedCrop(scale 0.08-1, bicubic) + flip + ToTensor + Normalize), batch 32, shuffled,
  last partial batch kept;
- the loss read back to the host every step (`loss.item()`, as the official loop logs it);
- evaluation: test images decoded from files by a DataLoader (resize + centre crop), LoRA merged
  into the weights (the official layers merge when put in eval mode).
Same recipe values as the harness: r, alpha, alpha / sqrt(r), dropout on the branch input, AdamW,
cosine to min_lr, 100 * cos logits.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from harness.data.images import CLIP_MEAN, CLIP_STD
from harness.data.readers import Item


def no_section(name: str):
    return contextlib.nullcontext()


class RefLoRALinear(nn.Module):
    """One frozen projection with a LoRA branch computed through the materialised B @ A."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.A = nn.Parameter(torch.zeros(r, weight.shape[1], device=weight.device))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], r, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(r)
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + torch.matmul(self.dropout(x), (self.B @ self.A).transpose(0, 1)) * self.scaling

    def train(self, mode: bool = True):
        super().train(mode)
        with torch.no_grad():  # merged for evaluation, unmerged for training, as the official layers
            if not mode and not self.merged:
                self.weight += (self.B @ self.A) * self.scaling
                self.merged = True
            elif mode and self.merged:
                self.weight -= (self.B @ self.A) * self.scaling
                self.merged = False
        return self


class RefAttention(nn.Module):
    """nn.MultiheadAttention replaced the official way: split q / k / v projections, SDPA."""

    def __init__(self, mha: nn.MultiheadAttention, r: int, alpha: float, dropout: float):
        super().__init__()
        E = mha.embed_dim
        self.embed_dim, self.num_heads, self.batch_first = E, mha.num_heads, mha.batch_first
        W, b = mha.in_proj_weight, mha.in_proj_bias
        bs = b.chunk(3) if b is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (RefLoRALinear(w, bb, r, alpha, dropout) for w, bb in zip(W.chunk(3), bs))
        self.proj = copy.deepcopy(mha.out_proj)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **kwargs):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, B, E = query.shape
        S = key.shape[0]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q = q.view(L, B * self.num_heads, -1).transpose(0, 1).reshape(B, self.num_heads, L, -1)
        k = k.view(S, B * self.num_heads, -1).transpose(0, 1).reshape(B, self.num_heads, S, -1)
        v = v.view(S, B * self.num_heads, -1).transpose(0, 1).reshape(B, self.num_heads, S, -1)
        if attn_mask is not None:
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.permute(2, 0, 1, 3).reshape(L * B, E)).view(L, B, E)
        return (out.transpose(0, 1) if self.batch_first else out), None


def reference_model(model: nn.Module, r: int = 2, alpha: float = 1.0, dropout: float = 0.25):
    """A copy of an open_clip CLIP with reference-style LoRA in every attention block of both towers."""
    model = copy.deepcopy(model).requires_grad_(False)
    params = []
    for tower in (model.transformer, model.visual.transformer):  # text first, as the official apply_lora
        for block in tower.resblocks:
            block.attn = RefAttention(block.attn, r, alpha, dropout)
            params += [p for n, p in block.attn.named_parameters() if n.endswith((".A", ".B"))]
    for p in params:
        p.requires_grad_(True)
    return model, params


class FileImages(Dataset):
    def __init__(self, root: Path, items: list[Item], transform):
        self.root, self.items, self.transform = Path(root), items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        with Image.open(self.root / self.items[i].path) as im:
            return self.transform(im.convert("RGB")), self.items[i].label


def train_transform(size: int, scale=(0.08, 1.0)):
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def test_transform(size: int):
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


class ReferenceLoop:
    """The official CLIP-LoRA training loop's structure, one step at a time (`step`)."""

    def __init__(self, backbone_model, classnames: list[str], root: Path, items: list[Item], image_size: int,
                 device: torch.device, hp: dict, total_steps: int, workers: int = 0):
        self.device = device
        self.model, self.params = reference_model(backbone_model, int(hp["r"]), float(hp["alpha"]), float(hp["dropout"]))
        self.texts = [hp["template"].format(c) for c in classnames]
        self.scale = float(hp["logit_scale"])
        self.fp16 = device.type == "cuda"
        self.precision = "fp16 autocast + GradScaler" if self.fp16 else "fp32, GradScaler disabled (CPU: no fp16 autocast)"
        self.optimizer = torch.optim.AdamW(self.params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), betas=tuple(hp["betas"]))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps, eta_min=float(hp["min_lr"]))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.image_size, self.root, self.workers = image_size, root, workers
        self.loader = DataLoader(
            FileImages(root, items, train_transform(image_size, tuple(hp["crop_scale"]))), batch_size=int(hp["batch_size"]),
            shuffle=True, num_workers=workers, pin_memory=self.fp16, drop_last=False, persistent_workers=workers > 0,
        )
        self._batches = iter(())
        self.losses: list[float] = []
        self.model.train()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()

    def _next_batch(self):
        try:
            return next(self._batches)
        except StopIteration:  # a new epoch of the DataLoader
            self._batches = iter(self.loader)
            return next(self._batches)

    def step(self, section=no_section) -> float:
        with section("data"):
            images, target = self._next_batch()
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        with self.autocast():
            with section("text"):
                tokens = open_clip.tokenize(self.texts).to(self.device)  # 77 tokens, every step
                text = self.model.encode_text(tokens)
                text = text / text.norm(dim=-1, keepdim=True)
            with section("image"):
                image = self.model.encode_image(images)
                image = image / image.norm(dim=-1, keepdim=True)
        with section("backward"):
            loss = F.cross_entropy(self.scale * image.float() @ text.float().t(), target)
            self.losses.append(loss.item())  # the official loop logs the loss every step (host sync)
            self.optimizer.zero_grad()
            self.scaler.scale(loss).backward()
        with section("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return self.losses[-1]

    @torch.no_grad()
    def evaluate(self, items: list[Item], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of `items`, decoded from files by a DataLoader, LoRA merged."""
        self.model.eval()
        loader = DataLoader(FileImages(self.root, items, test_transform(self.image_size)), batch_size=batch_size,
                            shuffle=False, num_workers=self.workers, pin_memory=self.fp16)
        with self.autocast():
            text = self.model.encode_text(open_clip.tokenize(self.texts).to(self.device))
        text = text / text.norm(dim=-1, keepdim=True)
        logits, labels = [], []
        for images, target in loader:
            with self.autocast():
                feats = self.model.encode_image(images.to(self.device, non_blocking=True))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            logits.append(self.scale * feats.float() @ text.float().t())
            labels.append(target)
        self.model.train()
        return torch.cat(logits).cpu(), torch.cat(labels)
