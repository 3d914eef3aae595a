"""Run one grid point through the real runner path (demo-suite overrides included) in a test."""

from pathlib import Path

from harness.grid import build_grid
from harness.runner import load_datasets, run_one
from methods import ImageSet
from methods.base import Steps


def eval_images(task) -> ImageSet:
    """The test split of a demo task's dataset, for unit tests that call predict directly (a Task
    itself never holds it)."""
    splits = load_datasets([task.card.name], Path("unused"))[task.card.name]
    return ImageSet(splits.root, task.card.name, splits.test, task.backbone.image_size)


def run_method(method, dataset, shots, backbone, seed=1, sets=None) -> dict:
    """The run's record; zero-shot ignores `shots` (stored at 0)."""
    (spec,) = build_grid([method], [dataset], "demo", [shots], [seed], {backbone.name: backbone.weights}, "fp32", sets or {})
    splits = load_datasets([dataset], Path("unused"))[dataset]
    test = ImageSet(splits.root, dataset, splits.test, backbone.image_size, evaluation=True)
    return run_one(spec, backbone, splits, test, {}, lambda total, desc: Steps())


def block_inputs(model, run) -> dict[str, list]:
    """What each transformer block of CLIP's two towers receives while `run()` goes through `model`
    (no gradients): per tower, one tensor per block call, in order."""
    import torch

    seen = {"text": [], "vision": []}
    hooks = [block.register_forward_pre_hook(lambda m, args, k=k: seen[k].append(args[0].detach().clone()))
             for k, tower in (("text", model.transformer), ("vision", model.visual.transformer)) for block in tower.resblocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen
