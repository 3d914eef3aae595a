"""The DuckDB run store: one row per run key (config hash), each written in its own transaction.

DuckDB allows one process per file at a time, so the store opens the file only for the moment it
reads or writes and, when another process holds it, waits for it (HARNESS_DB_LOCK_WAIT seconds,
default 30) before giving up. Every way the file can fail (locked, corrupt, unwritable folder, full
disk, a `runs` table without its key) becomes a HarnessError that names the cause and the fix, and
`store_or_keep` keeps a finished run as a JSON record when the database cannot take it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import uuid
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
    "protocol": "VARCHAR",  # evaluation protocol; NULL in databases from before protocols: fewshot
    "digest": "VARCHAR",  # sha256 of the row's content and its evaluations as stored (`row_digest`); NULL: from before digests
    "memory_basis": "VARCHAR",  # what peak_mem_mb measures (harness.cost); NULL: from before, the process's peak
    "machine_load": "DOUBLE",  # 1-minute load average per core at the run's end (harness.cost)
}


LOCK_WAIT_ENV = "HARNESS_DB_LOCK_WAIT"
_CORRUPT = ("not a valid duckdb database", "could not read enough bytes", "corrupt", "checksum", "serialization error",
            "database file with version number")
_FAMILIES = {"VARCHAR": "text", "JSON": "text", "TINYINT": "number", "SMALLINT": "number", "INTEGER": "number",
             "BIGINT": "number", "HUGEINT": "number", "DOUBLE": "number", "FLOAT": "number"}


def lock_wait() -> float:
    """Seconds to wait for another process's lock on the database (env HARNESS_DB_LOCK_WAIT, default 30)."""
    raw = os.environ.get(LOCK_WAIT_ENV, "30")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise HarnessError(f"{LOCK_WAIT_ENV} must be a number of seconds, not '{raw}'.") from None


def _locked(exc: BaseException) -> bool:
    low = str(exc).lower()
    return "could not set lock" in low or "conflicting lock" in low


def explain(exc: BaseException, path: Path, read_only: bool = False) -> HarnessError | None:
    """The user's version of a storage failure (locked, full disk, unwritable folder, corrupt file), or
    None when `exc` is none of these (a bug or a bad query: it keeps its traceback)."""
    path = Path(path)
    text = str(exc) or type(exc).__name__
    first, low, code = text.splitlines()[0], text.lower(), getattr(exc, "errno", None)
    if _locked(exc):
        held = re.search(r"held in (.+?) \(PID (\d+)\)", text)
        holder = f"{held.group(1)}, PID {held.group(2)}" if held else "another process"
        return HarnessError(
            f"The run database {path} is locked: another process ({holder}) has it open, probably another harness "
            f"command writing to it. Waited {lock_wait():g} s ({LOCK_WAIT_ENV}). Wait for it to finish, or use another "
            "file with --db."
        )
    if code == errno.ENAMETOOLONG or "file name too long" in low:
        return HarnessError(f"The run database path {path} has a name longer than the file system allows (255 bytes per name). "
                            "Pass a shorter --db.")
    if code == errno.ENOSPC or "no space left" in low or "disk is full" in low or "disk full" in low:
        return HarnessError(
            f"The disk holding the run database {path} is full ({first}). Free some space, or use --db on another disk."
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission denied" in low or "read-only file system" in low:
        if read_only:
            return HarnessError(f"The run database {path} cannot be read ({first}). Check its permissions, or pass --db.")
        return HarnessError(
            f"The run database {path} cannot be written: its folder {path.parent} is read-only or not writable "
            f"({first}). DuckDB writes the database and its write-ahead log ({path.name}.wal) there. "
            "Use --db with a writable folder, or make this one writable."
        )
    if any(word in low for word in _CORRUPT):
        return HarnessError(
            f"{path} is not a readable DuckDB database ({first}): the file is truncated, damaged or not a DuckDB file. "
            f"Move it aside (mv {path} {path}.broken) so the harness starts a new one, or pass --db PATH; run records "
            "kept as JSON files can be loaded again with `harness ingest`."
        )
    return None


def _raise_explained(exc: BaseException, path: Path, read_only: bool = False) -> None:
    problem = explain(exc, path, read_only)
    if problem is not None:
        raise problem from None


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying with back-off while another process holds DuckDB's lock on it."""
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _raise_explained(exc, path)
            raise
        if not os.access(path.parent, os.W_OK):  # DuckDB would open the file, then fail at the first write (WAL)
            _raise_explained(PermissionError(errno.EACCES, "no write permission on the folder"), path)
    deadline, delay = time.monotonic() + lock_wait(), 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            left = deadline - time.monotonic()
            if _locked(exc) and left > 0:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)
                continue
            _raise_explained(exc, path, read_only)
            raise


