"""The run grid: CLI options -> a list of fully resolved runs, each with its config hash.

Hyper-parameters resolve in this order: the method's defaults (the official recipe), the dataset
card's recipe (e.g. CoOp's 50 epochs on ImageNet), the protocol's recipe where the method's paper
ran that protocol, with its per-dataset exceptions (e.g. CoCoOp's CoOp baseline for base-to-new,
MMRL's per-dataset lambda; `--recipe` takes another protocol's), the suite's overrides (the demo's smaller budgets), then `--set KEY=VALUE`. The
resolved config, not the command line, is what is hashed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field

from harness import PROTOCOL_VERSION
from harness.backbones import refusal
from harness.cards import get_card, suites
from harness.errors import HarnessError
from harness.plugins import method_source
from harness.protocols import get_protocol
from methods import REGISTRY
from methods.hparams import parse_value, validate

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
# What the runner adds to a run's stored config after planning (the drawn subset's hash, the method's
# official code, how its hyper-parameters were chosen): recorded, but not part of the run's identity.
# `recipe` names the protocol whose recipe a run's hyper-parameters follow; they are hashed, so it is not.
RUNTIME_CONFIG_KEYS = ("manifest_hash", "source", "selection", "recipe")


def config_hash_of(config: dict) -> str:
    """A run's identity: the hash of its planned config (a stored config minus RUNTIME_CONFIG_KEYS)."""
    planned = {k: v for k, v in config.items() if k not in RUNTIME_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(planned, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    method: str
    dataset: str
    backbone: str
    shots: int
    seed: int
    suite: str
    weights: str  # identity of the weights
    precision: str
    hparams: dict = field(hash=False, compare=False)
    overrides: dict = field(hash=False, compare=False)  # the suite-level overrides that were applied
    sampler: str = "coop"  # how the few-shot subset is drawn: coop | clip_lora | files
    splits_dir: str | None = field(default=None, hash=False, compare=False)  # --splits DIR (sampler "files")
    splits_hash: str | None = None  # sha256 of the split files: their content, not their path, is the identity
    protocol: str = "fewshot"  # evaluation protocol (datasets/_protocols.yaml)
    # a plugin method's source (harness/plugins.py): its file's sha256, or its distribution and version; None: built-in
    method_source: dict | None = field(default=None, hash=False, compare=False)
    recipe: str | None = field(default=None, hash=False, compare=False)  # whose recipe (a protocol's name); None: the protocol's own

    @property
    def config(self) -> dict:
        subset = {}
        if self.shots > 0:  # zero-shot runs use no few-shot subset
            subset = {"sampler": self.sampler} | ({"split_files_sha256": self.splits_hash} if self.splits_hash else {})
        evaluation = {} if self.protocol == "fewshot" else {"eval_protocol": self.protocol}  # fewshot: as before
        source = {"method_source": self.method_source} if self.method_source else {}  # built-ins: as before
        return {
            **subset,
            **evaluation,
            **source,
            "recipe": self.recipe or self.protocol,
            "protocol": PROTOCOL_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "dataset": self.dataset,
            "suite": self.suite,
            "shots": self.shots,
            "seed": self.seed,
            "backbone": self.backbone,
            "weights": self.weights,
            "precision": self.precision,
            "suite_overrides": self.overrides,
        }

    @property
    def config_hash(self) -> str:
        return config_hash_of(self.config)

    @property
    def label(self) -> str:
        where = "" if self.protocol == "fewshot" else f" ({self.protocol})"
        return f"{self.method} {self.dataset} {self.backbone} {self.shots}-shot seed {self.seed}{where}"


def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE pairs; a value that looks like a number is one (1e-3 included), else YAML."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--set expects KEY=VALUE, got '{pair}'.")
        out[key.strip()] = parse_value(value)
    return out


def check_grid(methods: list[str], datasets: dict, shots: list[int], seeds: list[int]) -> tuple[list[int], list[int]]:
    """Shots and seeds that make sense for these methods and data, duplicates dropped (order kept).

    Few-shot methods take 1..16 shots (the protocol's range); a larger K only where every class of
    the dataset has K training images, so a "K-shot" number never comes from fewer. `datasets` maps
    names to their read splits (DatasetSplits)."""
    shots, seeds = list(dict.fromkeys(shots)), list(dict.fromkeys(seeds))
    if not seeds or any(s < 0 for s in seeds):
        raise HarnessError(f"--seeds must be integers >= 0, got {', '.join(map(str, seeds)) or 'none'}.")
    if not any(method_class(m).uses_shots for m in methods):
        return shots, seeds
    if not shots or any(k < 1 for k in shots):
        raise HarnessError(f"--shots must be integers >= 1 for few-shot methods (the protocol uses 1..16), got {', '.join(map(str, shots)) or 'none'}.")
    for k in (k for k in shots if k > 16):
        for name, splits in datasets.items():
            counts: dict[int, int] = {}
            for it in splits.train:
                counts[it.label] = counts.get(it.label, 0) + 1
            if min(counts.values(), default=0) < k:
                raise HarnessError(
                    f"--shots {k}: the protocol uses 1..16 shots; more is allowed only where every class has {k} training "
                    f"images, and {name} has classes with only {min(counts.values(), default=0)}."
                )
    return shots, seeds


def canonical_method(name: str) -> str:
    """A method or paper-variant name as typed (`tip-adapter`, `CoOp`) -> its registered spelling, or
    a HarnessError that suggests the closest names."""
    from harness.published import VARIANTS

    norm = name.strip().lower().replace("-", "_")
    if norm in REGISTRY or norm in VARIANTS:
        return norm
    close = difflib.get_close_matches(norm, [*REGISTRY, *VARIANTS], n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise HarnessError(f"Unknown method '{name}'.{hint} Known methods: {', '.join(REGISTRY)} (paper variants: "
                       f"{', '.join(VARIANTS)}). See `harness list methods`.")


def method_and_variant(name: str) -> tuple[str, dict]:
    """The registered method behind a name, and the hyper-parameters of its paper variant (none for a method)."""
    from harness.published import VARIANTS

    name = canonical_method(name)
    method, hparams = VARIANTS.get(name, (name, {}))
    return method, dict(hparams)


def method_class(name: str):
    return REGISTRY[method_and_variant(name)[0]]


def recipe_for(method: str, dataset: str, protocol: str, recipe: str | None = None) -> tuple[dict, str]:
    """The protocol recipe a run applies (over the method's defaults and card) and whose it is: the
    protocol's own, or `recipe`'s (another protocol's; `fewshot`: none), with the dataset's own
    exceptions (`datasets:`) applied. A recipe that sets nothing different for this method is the
    protocol's own: the same hyper-parameters are the same run."""
    def of(name: str) -> dict:
        entry = dict(get_protocol(name).recipes.get(method, {}))
        return {**entry, **entry.pop("datasets", {}).get(dataset, {})}

    own = of(protocol)
    chosen = own if recipe in (None, protocol) else of(recipe)
    return chosen, protocol if chosen == own else recipe


def resolve_hparams(method: str, dataset: str, suite: str, sets: dict, protocol: str = "fewshot",
                    recipe: str | None = None) -> tuple[dict, dict]:
    cls = method_class(method)
    overrides = suites()[suite].get("overrides", {}).get(method, {})
    hp = {**cls.defaults, **get_card(dataset).recipe_for(method), **recipe_for(method, dataset, protocol, recipe)[0], **overrides}
    hp.update({k: v for k, v in sets.items() if k in cls.defaults})
    return cls.resolve(validate(method, hp, cls.schema)), dict(overrides)


def check_schedule(method: str, hp: dict, dataset: str, shots: int) -> None:
    """Refuse hyper-parameters that are valid alone but not together: a warm-up that is not shorter
    than the training it belongs to leaves the whole run at the warm-up learning rate."""
    epochs = REGISTRY[method].planned_epochs(hp, get_card(dataset), shots)
    warmup = hp.get("warmup_epochs")
    if epochs is not None and warmup is not None and warmup >= epochs:
        raise HarnessError(
            f"{method} on {dataset}, {shots} shots: warmup_epochs={warmup} is not shorter than the {epochs} epoch(s) this "
            "config trains (epochs x epoch_scale), so the run would never leave the warm-up learning rate. Lower "
            "warmup_epochs or train longer."
        )


def build_grid(
    methods: list[str],
    datasets: list[str],
    suite: str,
    shots: list[int],
    seeds: list[int],
    backbones: dict[str, str],  # backbone name -> weights identity
    precision: str,
    sets: dict,
    sampler: str = "coop",
    split_hashes: dict[tuple[str, int, int], str] | None = None,  # (dataset, shots, seed) -> sha256, for --splits
    splits_dir: str | None = None,
    protocol: str = "fewshot",
    recipe: str | None = None,  # another protocol's recipe (`fewshot`: the few-shot one); None: the protocol's own
) -> list[RunSpec]:
    chosen = [method_and_variant(name) for name in methods]  # paper variants (coop_ctx4) are their method + hparams
    unknown = [k for k in sets if not any(k in REGISTRY[m].defaults for m, _ in chosen)]
    if unknown:
        known = sorted({k for m, _ in chosen for k in REGISTRY[m].defaults})
        raise HarnessError(f"--set {', '.join(unknown)}: no selected method has this hyper-parameter. Known: {', '.join(known)}.")
    grid = []
    for backbone, weights in backbones.items():
        for dataset in datasets:
            for method, variant in chosen:
                if refusal(REGISTRY[method], backbone):  # not on this backbone (refused or named by the caller)
                    continue
                hp, overrides = resolve_hparams(method, dataset, suite, {**variant, **sets}, protocol, recipe)
                whose = recipe_for(method, dataset, protocol, recipe)[1]
                problem = REGISTRY[method].config_error(hp, get_card(dataset))
                if problem:
                    raise HarnessError(f"{method} on {dataset}: {problem}")
                method_shots = shots if REGISTRY[method].uses_shots else [0]
                for k in method_shots:
                    check_schedule(method, hp, dataset, k)
                    for seed in seeds:
                        files = split_hashes is not None and k > 0
                        grid.append(RunSpec(
                            method, dataset, backbone, k, seed, suite, weights, precision, hp, overrides,
                            sampler="files" if files else sampler,
                            splits_dir=splits_dir if files else None,
                            splits_hash=split_hashes[(dataset, k, seed)] if files else None,
                            protocol=protocol,
                            method_source=method_source(method),
                            recipe=whose,
                        ))
    return grid
