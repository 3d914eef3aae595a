"""CLIP backbones through open_clip: OpenAI's ViT-B/16, ViT-B/32, ViT-L/14, RN50 and RN101
(QuickGELU), any open_clip model with a pretrained tag (`ViT-B-16-SigLIP2:webli`, `EVA02-B-16:...`),
and the small `tiny` (ViT), `tiny_rn` (ResNet), `tiny_siglip` (timm ViT with attention pooling,
non-causal last-token text tower, logit bias, squash resize and 0.5 mean / std) and `tiny_eva` (timm
EVA with rotary positions, CLIP's text tower apart; random weights only) test backbones.

Real weights come from a local file (`--weights`: an OpenAI TorchScript `.pt` or an open_clip
checkpoint) or from the open_clip / Hugging Face caches. Nothing is ever downloaded: with neither,
loading fails at once with a message saying how to provide the file. `tiny` is a small CLIP built
from a config with seeded random weights (or the demo weights the repo pre-trains itself, if
present), for tests and the demo suite.

Each backbone brings its own preprocessing (image size, mean and std, resize mode) and tokenizer from
open_clip's configs, and declares what its towers offer (`CAPABILITIES`): a method that needs
something a backbone lacks is refused before any run, with the reason.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from harness.data.images import CLIP_MEAN, CLIP_STD
from harness.errors import HarnessError
from harness.paths import atomic_write_text, cache_dir

OPENAI_ARCH = {"ViT-B-16": "ViT-B-16-quickgelu", "ViT-B-32": "ViT-B-32-quickgelu", "ViT-L-14": "ViT-L-14-quickgelu",
               "RN50": "RN50-quickgelu", "RN101": "RN101-quickgelu"}
TINY = ("tiny", "tiny_rn", "tiny_siglip", "tiny_eva")
BACKBONES = (*OPENAI_ARCH, *TINY)  # by name; any open_clip `MODEL:TAG` besides
TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny_demo.safetensors"

# What a method may need from a backbone's towers (Method.requires), in words for the refusal.
CAPABILITIES = {
    "text_tokens": "a text tower that takes token embeddings (open_clip's own, causal or not)",
    "clip_text": "CLIP's own text tower (token embeddings in, causal mask, EOT pooling) to put learned tokens into",
    "vit_tokens": "a ViT image tower whose token sequence can take extra tokens (open_clip's, or timm's ViT or EVA)",
    "clip_vit": "CLIP's own ViT image tower (class token, ln_pre, ln_post, projection matrix) to put learned tokens into",
    "attention_blocks": "attention with q, k, v projections in both towers (open_clip's or timm's blocks, or a ResNet's attention pooling)",
    "visual_proj": "a linear visual projection after the image tower's pooled token (CLIP's matrix or a timm tower's Linear)",
    "block_layernorms": "LayerNorms in every block of both towers (open_clip's or timm's)",
}


@dataclass(frozen=True)
class Preprocess:
    """The image tower's evaluation transform, from open_clip's pretrained config: resize (the shorter
    side, then a centre crop, as CLIP; or `squash` to the square, as SigLIP), then mean / std."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "shortest"


@dataclass
class Backbone:
    name: str
    model: CLIP  # frozen, eval mode, fp32 parameters
    image_size: int
    weights: str  # identity of the weights, part of every run's config hash
    device: torch.device
    preprocess: Preprocess | None = None  # None: CLIP's at image_size
    tokenizer: object = None  # open_clip's tokenizer for this model; None: CLIP's BPE, 77 tokens

    def __post_init__(self):
        self.preprocess = self.preprocess or Preprocess(self.image_size)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts) if self.tokenizer is not None else open_clip.tokenize(texts)
        return tokens.to(self.device)

    @property
    def prompt_start(self) -> int:
        """Where a text's first word piece sits in its tokens: 1 after CLIP's start-of-text token, 0 for a
        tokenizer that puts nothing before the text (SigLIP's). Learned context goes there."""
        first = self.tokenize(["cat", "dog"])[:, 0]
        return int(first[0] == first[1])

    @property
    def embed_dim(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return projection.shape[1]
        with torch.no_grad():  # a custom text tower (SigLIP, EVA-02): measure it
            return int(self.model.encode_text(self.tokenize(["a"])).shape[-1])


def build_tiny() -> CLIP:
    """A small CLIP (ViT, 2 vision + 2 text layers, width 64) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
            quick_gelu=True,
        )


def build_tiny_rn() -> CLIP:
    """A small ResNet CLIP (OpenAI's ModifiedResNet with attention pooling, one bottleneck per stage,
    width 8; the tiny text tower) with seeded random weights: the ResNet path at test size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, head_width=32, image_size=32),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
            quick_gelu=True,
        )


