"""How far the harness's training crops are from the official PIL pipeline's, in pixels.

The official codes crop and resize training images with PIL (RandomResizedCrop, bicubic) in a
DataLoader; the harness does the same crop on uint8 tensors on the device (torchvision v2,
bicubic with antialias). For the same crop boxes, this prints the largest and mean absolute
difference of the two over the demo suite's training images (0..255 scale).

    python -m bench.resize_fidelity [--crops 4]
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from harness.cards import suite_cards
from harness.data.demo import ensure_demo
from harness.data.images import load_rgb, to_tensor
from harness.data.readers import read_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=4, help="random crop boxes per image")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    cards = suite_cards("demo")
    root = ensure_demo(cards)
    worst, total, count = 0, 0.0, 0
    for card in cards:
        splits = read_dataset(card, root)
        for item in splits.train:
            img = load_rgb(splits.root / item.path)
            tensor = to_tensor(img)
            for _ in range(args.crops):
                top, left, h, w = RandomResizedCrop.get_params(tensor, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
                size = [args.size, args.size]
                ours = TF.resized_crop(tensor, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
                official = to_tensor(TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC))
                diff = (ours.int() - official.int()).abs()
                worst = max(worst, int(diff.max()))
                total += float(diff.float().mean())
                count += 1
    print(json.dumps({"crops": count, "max_abs_diff": worst, "mean_abs_diff": round(total / count, 3)}))


if __name__ == "__main__":
    main()
