"""The DuckDB run store: one row per run key (config hash), each written in its own transaction.

DuckDB allows one writing process per file, so the store opens the file only for the moment it
reads or writes, and a lock held by another process becomes a clear error, not a traceback.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd

from harness.errors import HarnessError

COLUMNS = {
    "config_hash": "VARCHAR PRIMARY KEY",
    "run_id": "VARCHAR",
    "method": "VARCHAR",
    "dataset": "VARCHAR",
    "suite": "VARCHAR",
    "backbone": "VARCHAR",
    "weights": "VARCHAR",
    "shots": "INTEGER",
    "seed": "INTEGER",
    "config": "JSON",
    "status": "VARCHAR",
    "top1": "DOUBLE",
    "n_test": "INTEGER",
    "trainable_params": "BIGINT",
    "train_seconds": "DOUBLE",
    "eval_seconds": "DOUBLE",
    "peak_mem_mb": "DOUBLE",
    "device": "VARCHAR",
    "precision": "VARCHAR",
    "harness_version": "VARCHAR",
    "git_sha": "VARCHAR",
    "started_at": "TIMESTAMP",
    "finished_at": "TIMESTAMP",
    "error": "VARCHAR",
    "packages": "VARCHAR",  # versions of the libraries that produced the number
}


@contextmanager
def connect(path: Path, read_only: bool = False):
    path = Path(path)
    if read_only and not path.is_file():
        raise HarnessError(f"No run database at {path}. Run `harness run ...` first, or pass --db PATH.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        raise HarnessError(
            f"The run database {path} is locked or unreadable ({str(exc).splitlines()[0]}). Another harness process "
            "is probably writing to it: wait for it to finish, or use another file with --db."
        ) from None
    try:
        if not read_only:
            columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
            for name, kind in COLUMNS.items():  # databases written by an older harness gain new columns
                if "PRIMARY" not in kind:
                    con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {name} {kind}")
        yield con
    finally:
        con.close()


def completed_hashes(path: Path) -> set[str]:
    if not Path(path).is_file():
        return set()
    with connect(path) as con:
        return {row[0] for row in con.execute("SELECT config_hash FROM runs WHERE status = 'ok'").fetchall()}


def insert_record(con: duckdb.DuckDBPyConnection, record: dict) -> None:
    """Store a run, one statement: a config hash holds its most recently finished attempt only,
    so re-ingesting an old record (or a stale failure) never replaces a newer run."""
    row = {name: record.get(name) for name in COLUMNS}
    if not isinstance(row["config"], str):
        row["config"] = json.dumps(row["config"], sort_keys=True)
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "config_hash")
    con.execute(
        f"INSERT INTO runs ({names}) VALUES ({marks}) ON CONFLICT (config_hash) DO UPDATE SET {updates} "
        "WHERE excluded.finished_at >= runs.finished_at",
        list(row.values()),
    )


def write_record(path: Path, record: dict) -> None:
    with connect(path) as con:
        insert_record(con, record)


def runs_frame(path: Path) -> pd.DataFrame:
    with connect(path) as con:
        return con.execute("SELECT * FROM runs ORDER BY started_at").df()
