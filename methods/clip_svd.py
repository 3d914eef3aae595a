"""CLIP-SVD: Koleilat, Rivaz, Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models",
2025 (arXiv 2509.03740). Follows HealthX-Lab/CLIP-SVD@022b1ed (`train.py`, `svf_torch.py`,
`svf_utils/utils.py`, `PlainHeadAttention.py`, `main.py`, `configs/few_shot/*.yaml`).

- every linear map of both encoders, all layers: q, k, v (the packed attention input projection
  split in three, PlainHeadAttention.py:141-174), the attention output, the MLP's c_fc and c_proj
  (svf_torch.py:192, 275-293, rank ratio 1.0: full rank) is decomposed once, W = U diag(s) V^T
  (reduced SVD of the fp32 weight, svf_torch.py:27); U and V are frozen and only the singular values
  s train, from their own values, so the model is CLIP's own at initialisation (utils.py:24-69);
  biases, LayerNorms, projections and the logit scale stay frozen. ViT-B/16: 12 x 6 x 768 + 12 x 6 x 512
  = 92,160 parameters (the README's "0.04 %" divides by the decomposed model's inflated size);
- AdamW lr 5e-4, weight decay 0.01, betas (0.9, 0.999), cosine to 1e-6 over 200 x K iterations with
  no warm-up, batch 32 (train.py:121-131, main.py:33; the yaml's epochs are unused on this path);
  RandomResizedCrop 0.08-1 bicubic + flip (main.py:82-87); cross-entropy on 100 cos(image, text)
  (main.py:62, train.py:158), every class prompt re-encoded through the adapted text encoder each
  step; the dataset's CoOp template (its configs); the last iterate (train.py:57, 188).

Here W = U diag(s) V^T is a reparametrisation of the frozen weight (U, V buffers, s the parameter),
rebuilt once per forward and folded into plain weights for evaluation: the official code runs x V
then U at every token (two matmuls per linear map); the function is the same. The loop is
CLIP-LoRA's (`methods/clip_lora.py`).

Deviations: precision fp32 on CPU / bf16 autocast on CUDA (official: fp16 autocast without loss
scaling); crops on tensors (as CLIP-LoRA here); the harness's CoOp subsets (official: its own
random draws, seeds 1-3). Base-to-new runs the few-shot recipe (official: lr 4e-4, 10 or 20 epochs by
dataset with a cosine stepped per iteration over T_max = epochs, so the rate cycles every 2 x epochs
iterations, and "a photo of a {}." on DTD, EuroSAT, UCF101).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from harness.backbones import tower_blocks
from harness.data.images import AUGMENT_DEVIATION
from methods.base import Task, register
from methods.clip_lora import CLIPLoRA


class SingularValues(nn.Module):
    """A frozen weight as U diag(s) V^T with only s trainable; `blocks` row blocks (q, k, v of a
    packed projection) each decomposed on its own."""

    def __init__(self, weight: torch.Tensor, blocks: int = 1):
        super().__init__()
        factors = [torch.linalg.svd(piece.float(), full_matrices=False) for piece in weight.detach().chunk(blocks, dim=0)]
        for i, (u, _, vh) in enumerate(factors):
            self.register_buffer(f"u{i}", u.to(weight.dtype))
            self.register_buffer(f"vh{i}", vh.to(weight.dtype))
        self.sizes = [len(s) for _, s, _ in factors]
        self.s = nn.Parameter(torch.cat([s for _, s, _ in factors]).to(weight.dtype))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        pieces = [getattr(self, f"u{i}") @ (s[:, None] * getattr(self, f"vh{i}")) for i, s in enumerate(self.s.split(self.sizes))]
        return torch.cat(pieces).to(original.dtype)


def decomposed_maps(model: nn.Module, encoders: tuple[str, ...]):
    """(module, weight name, row blocks) of every linear map CLIP-SVD decomposes in these encoders:
    open_clip's blocks as the official code (q, k, v of the packed in_proj, out_proj, c_fc, c_proj),
    and in a timm image tower every Linear of each block's attention and MLP (a fused qkv as three), in a
    ResNet image tower the q, k, v and output projections of its attention pooling."""
    for encoder in encoders:
        blocks, kind = tower_blocks(model, encoder)
        for block in blocks:
            if kind == "attnpool":  # nor this one; the pooling reads `.weight`, so the parametrization acts
                yield from ((getattr(block, name), "weight", 1) for name in ("q_proj", "k_proj", "v_proj", "c_proj"))
                continue
            if kind == "timm":  # the official code has no such case
                for part in (block.attn, block.mlp):
                    for name, module in part.named_modules():
                        if isinstance(module, nn.Linear):
                            yield module, "weight", 3 if name == "qkv" else 1
                continue
            yield block.attn, "in_proj_weight", 3
            yield block.attn.out_proj, "weight", 1
            yield block.mlp.c_fc, "weight", 1
            yield block.mlp.c_proj, "weight", 1


@register
class CLIPSVD(CLIPLoRA):
    name = "clip_svd"
    requires = ("attention_blocks",)  # linear maps in every block of both towers (open_clip's or timm's; a ResNet's pooling)
    paper = "Koleilat, Rivaz, Xiao, Singular Value Few-shot Adaptation of Vision-Language Models, 2025 (arXiv 2509.03740)"
    source = "HealthX-Lab/CLIP-SVD@022b1eda02df (train.py, svf_torch.py, svf_utils/utils.py)"
    deviations = (
        "bf16 autocast on CUDA / fp32 on CPU (official: fp16 autocast without loss scaling); W = U diag(s) V^T rebuilt "
        f"once per forward (official: x V then U per token; same function); {AUGMENT_DEVIATION}; base-to-new runs the "
        "few-shot recipe (official: lr 4e-4, 10/20 epochs by dataset with a cycling cosine); in a timm image tower (no "
        "official counterpart) every Linear of each block's attention and MLP is decomposed; in a ResNet image tower (none "
        "either) the q, k, v and output projections of its attention pooling, the tower's only attention"
    )
    defaults = {
        "encoders": "both",
        "lr": 5e-4,
        "min_lr": 1e-6,
        "weight_decay": 1e-2,
        "betas": [0.9, 0.999],
        "batch_size": 32,
        "steps_per_shot": 200,  # total iterations = 200 * K
        "crop_scale": [0.08, 1.0],
        "template": "card",  # card: the dataset's CoOp template; or a template with {}
        "logit_scale": 100.0,
        "max_short_side": None,
    }
    schema = {k: CLIPLoRA.schema[k] for k in ("encoders", "lr", "min_lr", "weight_decay", "betas", "batch_size", "steps_per_shot",
                                              "crop_scale", "template", "logit_scale", "max_short_side")}

    @classmethod
    def config_error(cls, hp: dict, card) -> str | None:
        if hp["template"] != "card" and "{}" not in hp["template"]:
            return f"template '{hp['template']}' has no {{}} for the class name (or use card)."
        return None

    def prompt(self, task: Task) -> str:
        return task.card.template if self.hp["template"] == "card" else self.hp["template"]

    def build_model(self, task: Task, encoders: tuple[str, ...]) -> tuple[nn.Module, list[torch.Tensor]]:
        model = copy_frozen(task.backbone.model)
        params = []
        for module, name, blocks in decomposed_maps(model, encoders):
            values = SingularValues(getattr(module, name), blocks)
            parametrize.register_parametrization(module, name, values, unsafe=True)
            params.append(values.s)
        return model, params

    def merge(self) -> None:
        for module, name, _ in decomposed_maps(self.model, ("vision", "text")):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def copy_frozen(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def singular_value_count(model: nn.Module, encoders=("vision", "text")) -> int:
    """Trainable parameters of CLIP-SVD on `model`: min(d_out, d_in) per decomposed matrix."""
    total = 0
    for module, name, blocks in decomposed_maps(model, encoders):
        weight = getattr(module, name)
        total += blocks * min(weight.shape[0] // blocks, weight.shape[1])
    return total
