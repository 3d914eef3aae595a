"""LoRA and Block-LoRA adapters on the q/k/v projections of open_clip's attention blocks (and of
timm's, in timm image towers: `AdaptedLinear` on the fused qkv or the separate q/k/v projections;
and of a ResNet image tower's only attention, its final attention pooling: `AdaptedAttentionPool`).

`AdaptedAttention` replaces an `nn.MultiheadAttention` (same call, batch_first) with one that keeps
the packed frozen `in_proj` (one fused matmul for q, k, v), adds a low-rank branch to the chosen
projections, attends with `F.scaled_dot_product_attention` and applies the frozen `out_proj`.

LoRA (Hu et al. 2021, as configured by CLIP-LoRA, MaxZanella/CLIP-LoRA `loralib/layers.py`):
    h = W0 x + s * B A dropout(x),  s = alpha / sqrt(r),  A ~ kaiming_uniform(a=sqrt(5)), B = 0.
Training computes the branch factored, (x A^T) B^T: r * (d_in + d_out) MACs per token instead of
the official code's B @ A (d_out * d_in) materialised at every forward. `merge_adapters` folds
s * B A into the frozen weights for evaluation (no inference overhead); `unmerge_adapters` undoes it.

Block-LoRA (arXiv 2501.16720) is a RECONSTRUCTION from the abstract (see ../shared/METHODS.md):
the down-projection A = [A_s, ..., A_s] shares one r x (d_in/n) block over the n contiguous input
chunks, so A x = A_s (x_1 + ... + x_n): additions plus one small matmul. n = 1 is exactly LoRA.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.backbones import tower_blocks

TARGETS = ("q", "k", "v", "o")


class LoRAAdapter(nn.Module):
    """The low-rank branch s * B A dropout(x) of one projection (d_in -> d_out)."""

    def __init__(self, d_in: int, d_out: int, r: int = 2, alpha: float = 1.0, dropout: float = 0.25, *, like: torch.Tensor | None = None):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        self.r, self.d_in, self.d_out = r, d_in, d_out
        self.scaling = alpha / math.sqrt(r)  # CLIP-LoRA's choice; loralib uses alpha / r
        self.dropout = nn.Dropout(dropout)
        self.A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear; B = 0 keeps the model unchanged at start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the [d_out, d_in] update folded into the frozen weight when merging."""
        return (self.B.float() @ self.A.float()) * self.scaling


class BlockLoRAAdapter(nn.Module):
    """Block-LoRA branch s * B A_s sum_j x_j (reconstruction from the abstract, arXiv 2501.16720).

    Open choices, exposed: n (chunks; must divide d_in), `chunk_norm` ("none" | "n" | "sqrt_n":
    divide the chunk sum by 1, n or sqrt(n)), `dropout_before_sum` (True: dropout on x as
    CLIP-LoRA, before the chunks are summed; False: on the summed chunk), `a_init_fan_in`
    ("block": kaiming on A_s itself, fan-in d_in/n; "full": the bound LoRA's A gets, fan-in d_in).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        *,
        n: int = 8,
        chunk_norm: str = "none",
        dropout_before_sum: bool = True,
        a_init_fan_in: str = "block",
        like: torch.Tensor | None = None,
    ):
        super().__init__()
        if n < 1 or d_in % n:
            raise ValueError(f"Block-LoRA: n={n} must be a positive divisor of the input width {d_in} (e.g. 1, 2, 4, 8).")
        if chunk_norm not in ("none", "n", "sqrt_n"):
            raise ValueError(f"Block-LoRA: chunk_norm must be none, n or sqrt_n, not '{chunk_norm}'.")
        if a_init_fan_in not in ("block", "full"):
            raise ValueError(f"Block-LoRA: a_init_fan_in must be block or full, not '{a_init_fan_in}'.")
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        self.r, self.d_in, self.d_out, self.n = r, d_in, d_out, n
        self.scaling = alpha / math.sqrt(r)
        self.chunk_scale = {"none": 1.0, "n": 1.0 / n, "sqrt_n": 1.0 / math.sqrt(n)}[chunk_norm]
        self.dropout_before_sum = dropout_before_sum
        self.dropout = nn.Dropout(dropout)
        self.A = nn.Parameter(torch.empty(r, d_in // n, **kw))  # the shared down-projection block A_s
        self.B = nn.Parameter(torch.zeros(d_out, r, **kw))
        if a_init_fan_in == "block":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:  # kaiming_uniform(a=sqrt(5)) bound for fan-in d_in: 1 / sqrt(d_in)
            nn.init.uniform_(self.A, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_before_sum:
            x = self.dropout(x)
        x = x.unflatten(-1, (self.n, self.d_in // self.n)).sum(-2)  # x_1 + ... + x_n
        if self.chunk_scale != 1.0:
            x = x * self.chunk_scale
        if not self.dropout_before_sum:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.A), self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s * B [A_s, ..., A_s] (times the chunk normalisation)."""
        return (self.B.float() @ self.A.float().repeat(1, self.n)) * (self.scaling * self.chunk_scale)


