"""Pre-train the `tiny` CLIP on generated image-caption pairs, for the demo suite.

    python scripts/pretrain_tiny.py [--steps N] [--out PATH]

A random-weight `tiny` backbone leaves zero-shot at chance. This script trains the same model
(harness.backbones.build_tiny(), same seeded start) contrastively on freshly drawn pictures and
captions, and saves it as fp16 safetensors to harness/assets/tiny_demo.safetensors, which
resolve_weights() then loads for `-b tiny` (weights identity "tiny-demo:<sha256 prefix>").

What the demo needs is the shape of the real benchmark: zero-shot clearly above chance but far from
perfect, and image features that know more than the zero-shot text classifier, so that few-shot
methods beat it. Training on "a photo of a {class}." captions alone does the opposite: the image
features collapse onto the class text directions (a linear probe is no better than zero-shot) and an
easy dataset (colours) reaches 100%. So the pre-training is built like CLIP's own world, where some
concepts are known by other words than the benchmark's class names:

- Caption coverage (why zero-shot is imperfect by construction). Per dataset, a few classes
  (ALIASES: 4 of 8 shapes, 4 of 8 colours, 3 of 8 textures) never appear under their own name: their
  pictures are captioned with another word ("donut" for a ring, "turquoise" for cyan, "chevron" for
  zigzagged). The card's class name is then a token the text tower never trained on, and zero-shot
  gets those classes roughly at random while still getting the named ones mostly right.
- The image tower still learns to tell every class apart (why features separate the classes): the
  aliased pictures are trained against their alias captions exactly like the named ones, so their
  features form their own clusters. A few labelled shots recover what the text classifier misses.
- Richer captions: object pictures (a shape, filled with a named palette colour half of the time,
  on a grey or coloured background) are captioned by their shape, their colour or both, texture
  pictures by their texture. Several attributes keep the features from
  collapsing onto one class direction; the loss counts every caption a picture satisfies as a
  positive (a "red star" picture fits "a star." and "the colour red."), not as a negative.
- Noisy captions: half the captions start with 1-16 random vocabulary tokens (after the start token),
  as web alt-text does; the text tower learns that the attribute words carry the meaning, so a prompt
  with CoOp's random context vectors ("X X ... X {class}.") still starts near zero-shot.
- Fixed temperature 100 (CLIP's final value, and the logit scale the harness's methods use): with
  the learned temperature the tiny model stays near 15, its image-text cosines spread so widely that
  Tip-Adapter's cache and CLIP-LoRA's fixed scale of 100 could not work as they do on real CLIP.

The pictures come from the demo generators' own drawing code (harness/data/demo.py: draw_shape,
texture_mask, the palette) but are composed here, with their attributes known, and never are the demo
datasets' own: those are drawn by demo.generate() from default_rng(crc32(card name) +
GENERATOR_VERSION), i.e. a SeedSequence with an integer entropy and no spawn key; every stream here is
a SeedSequence with its own entropy (PRETRAIN_ENTROPY) *and* a non-empty spawn key.

Runs on one CPU thread in about three minutes and is deterministic: seeded, single-threaded, and the
file carries one metadata key, so re-running gives the same bytes on a given machine and torch version.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from harness.backbones import TINY_BUILDERS, TINY_WEIGHTS, build_architecture, demo_weights_path, encode_text, preprocess_of
from harness.cards import suite_cards
from harness.data.demo import COLOURS, SHAPES, SIZE, TEXTURES, draw_shape, texture_mask
from harness.data.images import eval_view, normalize

PRETRAIN_ENTROPY = 0x7E57_C11B_DE30  # arbitrary, > 32 bits; see the module docstring

# Classes whose own name never appears in a pre-training caption: their pictures are captioned with
# another word (an alias), so the image tower learns them while the text tower never sees the name.
ALIASES = {
    "shapes": {"star": "pentagram", "ring": "donut", "hexagon": "honeycomb", "diamond": "kite"},
    "colours": {"cyan": "turquoise", "purple": "violet", "orange": "amber", "pink": "rose"},
    "textures": {"zigzagged": "chevron", "speckled": "peppered", "blotchy": "camouflage"},
}

SHAPE_TEMPLATES = ["a photo of a {s}.", "a {s} shape.", "a drawing of a {s}.", "a {s}.", "a picture of a {s}."]
COLOUR_TEMPLATES = ["a photo of the colour {c}.", "something {c}.", "the colour {c}.", "a {c} object.", "a picture in {c}."]
BOTH_TEMPLATES = ["a photo of a {c} {s}.", "a {c} {s}.", "a {s} in {c}.", "a drawing of a {c} {s}."]
TEXTURE_TEMPLATES = ["{t} texture.", "a {t} pattern.", "a photo of a {t} texture.", "a {t} surface.", "a close-up of a {t} texture."]
TEXTURE_COLOUR_TEMPLATES = ["a {c} {t} pattern.", "{t} texture in {c}.", "a {t} surface in {c}."]


@dataclass
class Config:
    steps: int = 2000
    batch_size: int = 96
    lr: float = 1e-3
    seed: int = 0
    n_objects: int = 2400  # pictures drawn once, then sampled with augmentation
    n_textures: int = 1200
    image_size: int = 32  # the tiny backbone's input size; eval_view takes the 64 px drawings down to it
    aliases: dict = field(default_factory=lambda: ALIASES)
    p_both: float = 0.3  # share of (colour-filled) object captions naming both shape and colour
    p_tex_colour: float = 0.0  # share of texture captions naming the colour too (off in the shipped weights)
    p_filler: float = 0.5  # share of captions prefixed with 1-16 random vocabulary tokens
    logit_scale: float = 100.0  # fixed temperature (0: learned from CLIP's init, which stays near 15 here)
    noise: float = 8.0  # pixel noise, as the demo generators add


def word(gen: str, cls: str, cfg: Config) -> str:
    return cfg.aliases.get(gen, {}).get(cls, cls)


def pick_colour(rng: np.random.Generator) -> tuple[str | None, tuple[int, ...]]:
    """A named palette colour (jittered) half of the time, else an unnamed random one."""
    if rng.random() < 0.5:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        return colour, tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
    return None, tuple(int(c) for c in rng.integers(0, 256, size=3))


def draw_object(rng: np.random.Generator, cfg: Config):
    """A shape on a background; its fill is a named palette colour half of the time."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour, fill = pick_colour(rng)
    if rng.random() < 0.5:
        gray = int(rng.integers(70, 190))
        bg = (gray, gray, gray)
    else:
        bg = tuple(int(c) for c in rng.integers(60, 200, size=3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    draw_shape(ImageDraw.Draw(img), shape, rng, fill)
    return img, {"shape": shape, "colour": colour}


def draw_texture(rng: np.random.Generator, cfg: Config):
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    colour, fg = pick_colour(rng)
    bg = tuple(int(c) for c in rng.integers(60, 200, size=3))
    mask = texture_mask(texture, rng)
    arr = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
    return Image.fromarray(arr.astype(np.uint8)), {"texture": texture, "colour": colour}


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    if sigma <= 0:
        return img
    noise = rng.normal(0, sigma, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def draw_pool(cfg: Config):
    """Fresh pictures with their attributes, from the pre-training seed space (never the demo's)."""
    pixels, attrs = [], []
    for kind, n, fn in (("object", cfg.n_objects, draw_object), ("texture", cfg.n_textures, draw_texture)):
        rng = np.random.default_rng(np.random.SeedSequence(PRETRAIN_ENTROPY, spawn_key=(0 if kind == "object" else 1,)))
        for _ in range(n):
            img, a = fn(rng, cfg)
            pixels.append(eval_view(add_noise(img, rng, cfg.noise), cfg.image_size))
            attrs.append(a)
    return torch.stack(pixels), attrs


def caption(a: dict, rng: np.random.Generator, cfg: Config, own: dict[str, str]) -> tuple[str, dict]:
    """One caption for a picture with attributes `a`, and the attributes the caption states."""
    colour = a["colour"] and word("colours", a["colour"], cfg)
    if "shape" in a:
        shape = word("shapes", a["shape"], cfg)
        options = [("s", t) for t in [own["shapes"].replace("{}", "{s}"), *SHAPE_TEMPLATES]]
        if colour:
            options += [("c", t) for t in [own["colours"].replace("{}", "{c}"), *COLOUR_TEMPLATES]]
            if rng.random() < cfg.p_both:
                options = [("sc", t) for t in BOTH_TEMPLATES]
        kind, template = options[int(rng.integers(len(options)))]
        stated = {k: v for k, v in (("shape", a["shape"] if "s" in kind else None), ("colour", a["colour"] if "c" in kind else None)) if v}
        return template.format(s=shape, c=colour), stated
    texture = word("textures", a["texture"], cfg)
    if colour and rng.random() < cfg.p_tex_colour:
        template = TEXTURE_COLOUR_TEMPLATES[int(rng.integers(len(TEXTURE_COLOUR_TEMPLATES)))]
        return template.format(t=texture, c=colour), {"texture": a["texture"], "colour": a["colour"]}
    templates = [own["textures"].replace("{}", "{t}"), *TEXTURE_TEMPLATES]
    return templates[int(rng.integers(len(templates)))].format(t=texture), {"texture": a["texture"]}


def add_filler(tokens: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Prefix a share `p` of the captions with 1-16 random vocabulary tokens (after SOT), as noisy
    web alt-text: the text tower learns that the attribute words carry the meaning."""
    if p <= 0:
        return tokens
    out = tokens.clone()
    pick = (torch.rand(len(tokens), generator=gen) < p).tolist()
    counts = torch.randint(1, 17, (len(tokens),), generator=gen).tolist()
    filler = torch.randint(0, 49406, (len(tokens), 16), generator=gen)
    for i in range(len(tokens)):
        if pick[i]:
            k = counts[i]
            out[i] = torch.cat([tokens[i, :1], filler[i, :k], tokens[i, 1:-k]])
    return out


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on uint8 [B, 3, H, W]: random horizontal flip and a shift of up to H/16 px (2 at 32 px)."""
    b, _, h, w = pixels.shape
    flip = torch.rand(b, generator=gen) < 0.5
    pixels = torch.where(flip.view(b, 1, 1, 1), pixels.flip(-1), pixels)
    pad = max(2, h // 16)
    padded = F.pad(pixels.float(), (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]).to(torch.uint8)


def contrastive_loss(image_features, text_features, logit_scale, positives) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: positives[i, j] says picture i fits caption j."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    p = positives.float()
    return 0.5 * (F.cross_entropy(logits, p / p.sum(1, keepdim=True)) + F.cross_entropy(logits.T, (p / p.sum(0, keepdim=True)).T))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings or the logit scale (as in CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def card_templates() -> dict[str, str]:
    return {card.generator: card.template for card in suite_cards("demo")}


def pretrain(cfg: Config, log=print, backbone: str = "tiny"):
    """The contrastive pre-training of a test backbone (tiny, tiny_rn, tiny_siglip: the same pictures,
    captions and loss); returns the model in eval mode (fp32)."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    own = card_templates()
    pixels, attrs = draw_pool(cfg)
    log(f"drew {len(pixels)} pictures ({time.perf_counter() - start:.1f} s)")
    model = build_architecture(backbone).train()
    pre = preprocess_of(backbone, 32)
    text_tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower apart
    text_tower.token_embedding.requires_grad_(False)
    if cfg.logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.logit_scale))
        model.logit_scale.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, cfg.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    crng = np.random.default_rng(np.random.SeedSequence(PRETRAIN_ENTROPY, spawn_key=(2,)))
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen).tolist()
        texts, stated = zip(*(caption(attrs[i], crng, cfg, own) for i in idx))
        positives = torch.tensor([[all(attrs[i].get(k) == v for k, v in s.items()) for s in stated] for i in idx])
        image = model.encode_image(normalize(augment(pixels[idx], gen), "cpu", pre.mean, pre.std))
        text = encode_text(model, add_filler(open_clip.tokenize(list(texts)), cfg.p_filler, gen))
        loss = contrastive_loss(image, text, model.logit_scale, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == cfg.steps:
            log(f"step {step:4d}/{cfg.steps}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}  ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Config.steps, help=f"optimisation steps (default {Config.steps})")
    parser.add_argument("--backbone", choices=sorted(TINY_BUILDERS), default="tiny", help="which test backbone (default tiny)")
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default {TINY_WEIGHTS} for tiny, <name>_demo.safetensors beside it)")
    args = parser.parse_args()
    args.out = args.out or demo_weights_path(args.backbone)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = pretrain(Config(steps=args.steps), backbone=args.backbone)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"source": f"scripts/pretrain_tiny.py --backbone {args.backbone} --steps {args.steps}"})
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
