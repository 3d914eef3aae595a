"""`harness report`: one self-contained index.html (tables, inline SVG plots, provenance) plus
leaderboard.csv / .md / .tex exports, all from the DuckDB run store and the `published` table.

Numbers are aggregated in one place (`aggregate`), so the HTML, the exports and `harness check`
agree. A cell that lacks seeds or datasets is flagged, never silently averaged: its value is the
mean over what exists, and the flag says what is missing. Runs with shots=0 (zero-shot) are a
flat reference across shot counts, not a competitor, and are not ranked.
"""

from __future__ import annotations

import io
import json
import math
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

import harness
from harness.errors import HarnessError
from harness.published import display_name, published_frame
from harness.store import connect

CELL = ["suite", "backbone", "method", "dataset", "shots"]
SEED_MARK = "\u2020"  # dagger: fewer seeds than the grid's maximum
DATA_MARK = "\u2021"  # double dagger: datasets missing from the average
PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "duckdb", "pandas", "matplotlib", "jinja2")


# ----------------------------------------------------------------------------------------------
# Loading and aggregation (shared with harness.regression)
# ----------------------------------------------------------------------------------------------


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
    return runs, published


def ok_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Successful runs, one per (cell, seed): the latest wins when configs differ; returns how many were superseded."""
    ok = runs[runs["status"] == "ok"].sort_values("finished_at", na_position="first")
    latest = ok.drop_duplicates(CELL + ["seed"], keep="last")
    return latest, len(ok) - len(latest)


def per_dataset(ok: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and seed count of top-1 per (suite, backbone, method, dataset, shots)."""
    grouped = ok.groupby(CELL)["top1"]
    out = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


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
        rows.append(
            {
                "suite": suite,
                "backbone": backbone,
                "method": method,
                "shots": int(shots),
                "mean": cell["mean"].mean(),
                "std": complete.std() if len(complete) > 1 else (0.0 if len(complete) == 1 else math.nan),
                "n_seeds": int(cell["n_seeds"].min()),
                "expected_seeds": len(grids[(suite, backbone)]["seeds"]),
                "n_datasets": len(present),
                "expected_datasets": len(expected),
                "missing_datasets": ",".join(d for d in expected if d not in present),
            }
        )
    board = pd.DataFrame(rows, columns=[
        "suite", "backbone", "method", "shots", "mean", "std", "n_seeds", "expected_seeds",
        "n_datasets", "expected_datasets", "missing_datasets",
    ])
    board["complete"] = (board["n_seeds"] >= board["expected_seeds"]) & (board["n_datasets"] >= board["expected_datasets"])
    board["flag"] = [
        (SEED_MARK if s < es else "") + (DATA_MARK if d < ed else "")
        for s, es, d, ed in zip(board["n_seeds"], board["expected_seeds"], board["n_datasets"], board["expected_datasets"])
    ]
    # Rank complete few-shot cells within each (suite, backbone, shots) column; references (shots=0) are not ranked.
    rankable = board["complete"] & (board["shots"] > 0)
    board["rank"] = pd.NA
    board.loc[rankable, "rank"] = (
        board[rankable].groupby(["suite", "backbone", "shots"])["mean"].rank(ascending=False, method="min").astype(int)
    )
    board = board.sort_values(["suite", "backbone", "shots", "mean"], ascending=[True, True, True, False]).reset_index(drop=True)
    return Aggregate(runs, ok, failed, published, datasets, board, grids, superseded)


def method_order(board: pd.DataFrame) -> list[str]:
    """References (shots=0) first, then methods by mean rank over shot columns (best first), then unranked."""
    refs = sorted(board.loc[board["shots"] == 0, "method"].unique())
    few = board[(board["shots"] > 0) & ~board["method"].isin(refs)]
    mean_rank = few.groupby("method")["rank"].agg(lambda r: pd.to_numeric(r, errors="coerce").mean())
    mean_acc = few.groupby("method")["mean"].mean()
    key = {m: (0 if pd.notna(mean_rank.get(m)) else 1, mean_rank.get(m) if pd.notna(mean_rank.get(m)) else 0, -mean_acc[m]) for m in mean_acc.index}
    return refs + sorted(key, key=key.get)


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, inline SVG)
# ----------------------------------------------------------------------------------------------


def _colours(methods: list[str]) -> dict[str, str]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
    return {m: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, m in enumerate(sorted(methods))}