def register_tiny_timm_towers() -> None:
    """The test backbones' timm image towers, registered with timm's factory as open_clip expects:
    `harness_tiny_vit` (a VisionTransformer) and `harness_tiny_eva` (EVA-02's structure: separate q/k/v,
    SwiGLU MLP with its scale norm, sub-LN in attention, rotary positions)."""
    from timm.models import is_model, register_model
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    def own(kwargs):  # open_clip passes timm's factory arguments the bare classes do not take
        return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}

    if not is_model("harness_tiny_vit"):
        @register_model
        def harness_tiny_vit(pretrained=False, **kwargs):  # noqa: ARG001 - timm's factory signature
            return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, **own(kwargs))

        @register_model
        def harness_tiny_eva(pretrained=False, **kwargs):  # noqa: ARG001
            return Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=4 * 2 / 3,
                       swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), **own(kwargs))


def _tiny_timm_clip(vision_cfg: CLIPVisionCfg, text_cfg: CLIPTextCfg, **extra) -> CLIP:
    """open_clip's CustomTextCLIP around one of the tiny timm towers, with seeded random weights."""
    from open_clip.model import CustomTextCLIP

    register_tiny_timm_towers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CustomTextCLIP(embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg, **extra)


def build_tiny_siglip() -> CLIP:
    """A small SigLIP-style CLIP with seeded random weights: a timm ViT image tower with attention
    (MAP) pooling, a non-causal text tower pooled at its last token, a learned logit bias (SigLIP 2's
    structure at test size; CLIP's BPE tokenizer stands in for SigLIP's, which is not available offline)."""
    return _tiny_timm_clip(
        CLIPVisionCfg(timm_model_name="harness_tiny_vit", timm_model_pretrained=False, timm_pool="map", timm_proj="none", image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, no_causal_mask=True, pool_type="last", proj_bias=True),
        init_logit_bias=-10.0,
    )


