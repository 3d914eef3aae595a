"""`harness check`: compare the stored numbers with a committed baseline, so CI stops a change that
silently moves them.

Compared per (method display name, dataset, backbone, shots): the mean top-1 over seeds. The
tolerance of each entry, in absolute points, comes from the seed spread:

    tolerance = max(floor, K * max(std_baseline, std_current)),  K = 2

(std = sample standard deviation over seeds, 0 with one seed; floor defaults to 1.0 point). A drop
larger than the tolerance is a regression; a rise larger than it an improvement (reported, not an
error); a baseline entry without current numbers, or with fewer seeds, is missing. Exit 1 on any
regression or missing entry. Entries that are new (not in the baseline) are listed, and only
`--update` writes them in: the baseline changes on purpose, never as a side effect.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.report import load_runs, ok_runs, per_dataset

KEY = ["method", "dataset", "backbone", "shots"]
K_STD = 2.0
DEFAULT_FLOOR = 1.0
DEFAULT_BASELINE = Path("results/baselines/demo.csv")
FORMULA = "tolerance = max(floor, {k:g} x max(std_baseline, std_current)) points, std over seeds; floor = {floor:g}"


@dataclass
class CheckResult:
    table: pd.DataFrame  # one row per key with a status: ok | regression | improvement | missing | new

    @property
    def failed(self) -> bool:
        return bool(self.table["status"].isin(["regression", "missing"]).any())

    def count(self, status: str) -> int:
        return int((self.table["status"] == status).sum())


def current_numbers(db: Path) -> pd.DataFrame:
    runs, _ = load_runs(db, published=False)
    ok, _ = ok_runs(runs)
    if ok.empty:
        raise HarnessError(f"The run database {db} holds no successful runs to check. Run `harness run ...` first.")
    frame = per_dataset(ok)[KEY + ["mean", "std", "n_seeds"]]
    frame = pd.concat([frame, target_numbers(db, runs)], ignore_index=True)
    frame = frame.dropna(subset=["mean"])  # a protocol headline that does not apply (a closed-set method's new classes)
    return frame.sort_values(KEY).reset_index(drop=True)


def target_numbers(db: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Every stored per-target number of the generalisation protocols, as entries `dataset:target`
    (e.g. `demo_shapes:new`) of the run's method row, mean and std over seeds."""
    from harness.report.protocols import load_evaluations

    ev = load_evaluations(db, runs)
    if ev.empty:
        return pd.DataFrame(columns=KEY + ["mean", "std", "n_seeds"])
    ev = ev.merge(runs[["config_hash", "method", "shots"]], on="config_hash")
    ev["dataset"] = ev["dataset"] + ":" + ev["target"]
    out = ev.groupby(KEY)["top1"].agg(mean="mean", std="std", n_seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def write_baseline(db: Path, baseline: Path, allow_partial: bool = False) -> int:
    """Write the current numbers as the baseline; refuse a sweep with missing cells unless asked."""
    frame = current_numbers(db)
    gaps = missing_cells(frame)
    if gaps and not allow_partial:
        shown = "\n  ".join(gaps[:10]) + (f"\n  ... and {len(gaps) - 10} more" if len(gaps) > 10 else "")
        raise HarnessError(
            f"The runs in {db} are not a complete grid ({len(gaps)} cell(s) missing or with fewer seeds), so the baseline "
            f"would stop checking them:\n  {shown}\nFinish the sweep (the same `harness run` command resumes it), or "
            "pass --allow-partial to write the partial baseline on purpose."
        )
    baseline.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(baseline, index=False, float_format="%.4f")
    return len(frame)


def read_baseline(baseline: Path) -> pd.DataFrame:
    """The baseline, every value checked: a blank, `n/a` or non-finite mean would switch the gate off
    for its entry, so any value that is not what its column holds stops the check (exit 2) naming the
    file, the row (as a spreadsheet numbers it, the header being row 1) and the column."""
    if not baseline.is_file():
        raise HarnessError(
            f"No baseline file at {baseline}. Create it on purpose with `harness check --update --baseline {baseline}` "
            "after a sweep whose numbers you trust, or pass --baseline FILE."
        )
    raw = baseline.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        text = raw.decode("utf-8")
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise HarnessError(f"The baseline {baseline} is not a text CSV file (binary content). Regenerate it with "
                           "`harness check --update`, or pass the right --baseline.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HarnessError(f"The baseline {baseline} is not a readable CSV ({str(exc).strip().splitlines()[0]}). "
                           "Regenerate it with `harness check --update`.") from None
    missing = [c for c in KEY + ["mean"] if c not in frame.columns]
    if missing:
        raise HarnessError(f"The baseline {baseline} lacks column(s) {', '.join(missing)}; regenerate it with `harness check --update`.")
    for col, default in (("std", "0"), ("n_seeds", "1")):
        frame[col] = frame[col].replace("", default) if col in frame.columns else default
    out = frame[KEY + ["mean", "std", "n_seeds"]].copy()
    checks = {"shots": (int, 0, None), "mean": (float, 0, 100), "std": (float, 0, None), "n_seeds": (int, 1, None)}
    for col, (kind, low, high) in checks.items():
        values = []
        for i, value in enumerate(out[col]):
            number = _parse(value, kind)
            if number is None or number < low or (high is not None and number > high):
                span = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise HarnessError(
                    f"The baseline {baseline}, row {i + 2}, column '{col}': {value!r} is not {'an integer' if kind is int else 'a finite number'} "
                    f"{span}. A baseline entry without a number would not be checked; fix the row or regenerate the file "
                    "with `harness check --update`."
                )
            values.append(number)
        out[col] = values
    for col in ("method", "dataset", "backbone"):
        blank = out.index[out[col].str.strip() == ""]
        if len(blank):
            raise HarnessError(f"The baseline {baseline}, row {blank[0] + 2}, column '{col}' is empty.")
    repeated = out.duplicated(KEY, keep=False)
    if repeated.any():
        row = out[repeated].iloc[0]
        raise HarnessError(f"The baseline {baseline} has {int(repeated.sum())} rows for the same entry (e.g. {row['method']}, "
                           f"{row['dataset']}, {row['backbone']}, {row['shots']} shots); keep one per entry.")
    return out


def _parse(value: str, kind: type) -> float | int | None:
    """`value` as `kind` when it is a finite number of that kind, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        return None
    return int(number) if kind is int else number


def missing_cells(current: pd.DataFrame) -> list[str]:
    """What a sweep lacks to be a complete grid, per backbone: a (method, dataset, shots) cell that
    other methods have and this one does not, or one with fewer seeds than the most seeded cell
    (a failed or interrupted run). Protocol targets (`dataset:target`) are left out."""
    rows = current[~current["dataset"].str.contains(":")]
    out = []
    for backbone, group in rows.groupby("backbone"):
        seeds = group["n_seeds"].max()
        datasets = sorted(set(group["dataset"]))
        for method, mine in group.groupby("method"):
            shots = sorted(set(group.loc[group["shots"] > 0, "shots"])) if (mine["shots"] > 0).any() else [0]
            have = {(d, k): n for d, k, n in zip(mine["dataset"], mine["shots"], mine["n_seeds"])}
            for d in datasets:
                for k in shots:
                    n = have.get((d, k), 0)
                    if n < seeds:
                        out.append(f"{method} {d} {k}-shot {backbone}: {n} of {seeds} seeds")
    return out


def compare(current: pd.DataFrame, baseline: pd.DataFrame, floor: float = DEFAULT_FLOOR, k: float = K_STD) -> CheckResult:
    merged = baseline.merge(current, on=KEY, how="outer", suffixes=("_base", "_now"), indicator=True)
    spread = merged[["std_base", "std_now"]].fillna(0.0).max(axis=1)
    merged["tolerance"] = (k * spread).clip(lower=floor)
    merged["delta"] = merged["mean_now"] - merged["mean_base"]
    status = pd.Series("ok", index=merged.index)
    status[merged["delta"] < -merged["tolerance"]] = "regression"
    status[merged["delta"] > merged["tolerance"]] = "improvement"
    status[(merged["_merge"] == "both") & (merged["n_seeds_now"] < merged["n_seeds_base"])] = "missing"
    status[merged["_merge"] == "left_only"] = "missing"
    status[merged["_merge"] == "right_only"] = "new"
    merged["status"] = status
    return CheckResult(merged.drop(columns="_merge").sort_values(KEY).reset_index(drop=True))


def describe(row) -> str:
    """One line naming method, dataset, shots, backbone and the size of the change."""
    where = f"{row['method']} on {row['dataset']}, {int(row['shots'])} shots ({row['backbone']})"
    if row["status"] == "regression":
        return f"{where}: dropped {-row['delta']:.2f} points ({row['mean_base']:.2f} -> {row['mean_now']:.2f}), tolerance {row['tolerance']:.2f}"
    if row["status"] == "improvement":
        return f"{where}: rose {row['delta']:.2f} points ({row['mean_base']:.2f} -> {row['mean_now']:.2f}), tolerance {row['tolerance']:.2f}"
    if row["status"] == "missing":
        if pd.isna(row["mean_now"]):
            return f"{where}: in the baseline ({row['mean_base']:.2f}) but not in the database"
        return f"{where}: only {int(row['n_seeds_now'])} of {int(row['n_seeds_base'])} seeds in the database"
    if row["status"] == "new":
        return f"{where}: {row['mean_now']:.2f}, not in the baseline"
    return f"{where}: {row['mean_now']:.2f} (baseline {row['mean_base']:.2f})"


def print_report(result: CheckResult, baseline: Path, floor: float, console: Console) -> None:
    colour = {"regression": "red", "missing": "red", "improvement": "green", "new": "cyan"}
    shown = result.table[result.table["status"] != "ok"]
    if len(shown):
        table = Table("status", "method", "dataset", "backbone", "shots", "baseline", "now", "change", "tolerance", title=f"harness check vs {baseline}")
        for _, r in shown.iterrows():
            fmt = lambda v: "–" if pd.isna(v) else f"{v:.2f}"  # noqa: E731
            change = "–" if pd.isna(r["delta"]) else f"{r['delta']:+.2f}"
            table.add_row(f"[{colour[r['status']]}]{r['status']}[/]", r["method"], r["dataset"], r["backbone"], str(int(r["shots"])),
                          fmt(r["mean_base"]), fmt(r["mean_now"]), change, fmt(r["tolerance"]))
        console.print(table)
    console.print(f"[dim]{FORMULA.format(k=K_STD, floor=floor)}[/dim]")
    for _, r in shown[shown["status"].isin(["regression", "missing"])].iterrows():
        console.print(f"[bold red]{r['status'].upper()}[/bold red] {describe(r)}", highlight=False)
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("ok", "regression", "improvement", "missing", "new"))
    console.print(counts)
    if result.count("missing"):
        console.print("[red]check failed.[/red] Entries of the baseline are missing from the database: run the sweep that "
                      "makes them (the same `harness run` command resumes it). `--update` would write a baseline without them.")
    elif result.failed:
        console.print("[red]check failed.[/red] If the change is intended, update the baseline in the same change: `harness check --update`.")
    elif result.count("new") or result.count("improvement"):
        console.print("check passed. New or improved entries are not in the baseline until you run `harness check --update`.")
    else:
        console.print("[green]check passed.[/green]")