AdapterFactory = Callable[[int, int, torch.Tensor], nn.Module]  # (d_in, d_out, like-weight) -> adapter


class AdaptedAttention(nn.Module):
    """Drop-in for open_clip's `nn.MultiheadAttention` (self- or cross-attention, no key padding)
    with optional adapters on q, k, v (and o), attention through SDPA.

    The frozen weights are the wrapped module's own tensors (wrap a copy of a shared model).
    """

    def __init__(self, mha: nn.MultiheadAttention, make_adapter: AdapterFactory | None = None, targets: Iterable[str] = ("q", "k", "v")):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("AdaptedAttention needs the packed in_proj of an nn.MultiheadAttention with kdim = vdim = embed_dim.")
        targets = tuple(targets)
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"Unknown adapter target(s) {sorted(unknown)}; choose from q, k, v, o.")
        if targets and make_adapter is None:
            raise ValueError("Adapter targets given without an adapter factory.")
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.head_dim = mha.embed_dim // mha.num_heads
        self.dropout_p = mha.dropout
        self.in_proj_weight = mha.in_proj_weight  # [3E, E], rows q | k | v
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        E = self.embed_dim
        self.adapters = nn.ModuleDict({t: make_adapter(E, E, mha.in_proj_weight) for t in TARGETS if t in targets})
        self.merged = False

    def _qkv(self, query, key, value):
        W, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:  # self-attention: one fused matmul
            q, k, v = F.linear(query, W, b).chunk(3, dim=-1)
        else:
            Wq, Wk, Wv = W.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = F.linear(query, Wq, bq), F.linear(key, Wk, bk), F.linear(value, Wv, bv)
        if not self.merged:
            ad = self.adapters
            q = q + ad["q"](query) if "q" in ad else q
            k = k + ad["k"](key) if "k" in ad else k
            v = v + ad["v"](value) if "v" in ad else v
        return q, k, v

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise NotImplementedError("AdaptedAttention does not support key_padding_mask (open_clip does not use it).")
        if self.merged and self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.adapters.parameters()):
            raise RuntimeError("Adapters are merged into the weights; unmerge_adapters(model) before training.")
        if not self.batch_first:  # keep `query is key` identities (they select the fused matmul)
            same_k, same_v = key is query, value is query
            query = query.transpose(0, 1)
            key = query if same_k else key.transpose(0, 1)
            value = query if same_v else value.transpose(0, 1)
        q, k, v = self._qkv(query, key, value)
        B, Lq, E = q.shape
        Lk = k.shape[1]
        q = q.view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, Lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, Lk, self.num_heads, self.head_dim).transpose(1, 2)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = masked out; SDPA: True = attend
                attn_mask = ~attn_mask
            else:
                attn_mask = attn_mask.to(q.dtype)  # additive float mask ([L, L] or [B*H, L, L])
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, self.num_heads, Lq, Lk)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0, is_causal=is_causal and attn_mask is None
        )
        out = out.transpose(1, 2).reshape(B, Lq, E)
        attn = out
        out = self.out_proj(out)
        if "o" in self.adapters and not self.merged:
            out = out + self.adapters["o"](attn)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter's s * B A into the frozen weights (no inference overhead)."""
        if self.merged:
            return
        self._fold(+1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._fold(-1)
        self.merged = False

    def _fold(self, sign: int) -> None:
        E = self.embed_dim
        for i, t in enumerate("qkv"):
            if t in self.adapters:
                rows = self.in_proj_weight[i * E : (i + 1) * E]
                rows.add_(self.adapters[t].delta_weight().to(rows.dtype), alpha=sign)
        if "o" in self.adapters:
            self.out_proj.weight.add_(self.adapters["o"].delta_weight().to(self.out_proj.weight.dtype), alpha=sign)


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear whose output stacks k projections (timm's fused qkv: k = 3; EVA's separate
    q_proj: k = 1) with a low-rank branch on the chosen ones: the same adapter as on open_clip's
    packed in_proj, for timm's attention, which calls its projections as modules."""

    def __init__(self, linear: nn.Linear, make_adapter: AdapterFactory, slots: dict[str, int], k: int):
        super().__init__()
        self.linear, self.slots, self.k = linear, dict(slots), k
        self.width = linear.out_features // k
        self.adapters = nn.ModuleDict({t: make_adapter(linear.in_features, self.width, linear.weight) for t in slots})
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.merged:
            return out
        parts = [torch.zeros_like(out[..., : self.width])] * self.k
        for t, i in self.slots.items():
            parts[i] = self.adapters[t](x).to(out.dtype)
        return out + torch.cat(parts, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._fold(1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1)
            self.merged = False

    def _fold(self, sign: int) -> None:
        for t, i in self.slots.items():
            rows = self.linear.weight[i * self.width : (i + 1) * self.width]
            rows.add_(self.adapters[t].delta_weight().to(rows.dtype), alpha=sign)


class AdaptedAttentionPool(nn.Module):
    """OpenAI's ResNet attention pooling (open_clip `AttentionPool2d`) with its q, k, v (and output
    c_proj) projections as `AdaptedLinear`s. The original applies the weights itself through
    `F.multi_head_attention_forward`, where a module-level adapter would never be called; this
    forward calls the projections as modules and attends with SDPA. Only the first token (the spatial
    mean) is pooled, so only its query is computed; the output equals the original's."""

    def __init__(self, pool: nn.Module, make_adapter: AdapterFactory, targets: tuple[str, ...]):
        super().__init__()
        self.positional_embedding, self.num_heads = pool.positional_embedding, pool.num_heads
        for t, name in zip(TARGETS, ("q_proj", "k_proj", "v_proj", "c_proj")):
            linear = getattr(pool, name)
            setattr(self, name, AdaptedLinear(linear, make_adapter, {t: 0}, 1) if t in targets else linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)
        return self.c_proj(out)


def _adapt_timm(attn: nn.Module, make_adapter: AdapterFactory, targets: tuple[str, ...]) -> list[nn.Parameter]:
    if getattr(attn, "qkv", None) is not None:
        if getattr(attn, "q_bias", None) is not None:  # EVA's fused path applies the weight itself: an adapter would be skipped
            raise ValueError(f"{type(attn).__name__} applies its fused qkv weight directly; LoRA cannot be added as a module there.")
        attn.qkv = AdaptedLinear(attn.qkv, make_adapter, {t: i for i, t in enumerate("qkv") if t in targets}, 3)
        wrapped = [attn.qkv]
    else:
        wrapped = []
        for t in "qkv":
            if t in targets:
                setattr(attn, f"{t}_proj", AdaptedLinear(getattr(attn, f"{t}_proj"), make_adapter, {t: 0}, 1))
                wrapped.append(getattr(attn, f"{t}_proj"))
    if "o" in targets:
        attn.proj = AdaptedLinear(attn.proj, make_adapter, {"o": 0}, 1)
        wrapped.append(attn.proj)
    return [p for w in wrapped for p in w.adapters.parameters()]


def add_adapters(
    model: nn.Module,
    make_adapter: AdapterFactory,
    encoders: Iterable[str] = ("vision", "text"),
    targets: Iterable[str] = ("q", "k", "v"),
) -> list[nn.Parameter]:
    """IN PLACE: freeze `model`, put adapters in every attention block of the chosen encoders of an
    open_clip CLIP (or its timm image tower, or a ResNet's attention pooling), return the adapter parameters (the only trainable ones)."""
    model.requires_grad_(False)
    targets = tuple(targets)
    params: list[nn.Parameter] = []
    n_blocks = 0
    for encoder in encoders:
        blocks, kind = tower_blocks(model, encoder)
        for block in blocks:
            if kind == "timm":
                params.extend(_adapt_timm(block.attn, make_adapter, targets))
            elif kind == "attnpool":
                model.visual.attnpool = AdaptedAttentionPool(block, make_adapter, targets)
                params.extend(p for m in adapted_modules(model.visual.attnpool) for p in m.adapters.parameters())
            else:
                if not isinstance(block.attn, nn.MultiheadAttention):
                    raise TypeError(f"Expected nn.MultiheadAttention in {type(block).__name__}.attn, found {type(block.attn).__name__}.")
                block.attn = AdaptedAttention(block.attn, make_adapter, targets)
                params.extend(block.attn.adapters.parameters())
            n_blocks += 1
    if n_blocks == 0:
        raise ValueError("No attention blocks found to adapt.")
    return params


def adapted_copy(model: nn.Module, make_adapter: AdapterFactory, encoders=("vision", "text"), targets=("q", "k", "v")):
    """A deep copy of `model` with adapters (the original, shared across runs, is left untouched)."""
    model = copy.deepcopy(model)
    return model, add_adapters(model, make_adapter, encoders, targets)


def adapted_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (AdaptedAttention, AdaptedLinear))]


def merge_adapters(model: nn.Module) -> None:
    for m in adapted_modules(model):
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in adapted_modules(model):
        m.unmerge()


def lora_factory(r: int = 2, alpha: float = 1.0, dropout: float = 0.25) -> AdapterFactory:
    return lambda d_in, d_out, like: LoRAAdapter(d_in, d_out, r, alpha, dropout, like=like)


def block_lora_factory(
    r: int = 2, alpha: float = 1.0, dropout: float = 0.25, n: int = 8, chunk_norm: str = "none",
    dropout_before_sum: bool = True, a_init_fan_in: str = "block",
) -> AdapterFactory:
    return lambda d_in, d_out, like: BlockLoRAAdapter(
        d_in, d_out, r, alpha, dropout, n=n, chunk_norm=chunk_norm, dropout_before_sum=dropout_before_sum,
        a_init_fan_in=a_init_fan_in, like=like,
    )
