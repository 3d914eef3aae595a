"""Pre-train the `tiny` CLIP on generated image-caption pairs, for the demo suite.

    python scripts/pretrain_tiny.py [--steps N] [--out PATH]

A random-weight `tiny` backbone leaves zero-shot at chance. This script trains the same model
(harness.backbones.build_tiny(), same seeded start) contrastively on freshly drawn pictures from the
demo generators (harness/data/demo.py: shapes, colours, textures) paired with captions written from
several templates per class, the dataset cards' own templates among them. The result is saved as
fp16 safetensors to harness/assets/tiny_demo.safetensors, which resolve_weights() then loads for
`-b tiny` (weights identity "tiny-demo:<sha256 prefix>").

The training pictures are never the demo datasets' own: those are drawn by demo.generate() from
default_rng(crc32(card name) + GENERATOR_VERSION), i.e. a SeedSequence with an integer entropy and
no spawn key. Here every (generator, class) stream is a SeedSequence with its own entropy
(PRETRAIN_ENTROPY) *and* a non-empty spawn key, so it is a different stream from any of those.

The training run is deliberately short: zero-shot should land clearly above chance but well
below perfect, so that few-shot methods still have room to beat it, as on the real benchmark.
Runs on one CPU thread in a few minutes and is deterministic for a given machine and torch version.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from harness.backbones import TINY_WEIGHTS, build_tiny, encode_text
from harness.cards import suite_cards
from harness.data.demo import CLASSNAMES, draw_image
from harness.data.images import eval_view, normalize

PRETRAIN_ENTROPY = 0x7E57_C11B_DE30  # arbitrary, > 32 bits; see the module docstring
IMAGE_SIZE = 32  # the tiny backbone's input size; eval_view takes the 64 px drawings down to it

# Captions per generator. The card's own zero-shot template is added to each list at start-up.
TEMPLATES = {
    "shapes": [
        "a photo of a {}.",
        "a {} shape.",
        "a drawing of a {}.",
        "a {}.",
        "a coloured {} on a plain background.",
        "a picture of a {}.",
    ],
    "colours": [
        "a photo of the colour {}.",
        "a {} shape.",
        "something {}.",
        "the colour {}.",
        "a {} object on a grey background.",
        "a picture in {}.",
    ],
    "textures": [
        "{} texture.",
        "a {} pattern.",
        "a photo of a {} texture.",
        "a {} surface.",
        "{}.",
        "a close-up of a {} texture.",
    ],
}


def card_templates() -> dict[str, str]:
    """Each demo generator's zero-shot template, from its dataset card."""
    return {card.generator: card.template for card in suite_cards("demo")}


def draw_pool(per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Fresh 32 px uint8 pictures of every (generator, class), drawn from the pre-training seed space.

    Returns pixels [N, 3, 32, 32], the index of each picture's (generator, class) pair, and the pairs.
    """
    pairs = [(gen, cls) for gen in sorted(CLASSNAMES) for cls in CLASSNAMES[gen]]
    pixels, labels = [], []
    for index, (gen, cls) in enumerate(pairs):
        rng = np.random.default_rng(np.random.SeedSequence(PRETRAIN_ENTROPY, spawn_key=(index,)))
        for _ in range(per_class):
            pixels.append(eval_view(draw_image(gen, cls, rng), IMAGE_SIZE))
            labels.append(index)
    return torch.stack(pixels), torch.tensor(labels), pairs


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on uint8 [B, 3, H, W]: random horizontal flip and a shift of up to 2 px."""
    b, _, h, w = pixels.shape
    flip = torch.rand(b, generator=gen) < 0.5
    pixels = torch.where(flip.view(b, 1, 1, 1), pixels.flip(-1), pixels)
    padded = F.pad(pixels.float(), (2, 2, 2, 2), mode="replicate")
    dy, dx = torch.randint(0, 5, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]).to(torch.uint8)


def contrastive_loss(image_features, text_features, logit_scale, labels) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss). Pictures of the same class in a batch are all positives for
    each other's captions (their targets share the probability mass) instead of false negatives."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings or the logit scale (as in CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def held_out_zero_shot(model, templates: dict[str, str], per_class: int = 20) -> dict[str, float]:
    """Zero-shot top-1 (card template) on pictures drawn from yet another spawn key, per generator."""
    model.eval()
    result = {}
    for g, (gen, classes) in enumerate(sorted(CLASSNAMES.items())):
        pixels, labels = [], []
        for label, cls in enumerate(classes):
            rng = np.random.default_rng(np.random.SeedSequence(PRETRAIN_ENTROPY, spawn_key=(1000 + g, label)))
            pixels += [eval_view(draw_image(gen, cls, rng), IMAGE_SIZE) for _ in range(per_class)]
            labels += [label] * per_class
        image = F.normalize(model.encode_image(normalize(torch.stack(pixels), "cpu")), dim=-1)
        text = F.normalize(encode_text(model, open_clip.tokenize([templates[gen].format(c) for c in classes])), dim=-1)
        result[gen] = (image @ text.T).argmax(-1).eq(torch.tensor(labels)).float().mean().item() * 100
    model.train()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300)")
    parser.add_argument("--out", type=Path, default=TINY_WEIGHTS, help=f"output file (default {TINY_WEIGHTS})")
    parser.add_argument("--per-class", type=int, default=120, help="pictures drawn per class (default 120)")
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a few minutes on one CPU thread; also keeps the run deterministic
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    own = card_templates()
    templates = {gen: list(dict.fromkeys([own[gen], *TEMPLATES[gen]])) for gen in CLASSNAMES}
    pixels, labels, pairs = draw_pool(args.per_class)
    # Every caption of every (generator, class), tokenised once: captions[i][t] is template t of pair i.
    captions = [[t.format(cls) for t in templates[gen]] for gen, cls in pairs]
    n_templates = len(captions[0])
    tokens = open_clip.tokenize([c for per_pair in captions for c in per_pair]).view(len(pairs), n_templates, -1)
    print(f"drew {len(pixels)} pictures of {len(pairs)} classes, {n_templates} captions each "
          f"({time.perf_counter() - start:.1f} s)")

    model = build_tiny().train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        batch_labels = labels[idx]
        which = torch.randint(0, n_templates, (args.batch_size,), generator=gen)
        image = model.encode_image(normalize(augment(pixels[idx], gen), "cpu"))
        text = encode_text(model, tokens[batch_labels, which])
        loss = contrastive_loss(image, text, model.logit_scale, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.3f}  "
                  f"scale {model.logit_scale.exp().item():.1f}  ({time.perf_counter() - start:.0f} s)")

    accuracy = held_out_zero_shot(model, own)
    print("held-out zero-shot top-1 (fresh pictures, card templates): "
          + ", ".join(f"{g} {a:.1f}%" for g, a in accuracy.items()))

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"format": "pt", "source": "scripts/pretrain_tiny.py", "steps": str(args.steps)})
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