def _family(kind: str) -> str:
    """Types that hold the same values alike: a restored table may say BIGINT where we say INTEGER."""
    kind = kind.split()[0].upper()
    if kind.startswith(("TIMESTAMP", "DECIMAL")):
        return "time" if kind.startswith("TIMESTAMP") else "number"
    return _FAMILIES.get(kind, kind)


def _check_runs(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Refuse a `runs` table that is not ours: without its PRIMARY KEY on config_hash a run would be
    stored twice (ON CONFLICT needs the key), and a column of another type would break the report."""
    where = "WHERE database_name = current_database() AND schema_name = 'main' AND table_name = 'runs'"
    have = dict(con.execute(f"SELECT column_name, data_type FROM duckdb_columns() {where}").fetchall())
    if not have:
        return
    keys = con.execute(
        f"SELECT constraint_column_names FROM duckdb_constraints() {where} AND constraint_type = 'PRIMARY KEY'"
    ).fetchall()
    repair = f"python -c \"from harness.store import repair_runs; repair_runs('{path}')\""
    if [list(k[0]) for k in keys] != [["config_hash"]]:
        raise HarnessError(
            f"The `runs` table in {path} has no PRIMARY KEY on config_hash (was it restored or copied without its "
            f"key?), so a run could be stored twice. Repair it once with: {repair} "
            "(keeps the newest finished attempt of each config hash), then run the command again."
        )
    wrong = [f"{n} is {have[n]}, expected {k.split()[0]}" for n, k in COLUMNS.items()
             if n in have and _family(have[n]) != _family(k)]
    if wrong:
        raise HarnessError(
            f"The `runs` table in {path} is not as the harness writes it ({'; '.join(wrong)}). Repair it with: {repair}"
        )


@contextmanager
def connect(path: Path, read_only: bool = False):
    """A connection for one read or write; creates (or upgrades) `runs` when writing, checks it always."""
    path = Path(path)
    if read_only and not path.is_file():
        raise HarnessError(f"No run database at {path}. Run `harness run ...` first, or pass --db PATH.")
    con = _open(path, read_only)
    try:
        try:
            if not read_only:
                con.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{n} {k}' for n, k in COLUMNS.items())})")
                con.execute(f"CREATE TABLE IF NOT EXISTS evaluations ({', '.join(f'{n} {k}' for n, k in EVAL_COLUMNS.items())})")
            _check_runs(con, path)
            if not read_only:
                for name, kind in COLUMNS.items():  # databases written by an older harness gain new columns
                    if "PRIMARY" not in kind:
                        con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {name} {kind}")
            yield con
        finally:
            con.close()  # a full disk may show only here, at the checkpoint
    except (duckdb.Error, OSError) as exc:
        _raise_explained(exc, path, read_only)
        raise


def repair_runs(path: Path) -> int:
    """Rebuild `runs` with the harness's columns and key, one row per config hash (the newest finished
    attempt), in one transaction; returns the rows kept. For a table restored without its key."""
    con = duckdb.connect(str(path))
    try:
        names = con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs'").fetchall()
        have = {r[0] for r in names}
        common = ", ".join(n for n in COLUMNS if n in have)
        con.execute("BEGIN")
        con.execute("ALTER TABLE runs RENAME TO runs_before_repair")
        con.execute(f"CREATE TABLE runs ({', '.join(f'{n} {k}' for n, k in COLUMNS.items())})")
        con.execute(
            f"INSERT INTO runs ({common}) SELECT {common} FROM runs_before_repair WHERE config_hash IS NOT NULL "
            "QUALIFY row_number() OVER (PARTITION BY config_hash ORDER BY finished_at DESC NULLS LAST) = 1"
        )
        con.execute("DROP TABLE runs_before_repair")
        con.execute("COMMIT")
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        con.close()


def database_id(path: Path, create: bool = True) -> str | None:
    """This database's identity (created on first use, kept in table `meta`): the records a sweep
    writes for it carry it, and it ingests on its own only records that do. create=False: read it
    without writing (None for a missing database or one from before identities)."""
    if not create:
        if not Path(path).is_file():
            return None
        with connect(path, read_only=True) as con:
            if not con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = 'meta'").fetchone():
                return None
            row = con.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
            return row[0] if row else None
    with connect(path) as con:
        con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO meta VALUES ('db_id', ?) ON CONFLICT DO NOTHING", [uuid.uuid4().hex])
        return con.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0]


def stored_run_ids(path: Path) -> dict[str, str]:
    """{config hash: run id} of the stored ok runs (what a --force rerun names as the run it replaces)."""
    if not Path(path).is_file():
        return {}
    with connect(path, read_only=True) as con:
        return dict(con.execute("SELECT config_hash, run_id FROM runs WHERE status = 'ok'").fetchall())


def stored_ok_run(path: Path, config_hash: str) -> str | None:
    """The run id of the stored ok run of this config, or None (read-only; a sweep compares it with
    what was stored when it started, to skip a run another process finished meanwhile)."""
    if not Path(path).is_file():
        return None
    with connect(path, read_only=True) as con:
        row = con.execute("SELECT run_id FROM runs WHERE config_hash = ? AND status = 'ok'", [config_hash]).fetchone()
    return row[0] if row else None


# One row per (run, evaluation target) of the generalisation protocols; `runs` keeps the headline.
EVAL_COLUMNS = {
    "config_hash": "VARCHAR",
    "target": "VARCHAR",  # base | new | a dataset name
    "dataset": "VARCHAR",  # whose test images
    "class_subset": "VARCHAR",  # all | base | new
    "status": "VARCHAR",  # ok | not_applicable
    "top1": "DOUBLE",
    "n_test": "INTEGER",
    "n_classes": "INTEGER",
    "reason": "VARCHAR",  # why not applicable
}


def insert_record(con: duckdb.DuckDBPyConnection, record: dict, replace: bool = False) -> None:
    """Store a run and its evaluations in one transaction: a config hash holds its most recently
    finished attempt only, so an older attempt never replaces a newer run; `replace`: this record
    replaces the stored one whatever its time (ingest has decided so)."""
    row = {name: record.get(name) for name in COLUMNS}
    if not isinstance(row["config"], str):
        row["config"] = json.dumps(row["config"], sort_keys=True)
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "config_hash")
    con.execute("BEGIN")
    try:
        con.execute(
            f"INSERT INTO runs ({names}) VALUES ({marks}) ON CONFLICT (config_hash) DO UPDATE SET {updates}"
            + ("" if replace else " WHERE excluded.finished_at >= runs.finished_at"),
            list(row.values()),
        )
        won = con.execute("SELECT run_id FROM runs WHERE config_hash = ?", [row["config_hash"]]).fetchone()[0] == row["run_id"]
        if won and record.get("evaluations") is not None:
            con.execute("DELETE FROM evaluations WHERE config_hash = ?", [row["config_hash"]])
            for e in record["evaluations"]:
                values = {**{k: e.get(k) for k in EVAL_COLUMNS}, "config_hash": row["config_hash"]}
                con.execute(f"INSERT INTO evaluations ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                            list(values.values()))
        if won:  # sealed as stored: the digest is computed from the database's own representation
            con.execute("UPDATE runs SET digest = ? WHERE config_hash = ?", [row_digest(con, row["config_hash"]), row["config_hash"]])
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:  # the failure (a full disk, Ctrl-C) already ended the transaction: keep its own error
            pass
        raise


# The columns every digest covers; columns added since are sealed only where a row has them, so the
# rows stored before they existed keep their digests.
SEALED = list(COLUMNS)[: list(COLUMNS).index("digest")]
SEALED_WHEN_PRESENT = list(COLUMNS)[list(COLUMNS).index("digest") + 1 :]


def _canonical(value) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else repr(value)


def row_digest(con: duckdb.DuckDBPyConnection, config_hash: str) -> str:
    """sha256 over a stored run's columns and its evaluations, as the database returns them."""
    have = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs'").fetchall()}
    later_columns = [name for name in SEALED_WHEN_PRESENT if name in have]  # a read-only older database lacks them
    row = con.execute(f"SELECT {', '.join(SEALED + later_columns)} FROM runs WHERE config_hash = ?", [config_hash]).fetchone()
    evaluations = con.execute(
        f"SELECT {', '.join(EVAL_COLUMNS)} FROM evaluations WHERE config_hash = ? ORDER BY target, dataset", [config_hash]
    ).fetchall()
    later = {name: _canonical(v) for name, v in zip(later_columns, row[len(SEALED) :]) if v is not None}
    payload = json.dumps([[_canonical(v) for v in row[: len(SEALED)]], [[_canonical(v) for v in e] for e in evaluations]] + ([later] if later else []))
    return hashlib.sha256(payload.encode()).hexdigest()