def _svg(fig, name: str) -> Markup:
    """Inline SVG with text kept as text, and ids salted by figure name so several SVGs share one page safely."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return Markup(text[text.index("<svg"):])


def _shot_axis(ax, shots: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(s) for s in shots])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def curves_svg(agg: Aggregate, suite: str, backbone: str, colours: dict[str, str]) -> Markup | None:
    """Accuracy vs shots: the average first, then each dataset; ours solid (± std band), published dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    grid = agg.grids[(suite, backbone)]
    shots = grid["shots"]
    if not shots:  # zero-shot only: nothing to draw against shots
        return None
    board = agg.leaderboard[(agg.leaderboard.suite == suite) & (agg.leaderboard.backbone == backbone)]
    per_ds = agg.datasets[(agg.datasets.suite == suite) & (agg.datasets.backbone == backbone)]
    pub = agg.published[agg.published.backbone == backbone]
    panels = [("average", board)] + [(d, per_ds[per_ds.dataset == d]) for d in grid["datasets"]]
    # A published average is drawn only beside an average over the same datasets.
    same_datasets = set(grid["datasets"]) == set(pub.loc[pub.dataset != "average", "dataset"])
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    xs = shots
    used = []
    for ax, (title, frame) in zip(axes.flat, panels):
        for method in sorted(frame["method"].unique()):
            mine = frame[frame.method == method].sort_values("shots")
            colour = colours[method]
            theirs = pub[(pub.method == method) & (pub.dataset == title)] if title != "average" or same_datasets else pub.iloc[:0]
            if (mine["shots"] == 0).all():  # zero-shot reference: flat line across the shot axis
                value = mine["mean"].iloc[0]
                ax.axhline(value, color=colour, lw=1.4, ls=(0, (1, 1.5)))
                ref = theirs[theirs.shots == 0]["top1"]
                if len(ref):
                    ax.axhline(ref.iloc[0], color=colour, lw=1.0, ls="--", alpha=0.7)
            else:
                mine = mine[mine.shots > 0]
                ax.plot(mine["shots"], mine["mean"], color=colour, marker="o", ms=3.5, lw=1.8)
                ax.fill_between(mine["shots"], mine["mean"] - mine["std"].fillna(0), mine["mean"] + mine["std"].fillna(0), color=colour, alpha=0.15, lw=0)
                theirs = theirs[theirs.shots > 0].sort_values("shots")
                if len(theirs):
                    ax.plot(theirs["shots"], theirs["top1"], color=colour, ls="--", marker="x", ms=4, lw=1.1, alpha=0.8)
            used.append(method)
        ax.set_title("Average over datasets" if title == "average" else title, fontsize=10, fontweight="bold" if title == "average" else "normal")
        _shot_axis(ax, xs)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)", fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("shots per class", fontsize=9)
    handles = [Line2D([], [], color=colours[m], marker="o", ms=4, lw=2, label=m) for m in sorted(set(used))]
    handles += [
        Line2D([], [], color="#555", lw=1.8, label="ours (mean \u00b1 std)"),
        Line2D([], [], color="#555", lw=1.1, ls="--", marker="x", label="published"),
        Line2D([], [], color="#555", lw=1.4, ls=(0, (1, 1.5)), label="0-shot reference"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06 if nrows > 1 else 0.1, 1, 1))
    return _svg(fig, f"curves-{suite}-{backbone}")


def efficiency(agg: Aggregate, suite: str, backbone: str) -> tuple[pd.DataFrame, int | None]:
    """Per method at the largest shot count: average accuracy, trainable params, train time, peak memory."""
    ok = agg.ok[(agg.ok.suite == suite) & (agg.ok.backbone == backbone)]
    shots = agg.grids[(suite, backbone)]["shots"]
    k = max(shots) if shots else None
    sel = ok[(ok.shots == k) | (ok.shots == 0)]
    board = agg.leaderboard[(agg.leaderboard.suite == suite) & (agg.leaderboard.backbone == backbone)]
    rows = []
    for method, group in sel.groupby("method"):
        cell = board[(board.method == method) & (board.shots == group["shots"].iloc[0])]
        rows.append({
            "method": method,
            "shots": int(group["shots"].iloc[0]),
            "accuracy": cell["mean"].iloc[0] if len(cell) else math.nan,
            "flag": cell["flag"].iloc[0] if len(cell) else "",
            "trainable_params": float(group["trainable_params"].median()),
            "train_seconds": float(group["train_seconds"].mean()),
            "peak_mem_mb": float(group["peak_mem_mb"].mean()),
        })
    frame = pd.DataFrame(rows, columns=["method", "shots", "accuracy", "flag", "trainable_params", "train_seconds", "peak_mem_mb"])
    return frame.sort_values("accuracy", ascending=False).reset_index(drop=True), k


