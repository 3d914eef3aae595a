"""Shared fixtures: every test session gets its own cache and database, so tests never touch ~/.cache."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("harness-cache")
    os.environ["HARNESS_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def demo_root(isolated_cache):
    from harness.cards import suite_cards
    from harness.data.demo import ensure_demo

    return ensure_demo(suite_cards("demo"))


@pytest.fixture(scope="session")
def tiny():
    from harness.backbones import load_backbone

    return load_backbone("tiny")
