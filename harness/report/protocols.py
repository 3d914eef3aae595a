"""The generalisation protocols' sections, laid out as the papers lay them out: base / new / H per
dataset and on average (base2new), source + each target + the targets' average (cross-dataset and
domain shift). Means +- std over seeds; a target a method cannot score is shown as n/a with why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from harness.protocols import get_protocol, harmonic_mean
from harness.published import display_name, generalisation_frame
from harness.store import connect


def load_evaluations(db: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (successful run of a generalisation protocol, target), with the run's fields."""
    with connect(db, read_only=True) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        if "evaluations" not in tables:  # a database from before protocols
            return pd.DataFrame()
        evals = con.execute("SELECT * FROM evaluations").df()
    ok = runs[(runs["status"] == "ok") & (runs["protocol"] != "fewshot")]
    ok = ok.assign(name=[display_name(m, c, with_protocol=False) for m, c in zip(ok["base_method"], ok["config"])])
    keep = ["config_hash", "suite", "backbone", "name", "dataset", "seed", "protocol", "config"]
    return evals.rename(columns={"dataset": "target_dataset"}).merge(ok[keep], on="config_hash")


def protocol_table(db: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Every generalisation protocol's numbers in long form (the `protocols.csv` export): per protocol,
    suite, backbone, method, trained-on dataset and target, the mean, std and seed count of top-1, or
    why the target does not apply."""
    ev = load_evaluations(db, runs)
    columns = ["protocol", "suite", "backbone", "method", "dataset", "target", "mean", "std", "n_seeds", "not_applicable"]
    if ev.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, g in ev.groupby(["protocol", "suite", "backbone", "name", "dataset", "target"], sort=True):
        values = g["top1"].dropna()
        rows.append([*key, values.mean() if len(values) else math.nan, values.std() if len(values) > 1 else math.nan,
                     len(values), "" if len(values) else next((r for r in g["reason"].dropna()), "no runs")])
    return pd.DataFrame(rows, columns=columns)


def _cell(values: pd.Series, reasons: pd.Series) -> dict:
    v = values.dropna()
    if v.empty:
        why = next((r for r in reasons.dropna()), "no runs")
        return {"text": "n/a", "note": why, "cls": "na", "mean": math.nan}
    std = v.std() if len(v) > 1 else math.nan
    return {"text": f"{v.mean():.2f}", "sd": "" if math.isnan(std) else f"\u00b1{std:.2f}", "note": f"{len(v)} seeds",
            "cls": "", "mean": float(v.mean())}


def _recipe_note(protocol: str, configs: pd.Series, method: str) -> str:
    """Whose hyper-parameters the runs followed: the protocol's recipe (with its source), another
    protocol's (`--recipe`), or the method's few-shot recipe where its paper has none for this protocol."""
    recipes = get_protocol(protocol).recipes
    parsed = [json.loads(c) if isinstance(c, str) else (c or {}) for c in configs]
    whose = {c.get("recipe", protocol) for c in parsed}
    if whose - {protocol}:
        return ", ".join(f"{w} recipe" for w in sorted(whose - {protocol}))
    used = [c.get("method") for c in parsed if c.get("method") in recipes]
    return f"{get_protocol(protocol).recipe_source} recipe" if used else "few-shot recipe at the protocol's shots"


RECIPE_TAG = " recipe)"


def _split_recipe(name: str) -> tuple[str, str | None]:
    """'maple (fewshot recipe)' -> ('maple', 'fewshot'); a name without the tag -> (name, None)."""
    if not name.endswith(RECIPE_TAG) or " (" not in name:
        return name, None
    base, _, tag = name.rpartition(" (")
    return base, tag[: -len(RECIPE_TAG)]


def recipe_rows(sections: list[dict], leaderboard: pd.DataFrame) -> list[dict]:
    """Each method run under another protocol's recipe (`--recipe`) beside its own: the headline under
    its own recipe, under the other, and the drop (own minus other), per protocol section and, for the
    few-shot leaderboard, per shot count."""
    out = []
    for section in sections:
        key = (lambda r: r["avg"][2]) if section["kind"] == "base2new" else (lambda r: r["avg"])
        values = {r["method"]: key(r) for r in section["rows"]}
        where = f"{section['protocol']} ({section['backbone']}, {section['suite']})"
        for name, value in values.items():
            base, other = _split_recipe(name)
            if other and base in values:
                out.append({"where": where, "method": base, "own": values[base], "other_recipe": other, "other": value,
                            "metric": "H" if section["kind"] == "base2new" else "average"})
    for row in leaderboard[leaderboard.shots > 0].itertuples():
        base, other = _split_recipe(row.method)
        mine = leaderboard[(leaderboard.method == base) & (leaderboard.shots == row.shots) & (leaderboard.suite == row.suite)
                           & (leaderboard.backbone == row.backbone)]
        if other and len(mine):
            out.append({"where": f"fewshot ({row.backbone}, {row.suite}), {row.shots}-shot", "method": base, "own": float(mine["mean"].iloc[0]),
                        "other_recipe": other, "other": float(row.mean), "metric": "top-1"})
    for r in out:
        r["drop"] = r["own"] - r["other"]
    return out


def base2new_section(ev: pd.DataFrame, published: pd.DataFrame) -> dict:
    datasets = sorted(ev["dataset"].unique())
    rows = []
    for name, group in ev.groupby("name"):
        per = {}
        for d in datasets:
            g = group[group.dataset == d]
            b, n = (_cell(g.loc[g.target == t, "top1"], g.loc[g.target == t, "reason"]) for t in ("base", "new"))
            h = harmonic_mean(b["mean"], n["mean"]) if not (math.isnan(b["mean"]) or math.isnan(n["mean"])) else math.nan
            per[d] = (b, n, {"text": "n/a" if math.isnan(h) else f"{h:.2f}", "cls": "h", "note": "harmonic mean of the seed means"})
        def average(i: int) -> float:  # over every dataset, or none (a closed-set method's new classes)
            values = [per[d][i]["mean"] for d in datasets]
            return math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)

        avg_b, avg_n = average(0), average(1)
        avg_h = math.nan if math.isnan(avg_b) or math.isnan(avg_n) else harmonic_mean(avg_b, avg_n)
        rows.append({"method": name, "per": per, "avg": [avg_b, avg_n, avg_h], "recipe": _recipe_note("base2new", group["config"], name)})
    rows.sort(key=lambda r: -r["avg"][2] if not math.isnan(r["avg"][2]) else math.inf)
    pub = published[(published.protocol == "base2new") & (published.dataset == "average")]
    pub_rows = [{"method": m, "source": g["source"].iloc[0],
                 "avg": [float(g.loc[g.metric == k, "top1"].iloc[0]) for k in ("base", "new", "hm")]}
                for m, g in pub.groupby("method", sort=False)]
    return {"datasets": datasets, "rows": rows, "published": pub_rows}


def transfer_section(ev: pd.DataFrame, protocol: str, published: pd.DataFrame) -> dict:
    source = ev["dataset"].iloc[0]
    targets = list(dict.fromkeys(ev["target"]))
    rows = []
    for name, group in ev.groupby("name"):
        cells = [_cell(group.loc[group.target == t, "top1"], group.loc[group.target == t, "reason"]) for t in targets]
        others = [c["mean"] for c in cells[1:]]
        avg = sum(others) / len(others) if others and not any(math.isnan(x) for x in others) else math.nan
        rows.append({"method": name, "cells": cells, "avg": avg, "recipe": _recipe_note(protocol, group["config"], name)})
    rows.sort(key=lambda r: -r["avg"] if not math.isnan(r["avg"]) else math.inf)
    pub = published[(published.protocol == protocol) & (published.dataset == source)]
    pub_rows = []
    for m, g in pub.groupby("method", sort=False):
        values = {t: float(v) for t, v in zip(g["target"], g["top1"])}
        cells = [values.get(t, math.nan) for t in targets]
        pub_rows.append({"method": m, "source": g["source"].iloc[0], "cells": cells,
                         "avg": sum(cells[1:]) / len(cells[1:]) if len(cells) > 1 and not any(math.isnan(x) for x in cells[1:]) else math.nan})
    return {"source": source, "targets": targets, "rows": rows, "published": pub_rows}


def protocol_sections(db: Path, runs: pd.DataFrame) -> list[dict]:
    """One section per (protocol, suite, backbone[, source]) that has runs."""
    ev = load_evaluations(db, runs)
    if ev.empty:
        return []
    published = generalisation_frame()
    out = []
    for (protocol, suite, backbone), group in ev.groupby(["protocol", "suite", "backbone"], sort=True):
        pub = published[published.backbone == backbone]
        meta = {"protocol": protocol, "suite": suite, "backbone": backbone, "id": f"{protocol}-{suite}-{backbone}",
                "seeds": sorted(int(s) for s in group["seed"].unique())}
        if protocol == "base2new":
            out.append({**meta, "kind": "base2new", **base2new_section(group, pub)})
        else:
            for source, by_source in group.groupby("dataset"):
                out.append({**meta, "kind": "transfer", "id": f"{meta['id']}-{source}", **transfer_section(by_source, protocol, pub)})
    return out
