"""CLIP's two towers with prompt tokens inserted inside them (MaPLe, PLOT++, PromptSRC).

open_clip's `encode_image` / `encode_text` take no extra tokens, so these re-run the towers block
by block: the same modules and weights, with learned tokens placed where the official MaPLe and
PLOT++ code (`clip/model.py` of each) places them. With no prompts they equal CLIP's own forward
(tested), so any difference in a run comes from the prompts alone.

- vision: prompt tokens are appended AFTER the patch tokens, after the positional embedding and
  before `ln_pre`; a deep prompt for layer i replaces the last n tokens before block i; the output
  is the CLS token through `ln_post` and the projection;
- text: a deep prompt for layer i replaces the n tokens after SOS before block i (the input
  prompt's own context tokens sit there at layer 0); the output is the EOT token as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP


def resblocks(transformer):
    if not transformer.batch_first:
        raise ValueError("deep prompts need a batch-first open_clip transformer (open_clip >= 2.23)")
    return transformer.resblocks


def vision_tower(model: CLIP, pixels: torch.Tensor, prompts: torch.Tensor | None = None, deep: list[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised image features [S, B, E] of normalised pixels [B, 3, H, W] under S prompt sets.

    prompts [S, n, Wv]: appended tokens (None: CLIP's own forward, S = 1); deep[i] [S, n, Wv]
    replaces them before block i + 1. The patch embedding runs once per image; the S sets run as
    one batch of S * B sequences."""
    visual = model.visual
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    b = x.shape[0]
    if prompts is None:
        x = x.unsqueeze(0)
    else:
        s, n = prompts.shape[:2]
        x = torch.cat([x.unsqueeze(0).expand(s, -1, -1, -1), prompts.to(x.dtype).unsqueeze(1).expand(-1, b, -1, -1)], dim=2)
    s = x.shape[0]
    x = visual.ln_pre(x.flatten(0, 1))
    for i, block in enumerate(resblocks(visual.transformer)):
        if 1 <= i <= len(deep):
            p = deep[i - 1].to(x.dtype)
            x = torch.cat([x[:, : -p.shape[1]], p.unsqueeze(1).expand(-1, b, -1, -1).flatten(0, 1)], dim=1)
        x = block(x)
    x = visual.ln_post(x[:, 0])
    return (x @ visual.proj).view(s, b, -1)


def text_tower(model: CLIP, embeddings: torch.Tensor, eot_index: torch.Tensor, deep: list[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised text features [B, E] of token embeddings [B, L, W] (L may stop at the longest
    EOT: exact under the causal mask); deep[i] [n, W] replaces positions 1..n before block i + 1."""
    length = embeddings.shape[1]
    x = embeddings + model.positional_embedding[:length].to(embeddings.dtype)
    mask = model.attn_mask[:length, :length]
    for i, block in enumerate(resblocks(model.transformer)):
        if 1 <= i <= len(deep):
            p = deep[i - 1].to(x.dtype)
            x = torch.cat([x[:, :1], p.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + p.shape[0] :]], dim=1)
        x = block(x, attn_mask=mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), eot_index] @ model.text_projection


def prompted_text_features(task, tokens, ctx: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalised class text features of a coop.PromptLearner's fixed tokens with the learned
    context `ctx` in place and the deep text prompts `deep` (MaPLe, PromptSRC)."""
    with task.autocast():
        feats = text_tower(task.backbone.model, tokens.embeddings(ctx), tokens.eot_index, list(deep))
    return F.normalize(feats.float(), dim=-1)
