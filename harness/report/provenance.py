"""What produced the numbers: methods and their deviations, configs as run, subsets, versions."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import pandas as pd

PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "duckdb", "pandas", "matplotlib", "jinja2")


def _counts(series: pd.Series) -> str:
    counts = series.fillna("unknown").astype(str).value_counts()
    return ", ".join(f"{value} ({n})" for value, n in counts.items())


def subset_source(config: dict) -> str:
    """Where a run's few-shot subset came from: its sampler, split files (with their hash), or none."""
    if not config.get("shots"):
        return "none (zero-shot)"
    if config.get("sampler") == "files":
        return f"split files {str(config.get('split_files_sha256'))[:12]}"
    return config.get("sampler") or "coop (before samplers were recorded)"


def provenance(runs: pd.DataFrame) -> dict:
    """Methods, configs as run, subsets and versions of `runs` (every run, of every protocol)."""
    from methods import REGISTRY

    methods = []
    for cls in REGISTRY.values():
        methods.append({"name": cls.name, "paper": cls.paper, "source": cls.source, "deviations": cls.deviations,
                        "defaults": ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "\u2013"})
    unregistered = sorted(set(runs["base_method"]) - set(REGISTRY))
    overrides, hparams, selection = [], [], []
    for (suite, method), group in runs.groupby(["suite", "method"]):
        configs = [json.loads(c) if isinstance(c, str) else (c or {}) for c in group["config"]]
        ov = sorted({json.dumps(c.get("suite_overrides") or {}, sort_keys=True) for c in configs})
        hp = sorted({json.dumps(c.get("hparams") or {}, sort_keys=True) for c in configs})
        if any(o != "{}" for o in ov):
            overrides.append({"suite": suite, "method": method, "overrides": "; ".join(ov)})
        subsets = _counts(pd.Series([subset_source(c) for c in configs]))
        hparams.append({"suite": suite, "method": method, "hparams": "; ".join(hp), "subsets": subsets})
        chosen = _counts(pd.Series([c.get("selection", "not recorded (run from before selection was stored)") for c in configs]))
        followed = _counts(pd.Series([c.get("source", "not recorded") for c in configs]))
        selection.append({"suite": suite, "method": method, "selection": chosen, "source": followed})
    groups = []
    for (suite, backbone), group in runs.groupby(["suite", "backbone"]):
        groups.append({"suite": suite, "backbone": backbone, "weights": _counts(group["weights"]), "device": _counts(group["device"]),
                       "precision": _counts(group["precision"]), "git_sha": _counts(group["git_sha"].str.slice(0, 12)),
                       "harness_version": _counts(group["harness_version"]),
                       "packages": _counts(group["packages"]) if "packages" in group else "unknown",
                       "period": f"{group['started_at'].min():%Y-%m-%d %H:%M} \u2192 {group['finished_at'].max():%Y-%m-%d %H:%M}"
                       if group["started_at"].notna().any() and group["finished_at"].notna().any() else "\u2013"})
    versions = []
    for name in PACKAGES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    versions.append(("python", platform.python_version()))
    from harness.applicability import FAMILIES, rows

    return {"methods": methods, "unregistered": unregistered, "overrides": overrides, "hparams": hparams, "selection": selection,
            "groups": groups, "versions": versions, "families": list(FAMILIES), "applicability": rows()}
