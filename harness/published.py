"""Published numbers (results/published/*.csv): read in memory by the report and check (which never
write), and copied into the DuckDB table `published` beside our `runs` by `harness run`, for queries.

The CSVs live in the repository's `results/published/` folder, installed as the data-only package
`harness.published_data` (the same pattern as the dataset cards), so the report and the gap table
work from a checkout and after a non-editable install alike. Backbone names are normalised to the
harness spelling here and only here; the method display name (`coop` with n_ctx=4 and
ctx_init "a photo of a" is the paper's `coop_ctx4`) is derived from a run's config in
`display_name`, which report and check share.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pandas as pd

from harness.store import connect

COLUMNS = ["source", "backbone", "method", "method_label", "shots", "dataset", "top1"]

# Paper variants: name -> (method, the hyper-parameters that make it). CoOp (4) is CoOp's ctxv1
# config: 4 context tokens initialised from "a photo of a".
VARIANTS = {"coop_ctx4": ("coop", {"n_ctx": 4, "ctx_init": "a photo of a"})}


def harness_backbone(name: str) -> str:
    """'ViT-B/16' (papers, OpenAI) -> 'ViT-B-16' (harness, open_clip)."""
    return str(name).strip().replace("/", "-")


def display_name(method: str, config, with_protocol: bool = True) -> str:
    """The leaderboard name of a run: the method, or its paper variant's name when every hyper-parameter
    that makes the variant matches (coop + n_ctx=4 + ctx_init "a photo of a" -> coop_ctx4)."""
    if isinstance(config, str):
        config = json.loads(config or "{}")
    config = config or {}
    hparams = config.get("hparams") or {}
    label = next(
        (v for v, (name, wanted) in VARIANTS.items() if method == name and all(hparams.get(k) == w for k, w in wanted.items())),
        method,
    )
    tags = protocol_tags(config, with_protocol)
    return f"{label} ({', '.join(tags)})" if tags else label


def protocol_tags(config: dict, with_protocol: bool = True) -> list[str]:
    """What sets a run apart from the default recipe's row (another evaluation protocol, subsets
    other than CoOp's, the full-val search, other templates): runs that differ here are different
    rows, never averaged together."""
    tags = []
    protocol = config.get("eval_protocol", "fewshot")
    if with_protocol and protocol != "fewshot":
        tags.append(protocol)
    if config.get("recipe", protocol) != protocol:  # another protocol's recipe: another row
        tags.append(f"{config['recipe']} recipe")
    sampler = config.get("sampler")
    if sampler == "files":
        tags.append("split files")
    elif sampler and sampler != "coop":
        tags.append(f"{sampler} subsets")
    hparams = config.get("hparams") or {}
    if hparams.get("search_split") == "full_val":
        tags.append("full-val search")
    templates = hparams.get("templates", "card")
    if templates == "ensemble":
        tags.append("template ensemble")
    elif isinstance(templates, list):  # named by content: two files with the same templates are one row
        tags.append(f"own templates {hashlib.sha256(json.dumps(templates).encode()).hexdigest()[:6]}")
    return tags


def published_dir():
    """The checkout's `results/published/` when running from source, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "results" / "published"
    if checkout.is_dir() and any(checkout.glob("*.csv")):
        return checkout
    return resources.files("harness.published_data")


def published_frame() -> pd.DataFrame:
    """Every published CSV, concatenated, with harness backbone names."""
    frames = []
    for entry in sorted(published_dir().iterdir(), key=lambda p: p.name):
        if entry.name.startswith("published_") and entry.name.endswith(".csv"):
            with entry.open("r", encoding="utf-8") as fh:
                frames.append(pd.read_csv(fh)[COLUMNS])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "top1" else "object") for c in COLUMNS})
    frame = pd.concat(frames, ignore_index=True)
    frame["backbone"] = frame["backbone"].map(harness_backbone)
    frame["shots"] = frame["shots"].astype(int)
    return frame


def load_published(db: Path) -> int:
    """Replace the contents of table `published` with the shipped CSVs (idempotent); returns the row count.
    Writes the database, so only `harness run` calls it; readers use `published_frame()`."""
    frame = published_frame()
    with connect(db) as con:
        con.register("published_df", frame)
        con.execute("CREATE OR REPLACE TABLE published AS SELECT * FROM published_df")
        con.unregister("published_df")
    return len(frame)


GENERALISATION = "generalisation.csv"  # base-to-new and domain-shift numbers: protocol, target, metric


def generalisation_frame() -> pd.DataFrame:
    """Published numbers of the generalisation protocols, one row per (source, method, target, metric)."""
    path = published_dir() / GENERALISATION
    with path.open("r", encoding="utf-8") as fh:
        frame = pd.read_csv(fh)
    frame["backbone"] = frame["backbone"].map(harness_backbone)
    return frame
