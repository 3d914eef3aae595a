"""The leaderboard's wide tables (methods x shots) and the reproduction gap against published numbers."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.aggregate import SEED_MARK, Aggregate


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} \u00b1 {std:.2f}"


def _cell_note(row) -> str:
    notes = []
    if row["n_seeds"] < row["expected_seeds"]:
        notes.append(f"{row['n_seeds']}/{row['expected_seeds']} seeds")
    if row.get("n_datasets", 1) < row.get("expected_datasets", 1):
        notes.append(f"{row['n_datasets']}/{row['expected_datasets']} datasets (missing: {row['missing_datasets']})")
    return "; ".join(notes)


def _best_two(values: dict[str, float]) -> tuple[str | None, str | None]:
    ranked = sorted((v, m) for m, v in values.items() if pd.notna(v))[::-1]
    return (ranked[0][1] if ranked else None), (ranked[1][1] if len(ranked) > 1 else None)


def wide_table(cells: pd.DataFrame, methods: list[str], shots: list[int], with_rank: bool) -> dict:
    """methods x shots as a template-friendly dict; zero-shot rows repeat their value in every column."""
    header = [f"{k}-shot" for k in shots]
    ranked_cols = {k: cells[(cells.shots == k) & cells["complete"]].set_index("method")["mean"].to_dict() for k in shots}
    rows = []
    for method in methods:
        mine = cells[cells.method == method]
        if mine.empty:
            continue
        reference = (mine["shots"] == 0).all()
        out = {"method": method, "reference": bool(reference), "cells": [], "rank": ""}
        for k in shots:
            hit = mine if reference else mine[mine.shots == k]
            if hit.empty:
                out["cells"].append({"text": "\u2013", "cls": "missing", "note": "no runs"})
                continue
            row = hit.iloc[0]
            best, second = _best_two(ranked_cols[k])
            cls = "ref" if reference else ("best" if method == best else "second" if method == second else "")
            note = _cell_note(row)
            out["cells"].append({"mean": f"{row['mean']:.2f}", "std": "" if pd.isna(row["std"]) else f"\u00b1{row['std']:.2f}",
                                 "flag": row.get("flag", "") or (SEED_MARK if row["n_seeds"] < row["expected_seeds"] else ""),
                                 "cls": cls + (" flagged" if note else ""), "note": note})
        if with_rank and not reference:
            ranks = pd.to_numeric(mine["rank"], errors="coerce").dropna()
            out["rank_value"] = ranks.mean() if len(ranks) else math.inf
            out["mean_rank"] = f"{ranks.mean():.1f}" if len(ranks) else "\u2013"
        rows.append(out)
    if with_rank:
        order = sorted((r for r in rows if not r["reference"]), key=lambda r: r["rank_value"])
        position = 0
        for i, r in enumerate(order):
            if math.isfinite(r["rank_value"]):
                position = i + 1 if i == 0 or r["rank_value"] != order[i - 1]["rank_value"] else position
                r["rank"] = str(position)
    return {"header": header, "rows": rows}


def gap_table(agg: Aggregate) -> pd.DataFrame:
    """Ours minus published wherever both exist (per dataset, and the average when our average is complete)."""
    ours = agg.datasets[["backbone", "method", "dataset", "shots", "mean", "std", "n_seeds"]]
    pub = agg.published.rename(columns={"top1": "published"})
    # Our average is comparable with a published one only when it covers exactly the published datasets.
    covered = pub[pub.dataset != "average"].groupby(["backbone", "method", "shots"])["dataset"].agg(frozenset)
    board = agg.leaderboard[agg.leaderboard.n_datasets >= agg.leaderboard.expected_datasets]
    keep = [frozenset(agg.grids[(s, b)]["datasets"]) == covered.get((b, m, k)) for s, b, m, k in
            zip(board["suite"], board["backbone"], board["method"], board["shots"])]
    avg = board[pd.Series(keep, index=board.index, dtype=bool)].assign(dataset="average")[["backbone", "method", "dataset", "shots", "mean", "std", "n_seeds"]]
    ours = pd.concat([ours, avg], ignore_index=True)
    merged = ours.merge(pub[["backbone", "method", "dataset", "shots", "published", "source"]], on=["backbone", "method", "dataset", "shots"])
    merged["gap"] = merged["mean"] - merged["published"]
    merged["is_avg"] = merged["dataset"] == "average"
    return merged.sort_values(["backbone", "method", "is_avg", "dataset", "shots"]).drop(columns="is_avg").reset_index(drop=True)
