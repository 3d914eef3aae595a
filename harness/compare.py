"""Paired comparison of two methods (`harness compare A B`): which is better, by how much, how sure.

Runs are paired only when they saw the same data: same suite, backbone, dataset, shots and seed,
and, where both have one, the same few-shot subset (manifest hash). A method that uses no shots
(zero-shot) pairs with every shot count of the other. The difference is B minus A in top-1 points.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from harness.errors import HarnessError
from harness.stats import Paired, paired, ranks

KEY = ["suite", "backbone", "dataset", "shots", "seed"]


def _subset(config) -> str | None:
    config = json.loads(config) if isinstance(config, str) else (config or {})
    return config.get("manifest_hash")


def pair_runs(ok: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """One row per matched (suite, backbone, dataset, shots, seed): top1 of A and of B."""
    ra = ok[ok["method"] == a].assign(subset=lambda f: f["config"].map(_subset))
    rb = ok[ok["method"] == b].assign(subset=lambda f: f["config"].map(_subset))
    if (ra["shots"] == 0).all() and not (rb["shots"] == 0).all():  # A is a zero-shot reference: any shots of B
        merged = rb.merge(ra.drop(columns="shots"), on=[k for k in KEY if k != "shots"], suffixes=("_b", "_a"))
    elif (rb["shots"] == 0).all() and not (ra["shots"] == 0).all():
        merged = ra.merge(rb.drop(columns="shots"), on=[k for k in KEY if k != "shots"], suffixes=("_a", "_b"))
    else:
        merged = ra.merge(rb, on=KEY, suffixes=("_a", "_b"))
    same_subset = merged["subset_a"].isna() | merged["subset_b"].isna() | (merged["subset_a"] == merged["subset_b"])
    merged = merged[same_subset]
    return merged[[k for k in KEY] + ["top1_a", "top1_b"]].rename(columns={"top1_a": "a", "top1_b": "b"}).reset_index(drop=True)


@dataclass
class Comparison:
    a: str
    b: str
    pairs: pd.DataFrame  # matched runs
    cells: Paired  # over (dataset, shots) cells, each the mean over seeds
    per_dataset: pd.DataFrame  # dataset, a, b, diff (means over shots and seeds)
    avg_rank: tuple[float, float]  # A's and B's average rank over the cells: the report's rule on these two

    @property
    def ranking(self) -> str:
        ra, rb = self.avg_rank
        return (f"average rank over the {self.cells.n} (dataset, shots) cells (the report's rule, 1 = best): "
                f"{self.a} {ra:.2f}, {self.b} {rb:.2f}")

    @property
    def verdict(self) -> str:
        c, n = self.cells, len(self.per_dataset)
        ahead = int((self.per_dataset["diff"] > 1e-9).sum())
        behind = int((self.per_dataset["diff"] < -1e-9).sum())
        size = f"{c.mean:+.1f} points [{c.lo:.1f}, {c.hi:.1f}]" if c.n >= 2 else f"{c.mean:+.1f} points"
        test = f"{c.test} p = {c.p:.3g} over {c.n} (dataset, shots) cells"
        if c.significant and c.mean > 0:
            return f"{self.b} better than {self.a} on {ahead} of {n} datasets, {size} ({test})"
        if c.significant and c.mean < 0:
            return f"{self.b} worse than {self.a} on {behind} of {n} datasets, {size} ({test})"
        return f"no significant difference between {self.a} and {self.b}: {self.b} ahead on {ahead} of {n} datasets, {size} ({test})"


def compare(ok: pd.DataFrame, a: str, b: str) -> Comparison:
    """Compare B with A on the successful runs `ok` (already filtered by the caller)."""
    known = sorted(ok["method"].unique())
    for name in (a, b):
        if name not in known:
            raise HarnessError(f"No successful runs of '{name}' match these filters. Methods with runs: {', '.join(known) or 'none'}.")
    pairs = pair_runs(ok, a, b)
    if pairs.empty:
        def where(m):
            rows = ok[ok["method"] == m]
            return f"{m}: {', '.join(sorted(rows['dataset'].unique()))} at shots {sorted(int(s) for s in rows['shots'].unique())}, seeds {sorted(int(s) for s in rows['seed'].unique())}"

        raise HarnessError(
            f"Nothing to pair: no run of {a} and {b} shares suite, backbone, dataset, shots, seed and few-shot subset. "
            f"{where(a)}; {where(b)}. Run the missing grid points, e.g. `harness run -m {a},{b} ...` with the same options."
        )
    cells = pairs.groupby(["suite", "backbone", "dataset", "shots"])[["a", "b"]].mean()
    per_dataset = pairs.groupby("dataset")[["a", "b"]].mean().reset_index()
    per_dataset["diff"] = per_dataset["b"] - per_dataset["a"]
    avg_rank = tuple(ranks([a, b], cells[["a", "b"]].to_numpy()).avg_rank)
    return Comparison(a, b, pairs, paired(cells["a"], cells["b"]), per_dataset, avg_rank)
