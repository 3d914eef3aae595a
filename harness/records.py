"""Run records as JSON files: how workers that must not open DuckDB hand their runs to the store.

A worker writes one file per finished run (`<config_hash>.json`, temporary file + rename, so a
reader never sees half a record) and a marker under `running/` while a run is in flight. The
single writer ingests the files into DuckDB with INSERT OR REPLACE on the config hash, so a record
ingested twice is still one run. The runner also keeps a run here when the database cannot take it
(`harness.store.store_or_keep`). A file in the folder that is not a readable run record is skipped
with a warning naming it, never a crash, so one stray file cannot block the good runs beside it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import duckdb

from harness.errors import HarnessError
from harness.paths import atomic_write_text
from harness.store import connect, insert_record

PLAN = "plan.json"
RECORD_KEYS = ("config_hash", "status")  # what makes a JSON file a run record


def default_records_dir(db: Path) -> Path:
    return Path(db).parent / "records"


def _jsonable(record: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}


def write_record_file(records: Path, record: dict) -> Path:
    path = Path(records) / f"{record['config_hash']}.json"
    atomic_write_text(path, json.dumps(_jsonable(record), sort_keys=True))
    return path


def scan_records(records: Path) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """The run records in the folder as {config hash: (file name, record)}, one per config hash (the
    newest finished_at wins, as in the database), and one line per file skipped and why: truncated or
    unreadable JSON, or JSON that is not a run record (no config_hash or status, e.g. a foreign file)."""
    latest: dict[str, tuple[str, dict]] = {}
    problems = []
    for path in sorted(Path(records).glob("*.json")):
        if path.name == PLAN:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: truncated JSON, or bytes that are not text
            problems.append(f"{path.name}: not readable JSON, probably truncated or damaged ({exc})")
            continue
        missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            problems.append(f"{path.name}: valid JSON but not a run record (no {' or '.join(missing)})")
            continue
        before = latest.get(record["config_hash"], ("", {}))[1]
        if str(record.get("finished_at") or "") >= str(before.get("finished_at") or ""):
            latest[record["config_hash"]] = (path.name, record)
    return latest, problems


def warn_skipped(records: Path, problems: list[str]) -> None:
    """Name every skipped file on stderr, with the reason and the fix."""
    if problems:
        lines = "\n  ".join(problems)
        print(f"warning: skipped {len(problems)} file(s) in {records} that are not run records; move them aside to "
              f"silence this:\n  {lines}", file=sys.stderr)


def read_records(records: Path) -> list[dict]:
    """The readable run records, one per config hash; bad files are skipped silently here (callers poll
    this in a loop), and named by `ingest` and `sweep_status`."""
    return [record for _, record in scan_records(records)[0].values()]


def completed_in_records(records: Path) -> set[str]:
    return {r["config_hash"] for r in read_records(records) if r.get("status") == "ok"} if Path(records).is_dir() else set()


def ingest(records: Path, db: Path) -> int:
    """Load every run record of the folder into the database (idempotent); returns how many runs it stored.

    Opens the database only when there is a record to store (so `report` and `check` stay read-only
    without a records folder). Records of one config hash are one run, the newest finished_at winning.
    A bad file (truncated JSON, JSON that is not a run record, values the database refuses) is skipped
    with a warning on stderr naming it and why, and never raises: the good runs beside it are stored,
    and a stray file does not block `report`, `check` or the resume of `run`. A database that cannot be
    opened or written still raises HarnessError (and the record files stay, to be ingested later)."""
    if not Path(records).is_dir():
        return 0
    found, problems = scan_records(records)
    stored = 0
    if found:
        with connect(db) as con:
            for name, record in found.values():
                try:
                    insert_record(con, record)
                    stored += 1
                except (duckdb.DataError, duckdb.ProgrammingError, TypeError, ValueError) as exc:
                    why = str(exc).splitlines()[0]
                    problems.append(f"{name}: a run record with values the database refuses ({why})")
    warn_skipped(records, problems)
    return stored


def mark_running(records: Path, config_hash: str, label: str) -> Path:
    path = Path(records) / "running" / f"{config_hash}.json"
    atomic_write_text(path, json.dumps({"label": label, "pid": os.getpid(), "host": socket.gethostname()}))
    return path


def running(records: Path) -> list[dict]:
    """In-flight markers; a marker whose process is gone (killed worker) is reported as stale."""
    out = []
    for path in sorted((Path(records) / "running").glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        info["config_hash"] = path.stem
        info["stale"] = info.get("host") == socket.gethostname() and not _alive(info.get("pid", -1))
        out.append(info)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_status(records: Path) -> dict:
    """Counts of the last planned sweep: done, failed, running (or stale), pending."""
    plan_path = Path(records) / PLAN
    if not plan_path.is_file():
        raise HarnessError(f"No distributed sweep found in {records} (no {PLAN}). Start one with `harness run --executor local|slurm`.")
    plan = json.loads(plan_path.read_text())["runs"]
    found, problems = scan_records(records)
    warn_skipped(records, problems)
    latest = {h: r for h, (_, r) in found.items() if h in plan}
    in_flight = [m for m in running(records) if m["config_hash"] in plan and m["config_hash"] not in latest]
    failed = [r for r in latest.values() if r["status"] != "ok"]
    return {
        "done": len(latest) - len(failed),
        "failed": len(failed),
        "running": len(in_flight),
        "pending": len(plan) - len(latest) - len(in_flight),
        "total": len(plan),
        "in_flight": in_flight,
        "failures": [(plan[r["config_hash"]], (r.get("error") or "").splitlines()[0]) for r in failed],
    }
