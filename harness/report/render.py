"""Assemble index.html (jinja2 template in harness/templates) and write the exports."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

import harness
from harness.errors import HarnessError
from harness.report.aggregate import DATA_MARK, RANK_RULE, SEED_MARK, TIED_MARK, aggregate, load_runs
from harness.report.exports import groups_in_order, leaderboard_latex, leaderboard_markdown, protocols_latex, protocols_markdown
from harness.report.plots import curves_svg, efficiency, efficiency_svg, method_colours
from harness.report.protocols import protocol_sections, protocol_table, recipe_rows
from harness.report.provenance import provenance
from harness.report.significance import pair_matrix, prompt_spread, rank_sections
from harness.report.tables import gap_table, wide_table
from harness.store import altered_rows


def render(db: Path, out: Path) -> dict[str, Path]:
    """Write index.html and leaderboard.{csv,md,tex} under `out`; returns the written paths."""
    runs, published = load_runs(db)
    if runs.empty:
        raise HarnessError(f"The run database {db} holds no runs yet. Run `harness run ...` first.")
    altered, _ = altered_rows(db)
    sections_by_protocol = protocol_sections(db, runs)
    every_run = runs
    runs = runs[runs["protocol"] == "fewshot"]  # the leaderboard; the other protocols have their own sections
    agg = aggregate(runs, published)
    colours = method_colours(sorted(runs["method"].unique()))
    sections = []
    for suite, backbone, cells, shots, methods in groups_in_order(agg.leaderboard):
        per_ds = agg.datasets[(agg.datasets.suite == suite) & (agg.datasets.backbone == backbone)]
        ok = agg.ok[(agg.ok.suite == suite) & (agg.ok.backbone == backbone)]
        eff, k = efficiency(agg, suite, backbone)
        name = f"{suite}-{backbone}".replace("/", "-")
        sections.append({
            "id": name,
            "suite": suite, "backbone": backbone, "shots": shots,
            "grid": agg.grids[(suite, backbone)],
            "leaderboard": wide_table(cells, methods, shots, with_rank=True, ok=ok),
            "datasets": [(d, wide_table(per_ds[per_ds.dataset == d], methods, shots, with_rank=False, ok=ok[ok.dataset == d]))
                         for d in agg.grids[(suite, backbone)]["datasets"]],
            "pairs": pair_matrix(ok, [m for m in methods if m in set(cells.loc[cells.shots > 0, "method"])]),
            "ranks": rank_sections(ok, cells, shots, agg.grids[(suite, backbone)]["datasets"], name),
            "prompts": prompt_spread(per_ds),
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
        css=Markup(css), sections=sections, protocols=sections_by_protocol, recipes=recipe_rows(sections_by_protocol, agg.leaderboard), gaps=gaps.to_dict("records"), gap_summary=gap_summary, gap_shots=gap_shots, failed=failed, prov=provenance(every_run),
        n_ok=int((every_run.status == 'ok').sum()), n_runs=len(every_run), n_failed=int((every_run.status != 'ok').sum()), superseded=agg.superseded,
        seed_mark=SEED_MARK, data_mark=DATA_MARK, rank_rule=RANK_RULE, tied_mark=TIED_MARK, db=str(db), version=harness.__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        sources=sorted(published["source"].unique()) if len(published) else [], altered=altered,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": out / "index.html", "csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "tex": out / "leaderboard.tex",
               "protocols": out / "protocols.csv"}
    written["html"].write_text(html, encoding="utf-8")
    agg.leaderboard.to_csv(written["csv"], index=False, float_format="%.4f")
    written["md"].write_text("\n".join(filter(None, [leaderboard_markdown(agg.leaderboard, agg.ok), protocols_markdown(sections_by_protocol)])),
                             encoding="utf-8")
    written["tex"].write_text("\n".join(filter(None, [leaderboard_latex(agg.leaderboard, agg.ok), protocols_latex(sections_by_protocol)])),
                              encoding="utf-8")
    protocol_table(db, every_run).to_csv(written["protocols"], index=False, float_format="%.4f")
    return written
