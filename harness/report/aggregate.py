"""Runs -> per-dataset cells and the leaderboard (averages over datasets, flags, ranks): the one
place numbers are aggregated, so the HTML, the exports and `harness check` agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.published import display_name, published_frame
from harness.stats import Z95, clip_percent, interval, ranks, t_interval
from harness.store import connect

CELL = ["suite", "backbone", "method", "dataset", "shots"]
SEED_MARK = "\u2020"  # dagger: fewer seeds than the grid's maximum
DATA_MARK = "\u2021"  # double dagger: datasets missing from the average
TIED_MARK = "\u2248"  # approximately equal: statistically tied with the column's best
ZERO_SHOT = "zero_shot"  # the reference that `gain` is measured against
# The one ranking rule: the leaderboard's order, the exports' `rank` columns, the critical-difference
# diagrams and `harness compare` all apply it (Demsar 2006, as the CD diagram needs).
RANK_RULE = (
    "Ranked by average rank: within every (dataset, shot count) pair the methods are ranked by top-1 "
    "(mean over seeds; 1 = best, ties share the average rank), and the ranks are averaged over the pairs; "
    "only methods with every dataset and seed at every shot count are ranked, and each critical-difference "
    "diagram applies the same rule to one shot count."
)


def load_runs(db: Path, published: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """All runs (with a `method` display name; the registry name kept as `base_method`) and, if asked, the
    published numbers, read from the shipped CSVs (so the report always shows the shipped numbers).
    Read-only: the database is opened read-only and never written, so a report works on a read-only
    folder, a full disk, or beside a running sweep."""
    db = Path(db)
    if not db.is_file():
        raise HarnessError(f"No run database at {db}. Run `harness run ...` first, or pass --db PATH (env HARNESS_DB).")
    with connect(db, read_only=True) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        if "runs" not in tables:
            raise HarnessError(f"{db} has no `runs` table: it is not a harness run database. Pass --db PATH.")
        runs = con.execute("SELECT * FROM runs").df()
    published = published_frame() if published else None
    runs["base_method"] = runs["method"]
    runs["method"] = [display_name(m, c) for m, c in zip(runs["base_method"], runs["config"])]
    runs["suite"] = runs["suite"].fillna("unknown")
    runs["protocol"] = runs["protocol"].fillna("fewshot") if "protocol" in runs else "fewshot"  # older databases: fewshot
    return runs, published


def ok_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Successful runs, one per (cell, seed): the latest wins when configs differ; returns how many were superseded."""
    ok = runs[runs["status"] == "ok"].sort_values("finished_at", na_position="first")
    latest = ok.drop_duplicates(CELL + ["seed"], keep="last")
    return latest, len(ok) - len(latest)


