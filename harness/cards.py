"""Dataset cards: declarative YAML files (CoOp folder, split file, sizes, templates, search ranges).

The cards live in the repository's `datasets/` folder, installed as the data-only package
`harness.dataset_cards`, so they are found in a checkout and after a non-editable install alike.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from harness.errors import HarnessError

SUITES = ("standard", "demo")


@dataclass(frozen=True)
class DatasetCard:
    name: str
    title: str
    suite: str
    folder: str
    reader: str  # coop_split | fgvc_aircraft | imagenet | imagenet_variant
    image_dir: str
    num_classes: int
    test_size: int
    template: str
    tip_adapter: dict
    split_file: str | None = None
    templates: tuple[str, ...] = ()
    recipe: dict = field(default_factory=dict)  # per-dataset recipe settings, e.g. coop epochs on ImageNet
    generator: str | None = None  # demo suite only: which generator draws the images
    target_only: bool = False  # an evaluation target of a protocol (ImageNet-A, ...), never trained on
    class_source: str | None = None  # target_only: the dataset whose classes these are (matched by name)
    folders: str | None = None  # imagenet_variant reader: class folders named by label index or by wnid

    @property
    def ensemble(self) -> tuple[str, ...]:
        """Templates for an ensemble classifier: the card's set, or its single template."""
        return self.templates or (self.template,)

    def recipe_for(self, method: str) -> dict:
        return dict(self.recipe.get(method, {}))


def cards_dir():
    """The checkout's `datasets/` folder when running from source, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "datasets"
    if (checkout / "_suites.yaml").is_file():
        return checkout
    return resources.files("harness.dataset_cards")


@lru_cache(maxsize=1)
def all_cards() -> dict[str, DatasetCard]:
    """The shipped cards, then the cards in $HARNESS_CARDS (a folder of YAML files) if set: your own
    datasets, or a shipped card redeclared (e.g. a class subset), replacing the shipped one by name."""
    cards = {}
    folders = [cards_dir()] + ([Path(os.environ["HARNESS_CARDS"])] if os.environ.get("HARNESS_CARDS") else [])
    for folder in folders:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".yaml") and not entry.name.startswith("_"):
                try:
                    raw = yaml.safe_load(entry.read_text())
                    raw["templates"] = tuple(raw.get("templates", ()))
                    cards[raw["name"]] = DatasetCard(**raw)
                except (yaml.YAMLError, TypeError, KeyError) as exc:
                    raise HarnessError(f"Dataset card {entry} is not a valid card ({exc}). Compare it with datasets/dtd.yaml.") from None
    return cards


@lru_cache(maxsize=1)
def suites() -> dict[str, dict]:
    """Suite settings (default backbone, method budget overrides) from `datasets/_suites.yaml`."""
    return yaml.safe_load(cards_dir().joinpath("_suites.yaml").read_text())


def suite_cards(suite: str) -> list[DatasetCard]:
    if suite not in SUITES:
        raise HarnessError(f"Unknown suite '{suite}'. Choose one of: {', '.join(SUITES)}.")
    return [c for c in all_cards().values() if c.suite == suite and not c.target_only]


def get_card(name: str) -> DatasetCard:
    """The card of a dataset name as typed (`oxford-pets` is `oxford_pets`), or a HarnessError that
    suggests the closest names."""
    cards = all_cards()
    norm = name.strip().lower().replace("-", "_")
    if norm not in cards:
        close = difflib.get_close_matches(norm, list(cards), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise HarnessError(f"Unknown dataset '{name}'.{hint} Known datasets: {', '.join(cards)}. See `harness list datasets`.")
    return cards[norm]