def build_tiny_eva() -> CLIP:
    """A small EVA-02-style CLIP with seeded random weights (no demo weights: for tests): a timm EVA image
    tower (rotary positions, class token, the trunk's Linear head as projection) and CLIP's causal text
    tower as open_clip's separate TextTransformer, as EVA02-B-16 is built."""
    return _tiny_timm_clip(
        CLIPVisionCfg(timm_model_name="harness_tiny_eva", timm_model_pretrained=False, timm_pool="token", timm_proj=None, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


TINY_CONFIGS = {  # the open_clip-style config of each test backbone, for `capabilities`
    "tiny": {"vision_cfg": {"layers": 2, "image_size": 32}, "text_cfg": {}},
    "tiny_rn": {"vision_cfg": {"layers": [1, 1, 1, 1], "image_size": 32}, "text_cfg": {}},
    "tiny_siglip": {"custom_text": True, "vision_cfg": {"timm_model_name": "harness_tiny_vit", "timm_proj": "none", "image_size": 32},
                    "text_cfg": {"no_causal_mask": True, "pool_type": "last"}},
    "tiny_eva": {"custom_text": True, "vision_cfg": {"timm_model_name": "harness_tiny_eva", "timm_proj": None, "image_size": 32},
                 "text_cfg": {}},
}
TINY_BUILDERS = {"tiny": build_tiny, "tiny_rn": build_tiny_rn, "tiny_siglip": build_tiny_siglip, "tiny_eva": build_tiny_eva}
TINY_PREPROCESS = {"tiny_siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash")}


def split_name(name: str) -> tuple[str, str | None]:
    """'ViT-B-16-SigLIP2:webli' -> (open_clip architecture, pretrained tag); a named backbone -> (its
    architecture, None)."""
    if name in OPENAI_ARCH:
        return OPENAI_ARCH[name], None
    arch, sep, tag = name.partition(":")
    if name in TINY or not sep:
        if name not in TINY:
            close = difflib.get_close_matches(name, BACKBONES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise HarnessError(f"Unknown backbone '{name}'.{hint} Choose one of: {', '.join(BACKBONES)}, or an open_clip "
                               "MODEL:TAG (`harness list backbones`).")
        return name, None
    known = {(a, t) for a, t in open_clip.list_pretrained()}
    if (arch, tag) not in known:
        tags = sorted(t for a, t in known if a == arch)
        hint = f" Tags of {arch}: {', '.join(tags)}." if tags else f" open_clip has no model '{arch}' (`open_clip.list_pretrained()`)."
        raise HarnessError(f"Unknown backbone '{name}': open_clip has no pretrained {arch}:{tag}.{hint}")
    return arch, tag


def architecture_config(name: str) -> dict:
    """open_clip's model config of a backbone (tiny: the equivalent dict)."""
    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name]
    return open_clip.get_model_config(split_name(name)[0]) or {}


def capabilities(name: str) -> dict[str, str]:
    """Which CAPABILITIES a backbone lacks, each with why; read from its config (no model built)."""
    cfg = architecture_config(name)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    resnet = isinstance(vision.get("layers"), (list, tuple))
    timm = bool(vision.get("timm_model_name"))
    missing = {}
    if text.get("hf_model_name"):
        missing["text_tokens"] = f"its text tower is the Hugging Face model {text['hf_model_name']}"
    elif text.get("embed_cls") or text.get("use_pad_mask"):
        missing["text_tokens"] = "its text tower appends a class token or masks padding, which the prompt code does not reproduce"
    if "text_tokens" in missing:
        missing["clip_text"] = missing["text_tokens"]
    elif text.get("no_causal_mask") or text.get("pool_type", "argmax") != "argmax":  # text_tokens: yes
        missing["clip_text"] = "its text tower is not causal and EOT-pooled (SigLIP-style)"
    elif cfg.get("custom_text"):
        missing["clip_text"] = "its text tower is open_clip's separate TextTransformer (CustomTextCLIP), not CLIP's own"
    if resnet:
        why = "its image tower is a ResNet with attention pooling"
        missing.update({"vit_tokens": why + " (no token sequence)", "clip_vit": why, "visual_proj": why,
                        "block_layernorms": why + " (batch norms)"})
    elif timm:
        why = f"its image tower is timm's {vision['timm_model_name']}"
        missing["clip_vit"] = why
        if vision.get("timm_proj") not in (None, "", "linear") or vision.get("timm_pool") in ("abs_attn", "rot_attn"):
            missing["visual_proj"] = why + f" with no linear projection after its pooling (timm_proj {vision.get('timm_proj')})"
        if not _timm_token_tower(vision["timm_model_name"]):
            missing["vit_tokens"] = why + " (neither a timm VisionTransformer nor an EVA)"
    if "text_tokens" in missing:
        missing.setdefault("attention_blocks", missing["text_tokens"])
        missing.setdefault("block_layernorms", missing["text_tokens"])
    return missing


def _timm_token_tower(timm_name: str) -> bool:
    """timm's VisionTransformer and EVA (EVA-02, PE-Core) trunks, whose token sequence
    methods/deep_prompts.py extends (the test backbones' `harness_tiny_vit` and `harness_tiny_eva` are those)."""
    from timm.models import is_model_in_modules

    return timm_name in ("harness_tiny_vit", "harness_tiny_eva") or is_model_in_modules(timm_name, ["vision_transformer", "eva"])


def refusal(method_cls, name: str) -> str | None:
    """Why `method_cls` cannot run on backbone `name` (one line), or None."""
    missing = capabilities(name)
    for need in method_cls.requires:
        if need in missing:
            return f"{method_cls.name} cannot run on {name}: it needs {CAPABILITIES[need]}, and {missing[need]}."
    return None


def build_architecture(name: str) -> CLIP:
    """The backbone's architecture with random weights (tests, benchmarks, and before loading)."""
    if name in TINY_BUILDERS:
        return TINY_BUILDERS[name]()
    arch, tag = split_name(name)
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))  # e.g. DFN's, MetaCLIP's
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip warns "no pretrained weights"
    try:
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    except (ImportError, RuntimeError) as exc:  # timm or transformers towers need their packages
        raise HarnessError(f"Backbone {name} cannot be built here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
    finally:
        logging.getLogger().disabled = was


def file_identity(path: Path) -> str:
    """sha256 prefix of a weights file, remembered per (path, size, mtime) so it is hashed once."""
    path = path.resolve()
    stat = path.stat()
    memo_path = cache_dir() / "weights_sha256.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        memo[key] = digest.hexdigest()[:16]
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return memo[key]


def _cached_file(arch: str, tag: str) -> Path | None:
    """A pretrained checkpoint in open_clip's URL cache or the Hugging Face cache, if already there."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    url_file = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
    if cfg.get("url") and url_file.is_file():
        return url_file
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        for candidate in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if candidate:
                found = try_to_load_from_cache(repo, candidate)
                if isinstance(found, str):
                    return Path(found)
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """An OpenAI TorchScript archive or an open_clip checkpoint (.pt/.bin/.safetensors)."""
    if not path.is_file():
        raise HarnessError(f"Weights file {path} does not exist. Pass --weights PATH to an existing checkpoint.")
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            return state
        return load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        text = str(exc)
        reason = (
            "it holds Python objects, not just tensors, and is not loaded for safety"
            if "weights_only" in text else (text.splitlines() or [type(exc).__name__])[0][:200]
        )
        raise HarnessError(
            f"Weights file {path} is corrupt or not a CLIP checkpoint ({reason}). Expected OpenAI's TorchScript .pt "
            "or an open_clip checkpoint (.pt/.bin/.safetensors)."
        ) from None


def resolve_weights(name: str, weights: str | None = None) -> tuple[Path | None, str]:
    """Which file to load and its identity (source tag + sha256 prefix), without building the model
    (fails fast when absent)."""
    arch, tag = split_name(name)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise HarnessError(f"Weights file {path} does not exist. Pass --weights PATH to an existing checkpoint.")
        return path, f"file:{file_identity(path)}"
    if name in TINY:
        path = demo_weights_path(name)
        if path.is_file():
            return path, f"{name}-demo:{file_identity(path)}"
        return None, f"{name}-random:seed0"
    tag = tag or "openai"
    path = _cached_file(arch, tag)
    if path is None:
        what = f"OpenAI's {'/'.join(name.rsplit('-', 1)) if name.startswith('ViT') else name} checkpoint (e.g. {name}.pt from the CLIP release)" \
            if tag == "openai" else f"the {arch} {tag} open_clip checkpoint"
        raise HarnessError(
            f"No weights for backbone {name}: they are not in the open_clip or Hugging Face cache and this tool "
            f"never downloads. Either pass --weights PATH to {what}, or on a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"` "
            "and copy ~/.cache/huggingface (and ~/.cache/clip) to this machine."
        )
    return path, f"{tag}:{file_identity(path)}"


def demo_weights_path(name: str) -> Path:
    """Where the weights scripts/pretrain_tiny.py trains for a test backbone live (shipped in assets/)."""
    return TINY_WEIGHTS if name == "tiny" else TINY_WEIGHTS.with_name(f"{name}_demo.safetensors")


def preprocess_of(name: str, image_size: int) -> Preprocess:
    """The evaluation transform open_clip's pretrained config gives the backbone (CLIP's by default)."""
    if name in TINY_PREPROCESS:
        return Preprocess(image_size, *TINY_PREPROCESS[name])
    arch, tag = split_name(name)
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    return Preprocess(image_size, tuple(cfg.get("mean") or CLIP_MEAN), tuple(cfg.get("std") or CLIP_STD), cfg.get("resize_mode") or "shortest")


def tokenizer_of(name: str):
    """open_clip's tokenizer for a MODEL:TAG backbone (None: CLIP's BPE with 77 tokens)."""
    arch, tag = split_name(name)
    if tag is None:
        return None
    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:  # noqa: BLE001 - a Hugging Face tokenizer needs transformers and its files, offline
        raise HarnessError(f"The tokenizer of {name} cannot be loaded here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                           "it needs the `transformers` package and the tokenizer files in the Hugging Face cache.") from None


def load_backbone(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    path, identity = resolve_weights(name, weights)
    model = build_architecture(name)
    if path is not None:
        state = read_state_dict(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])[:300]
            raise HarnessError(f"Weights in {path} do not fit backbone '{name}' ({detail}). Pick the matching -b/--backbone.") from None
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return Backbone(name, model, size, identity, torch.device(device), preprocess_of(name, size), tokenizer_of(name))


def _projection_slot(visual) -> tuple[torch.nn.Module, str] | None:
    """(owner, attribute) of the image tower's final projection: CLIP's `visual.proj` matrix, or a timm
    tower's Linear (the trunk's own head, which open_clip sizes to the embedding, or its `head.proj`)."""
    if isinstance(getattr(visual, "proj", None), torch.Tensor):
        return visual, "proj"
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if head is not None and isinstance(getattr(head, "proj", None), torch.nn.Linear):
        return head, "proj"
    if trunk is not None and isinstance(getattr(trunk, "head", None), torch.nn.Linear):
        return trunk, "head"
    return None


def visual_projection(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image tower's final projection as (W [width, D], bias [D] or None), frozen copies."""
    slot = _projection_slot(model.visual)
    if slot is None:
        raise HarnessError("This backbone's image tower has no visual projection (a matrix or Linear after pooling) to adapt.")
    proj = getattr(*slot)
    if isinstance(proj, torch.Tensor):
        return proj.detach().float().clone(), None
    bias = proj.bias.detach().float().clone() if proj.bias is not None else None
    return proj.weight.detach().float().T.clone(), bias