def per_dataset(ok: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std, seed count and 95 % interval (lo, hi) of top-1 per (suite, backbone, method,
    dataset, shots): the t-interval over seeds, or for a single run the Wilson interval of its test set."""
    grouped = ok.groupby(CELL)
    out = grouped["top1"].agg(mean="mean", std="std", n_seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    bounds = [interval(g["top1"], _n_test(g)) for _, g in grouped]  # groupby order: the rows of `out`
    out["lo"] = [b[0] for b in bounds]
    out["hi"] = [b[1] for b in bounds]
    return out


def _n_test(runs: pd.DataFrame) -> int | None:
    n = runs["n_test"].iloc[0] if "n_test" in runs and len(runs) else None
    return int(n) if n is not None and pd.notna(n) and n > 0 else None


def average_interval(runs: pd.DataFrame, n_datasets: int) -> tuple[float, float]:
    """95 % interval of an average over datasets. Seeds that cover every dataset give one average
    each: a t-interval over them. With one such seed, the datasets' binomial errors are combined
    (normal approximation to the variance of a mean of independent accuracies)."""
    per_seed = runs.groupby("seed").agg(avg=("top1", "mean"), n=("dataset", "nunique"))
    complete = per_seed[per_seed["n"] == n_datasets]["avg"]
    if not len(complete):
        return math.nan, math.nan
    rows = runs[runs["seed"].isin(complete.index)].groupby("dataset").agg(top1=("top1", "mean"), n_test=("n_test", "first"))
    n = pd.to_numeric(rows["n_test"], errors="coerce").to_numpy(dtype=float)
    mean = float(complete.mean())
    lo, hi = t_interval(complete) if len(complete) >= 2 else (mean, mean)
    if (n > 0).all():  # the datasets' binomial errors combined: the floor of any interval of this average
        p = rows["top1"].to_numpy(dtype=float) / 100
        half = 100 * Z95 * math.sqrt(float((p * (1 - p) / n).sum())) / len(rows)
        lo, hi = min(lo, mean - half), max(hi, mean + half)
    elif len(complete) < 2:
        return math.nan, math.nan
    return clip_percent(lo, hi)


@dataclass
class Aggregate:
    runs: pd.DataFrame
    ok: pd.DataFrame
    failed: pd.DataFrame
    published: pd.DataFrame
    datasets: pd.DataFrame  # per_dataset, with expected_seeds
    leaderboard: pd.DataFrame  # per (suite, backbone, method, shots): averages over datasets, flags, rank
    grids: dict = field(default_factory=dict)  # (suite, backbone) -> {"datasets": [...], "seeds": [...], "shots": [...]}
    superseded: int = 0


def aggregate(runs: pd.DataFrame, published: pd.DataFrame) -> Aggregate:
    ok, superseded = ok_runs(runs)
    failed = runs[runs["status"] != "ok"].copy()
    grids = {}
    for (suite, backbone), group in runs.groupby(["suite", "backbone"]):
        grids[(suite, backbone)] = {
            "datasets": sorted(group["dataset"].unique()),
            "seeds": sorted(int(s) for s in group["seed"].unique()),
            "shots": sorted(int(s) for s in group.loc[group["shots"] > 0, "shots"].unique()),
        }
    datasets = per_dataset(ok)
    datasets["expected_seeds"] = [len(grids[(s, b)]["seeds"]) for s, b in zip(datasets["suite"], datasets["backbone"])]
    datasets["complete"] = datasets["n_seeds"] >= datasets["expected_seeds"]
    rows = []
    for (suite, backbone, method, shots), cell in datasets.groupby(["suite", "backbone", "method", "shots"]):
        expected = grids[(suite, backbone)]["datasets"]
        present = sorted(cell["dataset"])
        seeds = ok[(ok.suite == suite) & (ok.backbone == backbone) & (ok.method == method) & (ok.shots == shots)]
        per_seed = seeds.groupby("seed").agg(avg=("top1", "mean"), n=("dataset", "nunique"))
        complete = per_seed[per_seed["n"] == len(expected)]["avg"]
        lo, hi = average_interval(seeds, len(expected))
        rows.append(
            {
                "suite": suite,
                "backbone": backbone,
                "method": method,
                "shots": int(shots),
                "mean": cell["mean"].mean(),
                "std": complete.std() if len(complete) > 1 else (0.0 if len(complete) == 1 else math.nan),
                "lo": lo,
                "hi": hi,
                "n_seeds": int(cell["n_seeds"].min()),
                "expected_seeds": len(grids[(suite, backbone)]["seeds"]),
                "n_datasets": len(present),
                "expected_datasets": len(expected),
                "missing_datasets": ",".join(d for d in expected if d not in present),
            }
        )
    board = pd.DataFrame(rows, columns=[
        "suite", "backbone", "method", "shots", "mean", "std", "lo", "hi", "n_seeds", "expected_seeds",
        "n_datasets", "expected_datasets", "missing_datasets",
    ])
    board["complete"] = (board["n_seeds"] >= board["expected_seeds"]) & (board["n_datasets"] >= board["expected_datasets"])
    board["flag"] = [
        (SEED_MARK if s < es else "") + (DATA_MARK if d < ed else "")
        for s, es, d, ed in zip(board["n_seeds"], board["expected_seeds"], board["n_datasets"], board["expected_datasets"])
    ]
    board = rank_board(board, datasets)
    board = board.sort_values(["suite", "backbone", "shots", "mean"], ascending=[True, True, True, False]).reset_index(drop=True)
    return Aggregate(runs, ok, failed, published, datasets, board, grids, superseded)


def _average_ranks(per_ds: pd.DataFrame, methods: list[str], blocks: list[str]) -> pd.Series:
    """RANK_RULE on one set of methods: mean over seeds per block, ranked within each block (1 =
    best, ties share the average rank), averaged over the blocks every method has."""
    table = per_ds[per_ds["method"].isin(methods)].pivot_table(index=blocks, columns="method", values="mean").reindex(columns=methods).dropna()
    if not len(methods) or table.empty:
        return pd.Series(dtype=float)
    return pd.Series(ranks(methods, table.to_numpy()).avg_rank, index=methods)


def _positions(avg_rank: pd.Series) -> pd.Series:
    return avg_rank.rank(method="min").astype(int)


def rank_board(board: pd.DataFrame, per_ds: pd.DataFrame) -> pd.DataFrame:
    """Per column (suite, backbone, shots): `avg_rank` over datasets and `rank` among the column's
    complete methods (the critical-difference diagram's numbers). Per section: `overall_avg_rank`
    and `overall_rank` over every (dataset, shots) pair among the methods complete at every shot
    count (the leaderboard's order); `gain` over the zero-shot reference's average, in points."""
    board = board.copy()
    for col in ("avg_rank", "rank", "overall_avg_rank", "overall_rank", "gain"):
        board[col] = pd.NA if "rank" in col else math.nan
    for (suite, backbone), section in board.groupby(["suite", "backbone"]):
        few = section[section["shots"] > 0]
        ds = per_ds[(per_ds.suite == suite) & (per_ds.backbone == backbone) & (per_ds.shots > 0)]
        for shots, column in few.groupby("shots"):
            methods = sorted(column.loc[column["complete"], "method"])
            avg = _average_ranks(ds[ds.shots == shots], methods, ["dataset"])
            for method, value in avg.items():
                at = column.index[column["method"] == method]
                board.loc[at, "avg_rank"] = value
                board.loc[at, "rank"] = _positions(avg)[method]
        shot_counts = set(few["shots"])
        complete = few[few["complete"]].groupby("method")["shots"].agg(set)
        everywhere = sorted(m for m, s in complete.items() if s == shot_counts)
        avg = _average_ranks(ds, everywhere, ["dataset", "shots"])
        for method, value in avg.items():
            at = section.index[section["method"] == method]
            board.loc[at, "overall_avg_rank"] = value
            board.loc[at, "overall_rank"] = _positions(avg)[method]
        reference = section[(section["shots"] == 0) & (section["method"] == ZERO_SHOT)]["mean"]
        if len(reference):
            board.loc[few.index, "gain"] = few["mean"] - float(reference.iloc[0])
    return board.astype({"avg_rank": "Float64", "overall_avg_rank": "Float64", "rank": "Int64", "overall_rank": "Int64", "gain": float})


def method_order(board: pd.DataFrame) -> list[str]:
    """References (shots=0) first, then the ranked methods by RANK_RULE, then the others by mean accuracy."""
    refs = sorted(board.loc[board["shots"] == 0, "method"].unique())
    few = board[(board["shots"] > 0) & ~board["method"].isin(refs)]
    overall = few.groupby("method")["overall_avg_rank"].agg(lambda r: pd.to_numeric(r, errors="coerce").min())
    mean_acc = few.groupby("method")["mean"].mean()
    key = {m: (0, overall[m], -mean_acc[m]) if pd.notna(overall.get(m)) else (1, 0, -mean_acc[m]) for m in mean_acc.index}
    return refs + sorted(key, key=key.get)
