"""The leaderboard's wide tables (methods x shots) and the reproduction gap against published numbers."""

from __future__ import annotations

import pandas as pd

from harness.cards import suite_cards
from harness.report.aggregate import SEED_MARK, Aggregate
from harness.report.significance import column_emphasis


def _cell_note(row) -> str:
    notes = []
    if row["n_seeds"] < row["expected_seeds"]:
        notes.append(f"{row['n_seeds']}/{row['expected_seeds']} seeds")
    if row.get("n_datasets", 1) < row.get("expected_datasets", 1):
        notes.append(f"{row['n_datasets']}/{row['expected_datasets']} datasets (missing: {row['missing_datasets']})")
    return "; ".join(notes)


def interval_text(lo: float, hi: float) -> str:
    return "" if pd.isna(lo) or pd.isna(hi) else f"[{lo:.1f}, {hi:.1f}]"


def wide_table(cells: pd.DataFrame, methods: list[str], shots: list[int], with_rank: bool, ok: pd.DataFrame) -> dict:
    """methods x shots as a template-friendly dict; zero-shot rows repeat their value in every column;
    with_rank adds each method's rank, average rank (RANK_RULE) and gain over zero-shot (mean over the
    shot columns it has).
    Each value carries its 95 % interval; emphasis follows significance (`column_emphasis`) over the
    runs `ok` behind the cells: 'best' only when significantly ahead of every other entry, 'tied'
    for the entries not significantly apart from the top one."""
    header = [f"{k}-shot" for k in shots]
    emphasis = {
        k: column_emphasis(ok[ok.shots == k], cells[(cells.shots == k) & cells["complete"]].set_index("method")["mean"].to_dict())
        for k in shots
    }
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
            cls = "ref" if reference else emphasis[k].get(method, "")
            note = _cell_note(row)
            single = row["n_seeds"] < 2  # one run has no spread over seeds: its interval is the test set's (Wilson)
            out["cells"].append({"mean": f"{row['mean']:.2f}", "std": "" if single or pd.isna(row["std"]) else f"\u00b1{row['std']:.2f}",
                                 "interval": interval_text(row.get("lo"), row.get("hi")),
                                 "flag": row.get("flag", "") or (SEED_MARK if row["n_seeds"] < row["expected_seeds"] else ""),
                                 "cls": cls + (" flagged" if note else ""), "note": note})
        if with_rank and not reference:
            overall = pd.to_numeric(mine["overall_avg_rank"], errors="coerce").dropna()
            gains = pd.to_numeric(mine["gain"], errors="coerce").dropna()
            out["rank"] = str(int(mine["overall_rank"].dropna().iloc[0])) if len(overall) else ""
            out["avg_rank"] = f"{overall.iloc[0]:.2f}" if len(overall) else "\u2013"
            out["gain"] = f"{gains.mean():+.2f}" if len(gains) else "\u2013"
        rows.append(out)
    return {"header": header, "rows": rows}


def gap_table(agg: Aggregate) -> pd.DataFrame:
    """Ours minus published wherever both exist (per dataset, and the average when our average is complete)."""
    cols = ["backbone", "method", "dataset", "shots", "mean", "std", "lo", "hi", "n_seeds"]
    ours = agg.datasets[cols]
    pub = agg.published.rename(columns={"top1": "published"})
    # Our average is comparable with a published one only when it covers exactly the published datasets
    # (a paper that publishes its average alone averages the 11 standard datasets).
    covered = pub[pub.dataset != "average"].groupby(["backbone", "method", "shots"])["dataset"].agg(frozenset)
    standard = frozenset(c.name for c in suite_cards("standard"))
    board = agg.leaderboard[agg.leaderboard.n_datasets >= agg.leaderboard.expected_datasets]
    keep = [frozenset(agg.grids[(s, b)]["datasets"]) == covered.get((b, m, k), standard) for s, b, m, k in
            zip(board["suite"], board["backbone"], board["method"], board["shots"])]
    avg = board[pd.Series(keep, index=board.index, dtype=bool)].assign(dataset="average")[cols]
    ours = pd.concat([ours, avg], ignore_index=True)
    merged = ours.merge(pub[["backbone", "method", "dataset", "shots", "published", "source"]], on=["backbone", "method", "dataset", "shots"])
    merged["gap"] = merged["mean"] - merged["published"]
    # Is the published number inside our 95 % interval? (NA when we have no interval)
    merged["inside"] = [pd.NA if pd.isna(lo) else bool(lo <= p <= hi) for lo, hi, p in zip(merged["lo"], merged["hi"], merged["published"])]
    merged["is_avg"] = merged["dataset"] == "average"
    return merged.sort_values(["backbone", "method", "is_avg", "dataset", "shots"]).drop(columns="is_avg").reset_index(drop=True)
