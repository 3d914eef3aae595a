"""CLIP's two towers with prompt tokens inserted inside them (MaPLe, PLOT++, PromptSRC).

open_clip's `encode_image` / `encode_text` take no extra tokens, so these re-run the towers block
by block: the same modules and weights, with learned tokens placed where the official MaPLe and
PLOT++ code (`clip/model.py` of each) places them. With no prompts they equal the backbone's own
forward (tested), so any difference in a run comes from the prompts alone.

- vision: prompt tokens are appended AFTER the patch tokens, after the positional embedding and
  before `ln_pre`; a deep prompt for layer i replaces the last n tokens before block i; the output
  is the CLS token through `ln_post` and the projection;
- text (any open_clip text tower, `harness.backbones.encode_token_embeddings`): a deep prompt for
  layer i replaces the n tokens after SOS (from the first, for a tokenizer without one) before block i (the input prompt's own context
  tokens sit there at layer 0); the output is the tower's own pooling (EOT token on CLIP's).

timm image towers (EVA-02, SigLIP, PE-Core; no official counterpart, our decisions): the prompts
are appended after the patch (and register) tokens, before `norm_pre`, as above. Under rotary
position embeddings (EVA-02, PE-Core) they get none, as the class token gets none: the rotation
table is extended with the identity for them. They are dropped before the tower's own pooling
(class token, attention pooling or mean), so they act only through attention in the blocks, as in
CLIP, where they reach the class token only that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from harness.backbones import encode_token_embeddings


def resblocks(transformer):
    if not transformer.batch_first:
        raise ValueError("deep prompts need a batch-first open_clip transformer (open_clip >= 2.23)")
    return transformer.resblocks


def vision_tower(model: CLIP, pixels: torch.Tensor, prompts: torch.Tensor | None = None, deep: list[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised image features [S, B, E] of normalised pixels [B, 3, H, W] under S prompt sets.

    prompts [S, n, Wv]: appended tokens (None: the backbone's own forward, S = 1); deep[i] [S, n, Wv]
    replaces them before block i + 1. The patch embedding runs once per image; the S sets run as
    one batch of S * B sequences."""
    if hasattr(model.visual, "trunk"):
        return _timm_vision_tower(model.visual, pixels, prompts, deep)
    visual = model.visual
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    b = x.shape[0]
    x = visual.ln_pre(_with_prompts(x, prompts))
    for i, block in enumerate(resblocks(visual.transformer)):
        x = block(_replace_deep(x, deep, i, b))
    x = visual.ln_post(x[:, 0]) @ visual.proj
    return x.view(-1, b, x.shape[-1])


def _with_prompts(x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """[B, N, W] tokens -> [S * B, N + n, W] with each of the S prompt sets appended."""
    if prompts is None:
        return x
    s, b = prompts.shape[0], x.shape[0]
    return torch.cat([x.unsqueeze(0).expand(s, -1, -1, -1), prompts.to(x.dtype).unsqueeze(1).expand(-1, b, -1, -1)], dim=2).flatten(0, 1)


def _replace_deep(x: torch.Tensor, deep: list[torch.Tensor], i: int, b: int) -> torch.Tensor:
    """Before block i (i >= 1), deep[i - 1] [S, n, W] replaces the last n tokens of each of the S * B sequences."""
    if not 1 <= i <= len(deep):
        return x
    p = deep[i - 1].to(x.dtype)
    return torch.cat([x[:, : -p.shape[1]], p.unsqueeze(1).expand(-1, b, -1, -1).flatten(0, 1)], dim=1)


def _timm_vision_tower(visual, pixels, prompts, deep) -> torch.Tensor:
    """The same for open_clip's TimmModel around a timm ViT or EVA trunk (see the module docstring)."""
    trunk = visual.trunk
    x = trunk.patch_embed(pixels.to(trunk.patch_embed.proj.weight.dtype))
    x = trunk._pos_embed(x)
    x, rope = x if isinstance(x, tuple) else (trunk.patch_drop(x), None)  # EVA returns its rotary table beside
    b, n = x.shape[0], 0 if prompts is None else prompts.shape[1]
    x = trunk.norm_pre(_with_prompts(x, prompts))
    if rope is not None and n:
        if rope.dim() != 2:
            raise ValueError(f"{type(trunk).__name__}: per-layer or per-sample rotary tables are not supported with prompts.")
        identity = torch.cat([torch.zeros(n, rope.shape[1] // 2), torch.ones(n, rope.shape[1] // 2)], dim=1)  # sin 0, cos 1
        rope = torch.cat([rope, identity.to(rope)], dim=0)
    for i, block in enumerate(trunk.blocks):
        x = _replace_deep(x, deep, i, b)
        x = block(x) if rope is None else block(x, rope=rope)
    x = trunk.norm(x)
    x = visual.head(trunk.forward_head(x[:, : x.shape[1] - n]))
    return x.view(-1, b, x.shape[-1])


def prompted_text_features(task, tokens, ctx: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalised class text features of a coop.PromptLearner's fixed tokens with the learned
    context `ctx` in place and the deep text prompts `deep` (MaPLe, PromptSRC)."""
    with task.autocast():
        feats = encode_token_embeddings(task.backbone.model, tokens.embeddings(ctx), tokens.eot_index, list(deep), tokens.start)
    return F.normalize(feats.float(), dim=-1)
