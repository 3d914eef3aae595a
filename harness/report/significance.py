"""The report's statistics: intervals on every number, emphasis that follows significance, the
pair matrix, average ranks with Friedman's test and the critical-difference diagram.

Pairs are always the same runs `harness compare` pairs (same subset, seed, dataset); the tests are
in harness.stats (scipy).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from markupsafe import Markup

from harness.compare import compare, pair_runs
from harness.errors import HarnessError
from harness.report.plots import FONT, svg
from harness.stats import Ranks, paired, ranks


def column_emphasis(ok: pd.DataFrame, means: dict[str, float]) -> dict[str, str]:
    """For one leaderboard column (its runs `ok`, its complete methods' `means`): 'best' for the top
    entry only when it is significantly ahead of every other (paired over (dataset, seed) runs),
    'tied' for the entries not significantly apart from it (the top one then too)."""
    ranked = sorted((v, m) for m, v in means.items() if pd.notna(v))[::-1]
    if not ranked:
        return {}
    top = ranked[0][1]
    marks = {}
    for _, other in ranked[1:]:
        pairs = pair_runs(ok, other, top)
        result = paired(pairs["a"], pairs["b"])
        if not result.significant:
            marks[other] = "tied"
    marks[top] = "tied" if marks else "best"
    return marks


def pair_matrix(ok: pd.DataFrame, methods: list[str]) -> list[dict]:
    """Row vs column: the row's method minus the column's over their paired cells, 'better' where the
    row's method is significantly ahead (so a good method's row is the green one), with the verdict
    in words ("row better than column ...")."""
    rows = []
    for a in methods:
        cells = []
        for b in methods:
            if a == b:
                cells.append(None)
                continue
            try:
                result = compare(ok, b, a)  # a minus b, and the verdict says "a ... than b"
            except HarnessError:
                cells.append({"text": "\u2013", "verdict": "nothing to pair", "cls": "missing"})
                continue
            c = result.cells
            cls = ("better" if c.mean > 0 else "worse") if c.significant else "same"
            cells.append({"text": f"{c.mean:+.1f}", "verdict": result.verdict, "cls": cls})
        rows.append({"method": a, "cells": cells})
    return rows


def rank_block(ok: pd.DataFrame, methods: list[str], datasets: list[str]) -> Ranks | None:
    """Average ranks over the datasets every method has (mean over seeds per dataset)."""
    table = ok[ok["method"].isin(methods)].groupby(["dataset", "method"])["top1"].mean().unstack()
    table = table.reindex(columns=methods).loc[[d for d in datasets if d in table.index]].dropna()
    if len(methods) < 2 or len(table) < 2:
        return None
    return ranks(methods, table.to_numpy())


def cd_diagram(r: Ranks, name: str) -> Markup:
    """Demsar's critical-difference diagram: methods on the average-rank axis, those closer than
    the CD joined by a bar (not significantly different)."""
    import matplotlib.pyplot as plt

    k = len(r.methods)
    order = np.argsort(r.avg_rank)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * k))
    ax.set_xlim(k + 0.3, 0.7)  # rank 1 on the right, as in Demsar (2006)
    ax.set_ylim(-(0.8 * k + 0.5), 1.6)
    ax.axhline(0, color="#333", lw=1)
    for rank in range(1, k + 1):
        ax.plot([rank, rank], [0, 0.15], color="#333", lw=1)
        ax.text(rank, 0.3, str(rank), ha="center", va="bottom", fontsize=FONT)
    ax.plot([1, 1 + r.cd], [1.2, 1.2], color="#c0392b", lw=2)
    ax.text(1 + r.cd / 2, 1.3, f"CD = {r.cd:.2f}", ha="center", va="bottom", fontsize=FONT, color="#c0392b")
    for line, i in enumerate(order):
        y = -(line + 1) * 0.8
        x = r.avg_rank[i]
        ax.plot([x, x], [0, y], color="#555", lw=0.8)
        left = x > (k + 1) / 2
        ax.plot([x, k + 0.2 if left else 0.8], [y, y], color="#555", lw=0.8)
        ax.text(k + 0.25 if left else 0.75, y, f"{r.methods[i]} ({x:.2f})", ha="left" if not left else "right",
                va="center", fontsize=FONT)
    cliques = []
    ranked = [r.avg_rank[i] for i in order]
    for start in range(k):
        end = max(j for j in range(start, k) if ranked[j] - ranked[start] <= r.cd)
        if end > start and not any(s <= start and end <= e for s, e in cliques):
            cliques.append((start, end))
    for n, (s, e) in enumerate(cliques):
        y = -0.25 - 0.18 * n
        ax.plot([ranked[s] - 0.03, ranked[e] + 0.03], [y, y], color="#111", lw=3)
    ax.axis("off")
    p = "n/a" if math.isnan(r.friedman_p) else f"{r.friedman_p:.3g}"
    ax.set_title(f"average rank over {r.n_blocks} datasets (Friedman p = {p}; Nemenyi, alpha 0.05)", fontsize=FONT)
    return svg(fig, name)


def rank_sections(ok: pd.DataFrame, cells: pd.DataFrame, shots: list[int], datasets: list[str], name: str) -> list[dict]:
    """Per shot count: the complete few-shot methods' average ranks over datasets, Friedman's p and
    the CD diagram."""
    out = []
    for k in shots:
        methods = sorted(cells.loc[(cells.shots == k) & cells["complete"] & (cells.shots > 0), "method"])
        r = rank_block(ok[ok.shots == k], methods, datasets)
        if r is None:
            continue
        order = sorted(range(len(r.methods)), key=lambda i: r.avg_rank[i])
        out.append({"shots": k, "rows": [(r.methods[i], r.avg_rank[i]) for i in order], "friedman_p": r.friedman_p,
                    "cd": r.cd, "n": r.n_blocks, "svg": cd_diagram(r, f"cd-{name}-{k}")})
    return out


def prompt_spread(per_dataset: pd.DataFrame) -> list[dict]:
    """Zero-shot accuracy per dataset under each template set that was run, and the spread (max - min):
    template choice alone moves zero-shot accuracy by points."""
    zs = per_dataset[per_dataset["method"].str.startswith("zero_shot")]
    if zs["method"].nunique() < 2:
        return []
    table = zs.pivot_table(index="dataset", columns="method", values="mean")
    return [{"dataset": d, "values": [(m, row[m]) for m in table.columns], "spread": float(row.max() - row.min())}
            for d, row in table.iterrows()]