def efficiency_svg(frame: pd.DataFrame, k: int | None, name: str, colours: dict[str, str]) -> Markup | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if frame.empty:
        return None
    specs = [("trainable_params", "trainable parameters", "symlog"), ("train_seconds", "train time per run (s)", "symlog"), ("peak_mem_mb", "peak memory (MB)", "linear")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (col, label, scale) in zip(axes, specs):
        for _, row in frame.iterrows():
            ax.scatter(row[col], row["accuracy"], s=42, color=colours[row["method"]], zorder=3)
            ax.annotate(row["method"], (row[col], row["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if scale == "symlog":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel(f"avg top-1 (%), {k}-shot" if k else "avg top-1 (%)", fontsize=9)
    fig.tight_layout()
    return _svg(fig, f"efficiency-{name}")


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _group_key(key: tuple[str, str]) -> tuple:
    """Standard suite first, the demo last; backbones in the papers' order (B/16, B/32, L/14), others after."""
    suite, backbone = key
    papers = ["ViT-B-16", "ViT-B-32", "ViT-L-14"]
    return (suite != "standard", suite == "demo", suite, papers.index(backbone) if backbone in papers else len(papers), backbone)


def _groups(board: pd.DataFrame):
    groups = dict(list(board.groupby(["suite", "backbone"], sort=True)))
    for suite, backbone in sorted(groups, key=_group_key):
        cells = groups[(suite, backbone)]
        shots = sorted(int(k) for k in cells.loc[cells.shots > 0, "shots"].unique()) or [0]  # zero-shot only: one column
        yield suite, backbone, cells, shots, method_order(cells)


def leaderboard_markdown(board: pd.DataFrame) -> str:
    parts = ["# Leaderboard", "",
             f"Average top-1 (%) over datasets, mean \u00b1 std over seeds. {SEED_MARK} fewer seeds than the grid's maximum; "
             f"{DATA_MARK} datasets missing from the average. Bold: best, italic: second (complete cells only).", ""]
    for suite, backbone, cells, shots, methods in _groups(board):
        table = wide_table(cells, methods, shots, with_rank=True)
        parts += [f"## {backbone} ({suite} suite)", "", "| rank | method | " + " | ".join(table["header"]) + " |",
                  "|---:|:---|" + "---:|" * len(shots)]
        for row in table["rows"]:
            texts = []
            for c in row["cells"]:
                if "mean" not in c:
                    texts.append(c["text"])
                    continue
                value = f"{c['mean']} {c['std']}".strip() + c["flag"]
                texts.append(f"**{value}**" if "best" in c["cls"] else f"*{value}*" if "second" in c["cls"] else value)
            name = f"{row['method']} (0-shot ref.)" if row["reference"] else row["method"]
            parts.append(f"| {row['rank']} | {name} | " + " | ".join(texts) + " |")
        parts.append("")
    return "\n".join(parts)


def leaderboard_latex(board: pd.DataFrame) -> str:
    """booktabs tabular(s), one per backbone: best bold, second underlined, specials escaped."""
    out = ["% Generated by `harness report`: average top-1 (%) over datasets, mean $\\pm$ std over seeds.",
           "% Needs \\usepackage{booktabs}. \\textsuperscript{\\dag}: fewer seeds; \\textsuperscript{\\ddag}: datasets missing.", ""]
    marks = {SEED_MARK: r"\textsuperscript{\dag}", DATA_MARK: r"\textsuperscript{\ddag}"}
    for suite, backbone, cells, shots, methods in _groups(board):
        table = wide_table(cells, methods, shots, with_rank=False)
        out += [f"% {latex_escape(backbone)} ({latex_escape(suite)} suite)", r"\begin{tabular}{l" + "c" * len(shots) + "}", r"\toprule",
                f"\\multicolumn{{{len(shots) + 1}}}{{l}}{{\\textit{{{latex_escape(backbone)} ({latex_escape(suite)} suite)}}}} \\\\",
                "Method & " + " & ".join(f"{k}-shot" for k in shots) + r" \\", r"\midrule"]
        for i, row in enumerate(table["rows"]):
            texts = []
            for c in row["cells"]:
                if "mean" not in c:
                    texts.append("--")
                    continue
                value = c["mean"]
                value = rf"\bfseries {value}" if "best" in c["cls"] else rf"\underline{{{value}}}" if "second" in c["cls"] else value
                value = "{" + value + "}"
                if c["std"]:
                    value += r"\,{\scriptsize$\pm$" + c["std"].lstrip("\u00b1") + "}"
                value += "".join(marks[f] for f in c["flag"])
                texts.append(value)
            name = latex_escape(row["method"]) + (" (0-shot)" if row["reference"] else "")
            out.append(f"{name} & " + " & ".join(texts) + r" \\")
            following = table["rows"][i + 1:]
            if row["reference"] and following and not following[0]["reference"]:
                out.append(r"\midrule")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Provenance and rendering
# ----------------------------------------------------------------------------------------------


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


def provenance(agg: Aggregate) -> dict:
    from methods import REGISTRY

    runs = agg.runs
    methods = []
    for cls in REGISTRY.values():
        methods.append({"name": cls.name, "paper": cls.paper, "deviations": cls.deviations,
                        "defaults": ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "\u2013"})
    unregistered = sorted(set(runs["base_method"]) - set(REGISTRY))
    overrides, hparams = [], []
    for (suite, method), group in runs.groupby(["suite", "method"]):
        configs = [json.loads(c) if isinstance(c, str) else (c or {}) for c in group["config"]]
        ov = sorted({json.dumps(c.get("suite_overrides") or {}, sort_keys=True) for c in configs})
        hp = sorted({json.dumps(c.get("hparams") or {}, sort_keys=True) for c in configs})
        if any(o != "{}" for o in ov):
            overrides.append({"suite": suite, "method": method, "overrides": "; ".join(ov)})
        subsets = _counts(pd.Series([subset_source(c) for c in configs]))
        search = _counts(pd.Series([(c.get("hparams") or {}).get("search_split", "\u2013") for c in configs]))
        hparams.append({"suite": suite, "method": method, "hparams": "; ".join(hp), "subsets": subsets, "search": search})
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
    return {"methods": methods, "unregistered": unregistered, "overrides": overrides, "hparams": hparams,
            "groups": groups, "versions": versions}


def render(db: Path, out: Path) -> dict[str, Path]:
    """Write index.html and leaderboard.{csv,md,tex} under `out`; returns the written paths."""
    runs, published = load_runs(db)
    if runs.empty:
        raise HarnessError(f"The run database {db} holds no runs yet. Run `harness run ...` first.")
    agg = aggregate(runs, published)
    colours = _colours(sorted(runs["method"].unique()))
    sections = []
    for suite, backbone, cells, shots, methods in _groups(agg.leaderboard):
        per_ds = agg.datasets[(agg.datasets.suite == suite) & (agg.datasets.backbone == backbone)]
        eff, k = efficiency(agg, suite, backbone)
        sections.append({
            "id": f"{suite}-{backbone}".replace("/", "-"),
            "suite": suite, "backbone": backbone, "shots": shots,
            "grid": agg.grids[(suite, backbone)],
            "leaderboard": wide_table(cells, methods, shots, with_rank=True),
            "datasets": [(d, wide_table(per_ds[per_ds.dataset == d], methods, shots, with_rank=False)) for d in agg.grids[(suite, backbone)]["datasets"]],
            "curves": curves_svg(agg, suite, backbone, colours),
            "efficiency": eff.to_dict("records"), "efficiency_k": k,
            "efficiency_svg": efficiency_svg(eff, k, f"{suite}-{backbone}", colours),
        })
    gaps = gap_table(agg)
    gap_summary = []
    for (backbone, method), group in gaps.groupby(["backbone", "method"], sort=False):
        by_shots = group.groupby("shots")["gap"].agg(["mean", "count"])
        gap_summary.append({"backbone": backbone, "method": method,
                            "cells": {int(k): (v["mean"], int(v["count"])) for k, v in by_shots.iterrows()}})
    gap_shots = sorted({int(k) for k in gaps["shots"].unique()})
    failed = agg.failed.sort_values(["suite", "backbone", "method", "dataset", "shots", "seed"])
    failed = [{**r, "error_line": (r["error"] or "").strip().splitlines()[0] if r["error"] else "", "error": r["error"] or ""}
              for r in failed.to_dict("records")]
    env = Environment(loader=PackageLoader("harness", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=2: "\u2013" if v is None or pd.isna(v) else f"{v:,.{d}f}"
    env.filters["count"] = lambda v: "\u2013" if v is None or pd.isna(v) else f"{int(v):,}"
    css = env.loader.get_source(env, "report.css")[0]
    html = env.get_template("report.html.j2").render(
        css=Markup(css), sections=sections, gaps=gaps.to_dict("records"), gap_summary=gap_summary, gap_shots=gap_shots, failed=failed, prov=provenance(agg),
        n_ok=len(agg.ok), n_runs=len(runs), n_failed=len(agg.failed), superseded=agg.superseded,
        seed_mark=SEED_MARK, data_mark=DATA_MARK, db=str(db), version=harness.__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        sources=sorted(published["source"].unique()) if len(published) else [],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": out / "index.html", "csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "tex": out / "leaderboard.tex"}
    written["html"].write_text(html, encoding="utf-8")
    agg.leaderboard.to_csv(written["csv"], index=False, float_format="%.4f")
    written["md"].write_text(leaderboard_markdown(agg.leaderboard), encoding="utf-8")
    written["tex"].write_text(leaderboard_latex(agg.leaderboard), encoding="utf-8")
    return written


__all__ = ["render", "aggregate", "load_runs", "per_dataset", "ok_runs", "latex_escape"]