def altered_rows(path: Path) -> tuple[list[str], int]:
    """Runs whose stored content no longer matches the digest written with them (edited after they were
    stored, by hand or by code), named; and how many rows predate digests (not checkable)."""
    with connect(path, read_only=True) as con:
        if "digest" not in {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs'").fetchall()}:
            return [], con.execute("SELECT count(*) FROM runs").fetchone()[0]
        rows = con.execute("SELECT config_hash, digest, method, dataset, shots, seed, top1 FROM runs").fetchall()
        altered = [f"{m} {d} {k}-shot seed {s} (config {h}, top-1 {t})" for h, digest, m, d, k, s, t in rows
                   if digest is not None and row_digest(con, h) != digest]
    return altered, sum(1 for r in rows if r[1] is None)


def write_record(path: Path, record: dict) -> None:
    with connect(path) as con:
        insert_record(con, record)


def store_or_keep(db: Path, record: dict, records: Path) -> None:
    """Store a finished run; when the database cannot take it (still locked after the wait, corrupt,
    unwritable, full), keep it as a JSON record in `records` and stop with a message saying how to load
    it later, so a finished run is never thrown away. If even that fails, the message carries its numbers.
    Ctrl-C while waiting for a lock also keeps the record (then re-raises), for the next run to ingest."""
    from harness.records import write_record_file  # records imports this module

    try:
        write_record(db, record)
        return
    except KeyboardInterrupt:
        write_record_file(records, record)
        raise
    except (HarnessError, duckdb.Error, OSError) as exc:
        why = str(exc)

    try:
        kept = write_record_file(records, record)
    except Exception as exc:  # noqa: BLE001 - whatever happened, the numbers must reach the user
        keys = ("method", "dataset", "backbone", "shots", "seed", "status", "top1", "config_hash")
        numbers = ", ".join(f"{k}={record.get(k)}" for k in keys)
        raise HarnessError(
            f"A finished run could not be stored in {db} ({why}) nor kept as a JSON record in {records} ({exc}). "
            f"Its result, for your notes: {numbers}."
        ) from None
    raise HarnessError(
        f"A finished run could not be stored in {db}: {why}\nThe run was kept in {kept}. Once the database is fixed, "
        f"run `harness ingest --db {db} --records {records}` to store it (or run the same command again)."
    )


def runs_frame(path: Path) -> pd.DataFrame:
    with connect(path, read_only=True) as con:
        return con.execute("SELECT * FROM runs ORDER BY started_at").df()