@contextmanager
def without_visual_projection(model: CLIP):
    """`model.encode_image` returns the image tower's pooled token before its final projection (ln_post
    of the class token on a ViT: 768-d on ViT-B/16; a timm tower's pooled, normed token) while
    inside, for methods that learn that projection (ProLIP)."""
    slot = _projection_slot(model.visual)
    if slot is None:
        raise HarnessError("This backbone's image tower has no visual projection (a matrix or Linear after pooling) to adapt.")
    owner, name = slot
    proj = getattr(owner, name)
    setattr(owner, name, None if isinstance(proj, torch.Tensor) else torch.nn.Identity())
    try:
        yield model
    finally:
        setattr(owner, name, proj)


def text_tower(model):
    """The module that holds the text transformer's parts: a CLIP itself, or a CustomTextCLIP's
    `text` (EVA-02's, SigLIP's)."""
    return model if isinstance(model, CLIP) else model.text


def tower_blocks(model, encoder: str) -> tuple[list, str]:
    """A tower's transformer blocks and whose they are: "open_clip" (ln_1, attn as nn.MultiheadAttention,
    ln_2, mlp.c_fc / c_proj: CLIP's towers and every open_clip text tower) or "timm" (norm1, attn with
    qkv or q/k/v projections, norm2, mlp: a timm image tower) or "attnpool" (a ResNet image tower's
    only attention: its final `AttentionPool2d`, q/k/v/c_proj Linears)."""
    if encoder not in ("vision", "text"):
        raise ValueError(f"Unknown encoder '{encoder}'; choose vision and/or text.")
    if encoder == "text":
        return list(text_tower(model).transformer.resblocks), "open_clip"
    if hasattr(model.visual, "transformer"):
        return list(model.visual.transformer.resblocks), "open_clip"
    if hasattr(model.visual, "attnpool"):
        return [model.visual.attnpool], "attnpool"
    trunk = getattr(model.visual, "trunk", None)
    return (list(trunk.blocks), "timm") if hasattr(trunk, "blocks") else ([], "none")


