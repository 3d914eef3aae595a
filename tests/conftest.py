"""Shared fixtures: every test session gets its own cache and database, so tests never touch ~/.cache."""

import os

import pytest
import torch

# Tiny tensors gain nothing from a second thread, and one thread keeps results independent of the
# machine's core count (and of a busy neighbour on a shared 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def only_builtin_methods():
    """Each test starts and ends with only the built-in methods registered: a plugin one test loads
    (test_plugins, the tamper plugin of test_record_integrity) never joins another's --all-methods."""
    import sys

    from harness import plugins
    from methods import REGISTRY

    builtins = dict(REGISTRY)
    plugins.reset()
    yield
    plugins.reset()
    REGISTRY.clear()
    REGISTRY.update(builtins)
    for name in [m for m in sys.modules if m.startswith("harness_plugin_")]:
        del sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("harness-cache")
    os.environ["HARNESS_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session", autouse=True)
def three_class_cards(tmp_path_factory):
    """The small CoOp-layout datasets of tests/coop_layout.py hold 3 classes (ImageNet-A/-R: 2): declare them so with
    cards in $HARNESS_CARDS (a user's way to run a class subset), the shipped cards otherwise unchanged."""
    import yaml

    from harness.cards import all_cards, cards_dir

    folder = tmp_path_factory.mktemp("cards")
    sizes = {"eurosat": 3, "fgvc_aircraft": 3, "imagenet": 3, "imagenetv2": 3, "imagenet_sketch": 3, "imagenet_a": 2, "imagenet_r": 2}
    for name, n in sizes.items():
        raw = yaml.safe_load(cards_dir().joinpath(f"{name}.yaml").read_text())
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "num_classes": n}))
    os.environ["HARNESS_CARDS"] = str(folder)
    all_cards.cache_clear()
    yield folder


@pytest.fixture(scope="session")
def demo_root(isolated_cache):
    from harness.cards import suite_cards
    from harness.data.demo import ensure_demo

    return ensure_demo(suite_cards("demo"))


@pytest.fixture(scope="session")
def tiny():
    from harness.backbones import load_backbone

    return load_backbone("tiny")


@pytest.fixture(scope="session")
def random_tiny():
    """The tiny CLIP with seeded random weights, whatever demo weights ship: its random text tower
    leaves zero-shot at chance while its frozen image features still separate colours, so a test
    measures what a method learns, not what pre-training put there."""
    from harness.backbones import Backbone, build_tiny

    model = build_tiny().eval().requires_grad_(False)
    size = model.visual.image_size
    return Backbone("tiny", model, size[0] if isinstance(size, tuple) else size, "tiny-random:seed0", torch.device("cpu"))
