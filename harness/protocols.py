"""Evaluation protocols as data (`datasets/_protocols.yaml`): what a run trains on, what it is
evaluated on, and its headline number. One code path reads them; there is no branch per protocol.

- fewshot: K shots of all classes, the dataset's test split (top-1).
- base2new (CoCoOp): the few-shot subset is drawn on all classes first, then restricted to the base
  classes (Dassl's `subsample_classes`: sorted labels, the first ceil(n/2) base, the rest new, each
  relabelled from 0); base and new test images are two closed-set problems with their own class
  names. Headline: harmonic mean of base and new.
- cross_dataset: train on a source (ImageNet; demo: demo_shapes), evaluate on every other dataset.
- domain_shift: train on the source, evaluate on its shifted versions (ImageNet-V2/-Sketch/-A/-R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import yaml

from harness.cards import cards_dir, get_card, suite_cards
from harness.data.readers import Item
from harness.errors import HarnessError

HEADLINES = ("top1", "hm", "mean")


@dataclass(frozen=True)
class Target:
    name: str  # what the report calls it: "test", "base", "new" or a dataset name
    dataset: str  # whose test images
    subset: str = "all"  # all | base | new: which of its classes


@dataclass(frozen=True)
class Protocol:
    name: str
    train: str  # all | base
    targets: object  # "self" | "base_new" | "others" | {suite: [dataset, ...]}
    headline: str
    shots: tuple[int, ...] | None = None
    source: dict = field(default_factory=dict)  # suite -> dataset trained on
    recipes: dict = field(default_factory=dict)  # method -> hyper-parameters for this protocol
    recipe_source: str = ""

    def datasets(self, suite: str, requested: list[str], all_datasets: bool = False) -> list[str]:
        """The datasets runs train on. Named ones (`-d`) where the protocol allows them: any source for
        cross-dataset transfer, only the source for domain shift (its targets are that dataset's
        shifted versions). `--all-datasets`, or none named: every dataset of the suite where the
        protocol trains on each (fewshot, base2new), else the protocol's source; fewshot asks for a name."""
        if self.source and suite not in self.source:
            raise HarnessError(f"--protocol {self.name} has no source dataset for the {suite} suite.")
        if requested:
            others = [n for n in requested if get_card(n).name != self.source[suite]] if isinstance(self.targets, dict) else []
            if others:
                raise HarnessError(
                    f"--protocol {self.name} trains on {self.source[suite]} only: its targets are that dataset's shifted "
                    f"versions, not {', '.join(others)}'s. Drop -d/--dataset (the source is used).")
            return requested
        if self.source:
            return [self.source[suite]]
        return [c.name for c in suite_cards(suite)] if all_datasets or self.name != "fewshot" else []

    def targets_for(self, dataset: str, suite: str) -> list[Target]:
        if self.targets == "self":
            return [Target("test", dataset)]
        if self.targets == "base_new":
            return [Target("base", dataset, "base"), Target("new", dataset, "new")]
        source = [Target(dataset, dataset)]  # the source's own test split, reported beside the targets
        if self.targets == "others":
            return source + [Target(c.name, c.name) for c in suite_cards(suite) if c.name != dataset]
        return source + [Target(name, name) for name in self.targets.get(suite, [])]

    def headline_of(self, results: dict[str, float | None]) -> float | None:
        """The run's one number from its targets' top-1 (None where a needed target has none)."""
        if self.headline == "top1":
            return results.get("test")
        if self.headline == "hm":
            base, new = results.get("base"), results.get("new")
            return None if base is None or new is None else harmonic_mean(base, new)
        others = [v for k, v in list(results.items())[1:]]  # the targets after the source
        return None if not others or any(v is None for v in others) else sum(others) / len(others)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@lru_cache(maxsize=1)
def protocols() -> dict[str, Protocol]:
    raw = yaml.safe_load(cards_dir().joinpath("_protocols.yaml").read_text())
    out = {}
    for name, spec in raw.items():
        spec = dict(spec)
        if spec.get("shots"):
            spec["shots"] = tuple(spec["shots"])
        out[name] = Protocol(name=name, **spec)
        if out[name].headline not in HEADLINES:
            raise HarnessError(f"_protocols.yaml: {name} has headline '{out[name].headline}', not one of {', '.join(HEADLINES)}.")
    return out


def get_protocol(name: str) -> Protocol:
    known = protocols()
    if name not in known:
        raise HarnessError(f"Unknown protocol '{name}'. Choose one of: {', '.join(known)}.")
    return known[name]


def base_new_labels(train_labels) -> tuple[list[int], list[int]]:
    """CoCoOp's split of the labels present in the (few-shot) train list: sorted, the first
    ceil(n/2) are base, the rest new."""
    labels = sorted(set(train_labels))
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def restrict(items: list[Item], labels: list[int], classnames: list[str]) -> list[Item]:
    """Items of `labels` only, relabelled 0..len(labels)-1 in that order (Dassl's relabeler)."""
    new = {old: i for i, old in enumerate(labels)}
    return [Item(it.path, new[it.label], classnames[it.label]) for it in items if it.label in new]


def check_targets(protocol: Protocol, dataset: str, suite: str) -> list[Target]:
    """The targets, each a known dataset card (the data itself is checked when it is read)."""
    targets = protocol.targets_for(dataset, suite)
    for t in targets:
        get_card(t.dataset)
    return targets