def text_is_causal(model) -> bool:
    """Causal text towers (CLIP's) let prompts stop at their EOT token; the others see every position."""
    return text_tower(model).attn_mask is not None


def encode_token_embeddings(model: CLIP, x: torch.Tensor, eot_index: torch.Tensor, deep: list[torch.Tensor] = (), start: int = 1) -> torch.Tensor:
    """The text tower from token embeddings [B, L, W] on: positions, transformer (causal or not),
    ln_final, pooling (EOT token, or the last / first position), projection. With a causal mask L may
    stop at the longest EOT: the tokens up to EOT never see what follows them, so truncation leaves
    the features unchanged; a non-causal tower is given the whole context. Deep prompts (MaPLe,
    PromptSRC): deep[i] [n, W] replaces the n positions from `start` (Backbone.prompt_start) before block i + 1.
    """
    tower = text_tower(model)
    length = x.shape[1]
    x = x + tower.positional_embedding[:length].to(x.dtype)
    mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
    if not tower.transformer.batch_first:
        raise ValueError("prompt learners need a batch-first open_clip transformer (open_clip >= 2.23)")
    for i, block in enumerate(tower.transformer.resblocks):
        if 1 <= i <= len(deep):
            p = deep[i - 1].to(x.dtype)
            x = torch.cat([x[:, :start], p.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, start + p.shape[0] :]], dim=1)
        x = block(x, attn_mask=mask)
    x = tower.ln_final(x)
    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    x = x[torch.arange(x.shape[0], device=x.device), eot_index] if pool == "argmax" else x[:, -1] if pool == "last" else x[:, 0]
    projection = tower.text_projection
    if isinstance(projection, torch.nn.Module):
        return projection(x)
    return x if projection is None else x @ projection


def encode_text(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features, running the transformer on the prompt tokens only (other text
    towers: the model's own encode_text)."""
    if not isinstance(model, CLIP) or getattr(model, "text_pool_type", "argmax") != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens)
    eot_index = tokens.argmax(dim=-1)
    tokens = tokens[:, : int(eot_index.max()) + 1]
    return encode_token_embeddings(model, model.token_embedding(tokens), eot_index)
