"""Plots as inline SVG (matplotlib): accuracy against shots, and accuracy against cost."""

from __future__ import annotations

import io
import math

import pandas as pd
from markupsafe import Markup

from harness.report.aggregate import Aggregate


FONT = 10  # points: at the page's widths every label renders at 11 px or more (checked in the browser test)


def method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method from Glasbey's palette for white backgrounds (colorcet.glasbey_dark):
    its first 30 colours are at least 20 CIELAB units apart, so no two methods share a hue."""
    import colorcet

    palette = colorcet.glasbey_dark
    return {m: palette[i % len(palette)] for i, m in enumerate(sorted(methods))}


def svg(fig, name: str) -> Markup:
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
    incomplete = set(board.loc[~board["complete"], "method"])
    for ax, (title, frame) in zip(axes.flat, panels):
        for method in sorted(frame["method"].unique()):
            mine = frame[frame.method == method].sort_values("shots")
            colour = colours[method]
            style = {"ls": (0, (4, 2)), "lw": 1.2, "alpha": 0.6} if method in incomplete else {"lw": 1.8}
            theirs = pub[(pub.method == method) & (pub.dataset == title)] if title != "average" or same_datasets else pub.iloc[:0]
            if (mine["shots"] == 0).all():  # zero-shot reference: flat line across the shot axis
                value = mine["mean"].iloc[0]
                ax.axhline(value, color=colour, lw=1.4, ls=(0, (1, 1.5)))
                ref = theirs[theirs.shots == 0]["top1"]
                if len(ref):
                    ax.axhline(ref.iloc[0], color=colour, lw=1.0, ls="--", alpha=0.7)
            else:
                mine = mine[mine.shots > 0]
                ax.plot(mine["shots"], mine["mean"], color=colour, marker="o", ms=3.5, **style)
                ax.fill_between(mine["shots"], mine["mean"] - mine["std"].fillna(0), mine["mean"] + mine["std"].fillna(0), color=colour, alpha=0.15, lw=0)
                theirs = theirs[theirs.shots > 0].sort_values("shots")
                if len(theirs):
                    ax.plot(theirs["shots"], theirs["top1"], color=colour, ls="--", marker="x", ms=4, lw=1.1, alpha=0.8)
            used.append(method)
        ax.set_title("Average over datasets" if title == "average" else title, fontsize=FONT + 1, fontweight="bold" if title == "average" else "normal")
        _shot_axis(ax, xs)
        ax.tick_params(labelsize=FONT)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)", fontsize=FONT)
    for ax in axes[-1, :]:
        ax.set_xlabel("shots per class", fontsize=FONT)
    handles = [Line2D([], [], color=colours[m], marker="o", ms=4, lw=2, label=m) for m in sorted(set(used) - incomplete)]
    handles += [Line2D([], [], color=colours[m], marker="o", ms=4, lw=1.2, ls=(0, (4, 2)), alpha=0.6, label=f"{m} (incomplete)")
                for m in sorted(set(used) & incomplete)]
    handles += [
        Line2D([], [], color="#555", lw=1.8, label="ours (mean \u00b1 std)"),
        Line2D([], [], color="#555", lw=1.1, ls="--", marker="x", label="published"),
        Line2D([], [], color="#555", lw=1.4, ls=(0, (1, 1.5)), label="0-shot reference"),
    ]
    fig.tight_layout()
    # Above the panels, outside every axes: it can never cover a curve or an axis label.
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=FONT, frameon=False, bbox_to_anchor=(0.5, 1.0))
    return svg(fig, f"curves-{suite}-{backbone}")


def _number(values: pd.Series, how: str) -> float:
    """A summary of a cost column; NaN where runs did not record it (older or foreign records)."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(getattr(values, how)()) if len(values) else math.nan


def _basis(runs: pd.DataFrame) -> str:
    bases = sorted(set(runs["memory_basis"].dropna())) if "memory_basis" in runs else []
    if len(runs) and (not bases or runs["memory_basis"].isna().any()):
        bases.append("process peak (older runs)")
    return " + ".join(bases)


def efficiency(agg: Aggregate, suite: str, backbone: str) -> tuple[pd.DataFrame, int | None]:
    """Per method at the largest shot count: average accuracy, trainable params, and the median over its
    runs (datasets and seeds) of train time, peak memory and machine load, so one run slowed by a busy
    machine does not decide a method's cost; `memory_basis` says what the memory figure measures."""
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
            "trainable_params": _number(group["trainable_params"], "median"),
            "train_seconds": _number(group["train_seconds"], "median"),
            "peak_mem_mb": _number(group["peak_mem_mb"], "median"),
            "machine_load": _number(group["machine_load"], "median") if "machine_load" in group else math.nan,
            "memory_basis": _basis(group),
        })
    frame = pd.DataFrame(rows, columns=["method", "shots", "accuracy", "flag", "trainable_params", "train_seconds", "peak_mem_mb",
                                        "machine_load", "memory_basis"])
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
            colour = colours[row["method"]]
            hollow = bool(row["flag"])  # incomplete: drawn apart, as an open marker
            ax.scatter(row[col], row["accuracy"], s=42, color="white" if hollow else colour, edgecolors=colour, linewidths=1.5, zorder=3)
            ax.annotate(row["method"] + (row["flag"] if hollow else ""), (row[col], row["accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=FONT - 1, color=colour)
        if scale == "symlog":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(label, fontsize=FONT)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=FONT)
    axes[0].set_ylabel(f"avg top-1 (%), {k}-shot" if k else "avg top-1 (%)", fontsize=FONT)
    fig.tight_layout()
    return svg(fig, f"efficiency-{name}")
