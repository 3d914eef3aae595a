"""CoCoOp: Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models",
CVPR 2022. Follows KaiyangZhou/CoOp (`trainers/cocoop.py`, config
`vit_b16_c4_ep10_batch1_ctxv1.yaml`, the one every CoCoOp script uses).

- context: 4 vectors initialised from the token embeddings of "a photo of a" (ctxv1);
- meta-net: Linear(D -> D/16) -> ReLU -> Linear(D/16 -> text width), with biases, D the joint
  embedding width; its output pi(x) for the L2-normalised image feature x is added to EVERY
  context vector: ctx_i = ctx + pi(x_i);
- prompts "[SOS] ctx_i {class} . [EOS]": each image has its own prompts, so the text encoder runs
  over all classes once per image; logits_i = 100 cos(x_i, t_i,c); cross-entropy;
- SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 1, 10 epochs for every dataset and shot
  count, epoch 1 constant 1e-5 then cosine per epoch; last epoch, no validation;
- few-shot (all classes): the same config at K shots, as the CLIP-LoRA paper ran it (inferred
  there, the paper has no all-class table); new classes and other datasets: the same context and
  meta-net with the new class names.

Cost and how it is kept down: a batch of B images is B x C prompts through the text encoder. They
run as one [B*C, L, W] pass (`prompt_chunk` prompts at most per pass), truncated to the longest
prompt's EOT (exact under the causal mask), instead of the official per-image loop; `python -m
bench.cocoop_batching` measures the two and their peak memory.

Deviations: precision fp32 (CPU) / bf16 autocast (CUDA) with fp32 parameters instead of pure fp16
(ctx, meta-net and CLIP in half precision); crops augmented on tensors (AUGMENT_DEVIATION); frozen image encoder run without autograd
(same result); epoch_scale < 1 only in the demo suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbones import encode_token_embeddings
from harness.data.images import AUGMENT_DEVIATION
from methods import dassl_loop
from methods.base import ImageSet, Task, register
from methods.coop import CoOp, PromptLearner
from methods.hparams import Param


def meta_net(embed_dim: int, text_width: int, device) -> nn.Module:
    """CoCoOp's Meta-Net: Linear(D, D//16) -> ReLU -> Linear(D//16, text width)."""
    hidden = embed_dim // 16
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, text_width)).to(device)


def conditional_text_features(task: Task, prompts: PromptLearner, ctx: torch.Tensor, shift: torch.Tensor, chunk: int) -> torch.Tensor:
    """L2-normalised text features [B, C, E] of every class under each image's context ctx + shift[b].

    The B x C prompts run through the text encoder in passes of at most `chunk` prompts
    (whole images per pass), instead of one pass per image."""
    n_cls = prompts.prefix.shape[0]
    per_pass = max(1, chunk // n_cls)
    out = []
    for start in range(0, shift.shape[0], per_pass):
        s = shift[start : start + per_pass]  # [b, W]
        b = s.shape[0]
        ctx_b = (ctx.unsqueeze(0) + s.unsqueeze(1)).unsqueeze(1).expand(b, n_cls, -1, -1)  # [b, C, n_ctx, W]
        emb = torch.cat(
            [prompts.prefix.unsqueeze(0).expand(b, -1, -1, -1), ctx_b, prompts.suffix.unsqueeze(0).expand(b, -1, -1, -1)], dim=2
        ).flatten(0, 1)
        with task.autocast():
            feats = encode_token_embeddings(task.backbone.model, emb, prompts.eot_index.repeat(b))
        out.append(F.normalize(feats.float(), dim=-1).view(b, n_cls, -1))
    return torch.cat(out)


@register
class CoCoOp(CoOp):
    name = "cocoop"
    paper = "Zhou et al., Conditional Prompt Learning for Vision-Language Models, CVPR 2022"
    source = "KaiyangZhou/CoOp@ff61507c7904 (trainers/cocoop.py), KaiyangZhou/Dassl.pytorch@c61a1b570ac6"
    deviations = (
        "precision fp32 (CPU) / bf16 autocast (CUDA) instead of pure fp16; "
        f"{AUGMENT_DEVIATION}; per-image prompts batched through the text encoder (same result as the "
        "official per-image loop); epoch_scale < 1 only in the demo"
    )
    defaults = {
        **{k: v for k, v in CoOp.defaults.items() if k != "init_std"},
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "epochs": 10,
        "batch_size": 1,
        "prompt_chunk": 4096,  # prompts per text-encoder pass (memory, not results)
    }
    schema = {**{k: v for k, v in CoOp.schema.items() if k != "init_std"}, "prompt_chunk": Param(int, ge=1)}

    def build(self, task: Task) -> None:
        self.prompts = PromptLearner(task, self.hp["n_ctx"], 0.02, self.hp["ctx_init"])
        self.meta_net = meta_net(task.backbone.embed_dim, self.prompts.ctx.shape[-1], task.device)

    def fit(self, task: Task) -> None:
        hp = self.hp
        self.build(task)
        self.logit_scale = float(task.backbone.model.logit_scale.exp())
        self.epochs = self.planned_epochs(hp, task.card, task.shots)
        params = [self.prompts.ctx, *self.meta_net.parameters()]
        self.epoch_lrs = dassl_loop.train(task, params, hp, self.epochs, self.forward_backward(task), self.name)
        self.meta_net.eval()

    def conditional_logits(self, task: Task, feats: torch.Tensor, prompts: PromptLearner) -> torch.Tensor:
        """logits [B, C] of L2-normalised image features, each against its own conditioned prompts."""
        text = conditional_text_features(task, prompts, self.prompts.ctx, self.meta_net(feats), self.hp["prompt_chunk"])
        return self.logit_scale * torch.einsum("bd,bcd->bc", feats, text)

    def forward_backward(self, task: Task):
        def step(crops, labels, scaler):
            loss = F.cross_entropy(self.conditional_logits(task, self.image_features(task, crops), self.prompts), labels)
            scaler.scale(loss).backward()
            return loss.detach()

        return step

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        prompts = self.prompts
        if classnames is not None:  # the same context and meta-net over other class names
            prompts = PromptLearner(task, self.hp["n_ctx"], 0.02, self.hp["ctx_init"], classnames)
        feats = task.frozen_features(images)
        per_batch = max(1, self.hp["prompt_chunk"] // prompts.prefix.shape[0])
        return torch.cat([self.conditional_logits(task, feats[i : i + per_batch], prompts) for i in range(0, len(feats), per_batch)])

    def trainable_parameters(self) -> int:
        if not hasattr(self, "meta_net"):
            return 0
        return self.prompts.ctx.numel() + sum(p.numel() for p in self.meta_net.parameters())
