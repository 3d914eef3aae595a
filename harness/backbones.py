"""CLIP backbones through open_clip: OpenAI ViT-B/16, ViT-B/32, ViT-L/14 (QuickGELU), and `tiny`.

Real weights come from a local file (`--weights`: an OpenAI TorchScript `.pt` or an open_clip
checkpoint) or from the open_clip / Hugging Face caches. Nothing is ever downloaded: with neither,
loading fails at once with a message saying how to provide the file. `tiny` is a small CLIP built
from a config with seeded random weights (or the demo weights the repo pre-trains itself, if
present), for tests and the demo suite.
"""

from __future__ import annotations

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

from harness.errors import HarnessError
from harness.paths import atomic_write_text, cache_dir

OPENAI_ARCH = {"ViT-B-16": "ViT-B-16-quickgelu", "ViT-B-32": "ViT-B-32-quickgelu", "ViT-L-14": "ViT-L-14-quickgelu"}
BACKBONES = (*OPENAI_ARCH, "tiny")
TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny_demo.safetensors"


@dataclass
class Backbone:
    name: str
    model: CLIP  # frozen, eval mode, fp32 parameters
    image_size: int
    weights: str  # identity of the weights, part of every run's config hash
    device: torch.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return open_clip.tokenize(texts).to(self.device)

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]


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


def build_architecture(name: str) -> CLIP:
    """The backbone's architecture with random weights (tests, benchmarks, and before loading)."""
    if name == "tiny":
        return build_tiny()
    if name not in OPENAI_ARCH:
        raise HarnessError(f"Unknown backbone '{name}'. Choose one of: {', '.join(BACKBONES)}.")
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip warns "no pretrained weights"
    try:
        return open_clip.create_model(OPENAI_ARCH[name], pretrained=None)
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


def _cached_openai_file(name: str) -> Path | None:
    """The OpenAI weights in open_clip's URL cache or the Hugging Face cache, if already there."""
    cfg = open_clip.get_pretrained_cfg(OPENAI_ARCH[name], "openai")
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
    """Which file to load and its identity, without building the model (fails fast when absent)."""
    if name not in BACKBONES:
        raise HarnessError(f"Unknown backbone '{name}'. Choose one of: {', '.join(BACKBONES)}.")
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise HarnessError(f"Weights file {path} does not exist. Pass --weights PATH to an existing checkpoint.")
        return path, f"file:{file_identity(path)}"
    if name == "tiny":
        if TINY_WEIGHTS.is_file():
            return TINY_WEIGHTS, f"tiny-demo:{file_identity(TINY_WEIGHTS)}"
        return None, "tiny-random:seed0"
    path = _cached_openai_file(name)
    if path is None:
        raise HarnessError(
            f"No weights for backbone {name}: they are not in the open_clip or Hugging Face cache and this tool "
            f"never downloads. Either pass --weights PATH to OpenAI's {'/'.join(name.rsplit('-', 1))} checkpoint "
            f"(e.g. {name}.pt from the CLIP release), or on a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model('{OPENAI_ARCH[name]}', pretrained='openai')\"` "
            "and copy ~/.cache/huggingface to this machine."
        )
    return path, f"openai:{file_identity(path)}"


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
    return Backbone(name, model, size[0] if isinstance(size, tuple) else size, identity, torch.device(device))


@contextmanager
def without_visual_projection(model: CLIP):
    """`model.encode_image` returns the image tower's pooled token before CLIP's visual projection
    (ln_post of the class token on a ViT: 768-d on ViT-B/16) while inside, for methods that learn
    that projection (ProLIP)."""
    proj = getattr(model.visual, "proj", None)
    if proj is None:
        raise HarnessError("This backbone's image tower has no visual projection matrix (`visual.proj`) to adapt.")
    model.visual.proj = None
    try:
        yield model
    finally:
        model.visual.proj = proj


def encode_token_embeddings(model: CLIP, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower from token embeddings [B, L, W] on: positions, causal transformer, ln_final,
    projection of the EOT token. L may be shorter than the 77-token context: with the causal mask the
    tokens up to EOT never see what follows them, so truncation leaves the features unchanged.
    """
    length = x.shape[1]
    x = x + model.positional_embedding[:length].to(x.dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    return x @ model.text_projection


def encode_text(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features, running the transformer on the prompt tokens only."""
    eot_index = tokens.argmax(dim=-1)
    tokens = tokens[:, : int(eot_index.max()) + 1]
    return encode_token_embeddings(model, model.token_embedding(tokens), eot_index)
