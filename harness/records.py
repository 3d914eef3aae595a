"""Run records as JSON files: how workers that must not open DuckDB hand their runs to the store.

A worker writes one file per finished run (`<config_hash>.json`, temporary file + rename, so a
reader never sees half a record) and a marker under `running/` while a run is in flight. The
single writer ingests the files into DuckDB with INSERT OR REPLACE on the config hash, so a record
ingested twice is still one run.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import atomic_write_text
from harness.store import connect, insert_record

PLAN = "plan.json"


def default_records_dir(db: Path) -> Path:
    return Path(db).parent / "records"


def _jsonable(record: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}


def write_record_file(records: Path, record: dict) -> Path:
    path = Path(records) / f"{record['config_hash']}.json"
    atomic_write_text(path, json.dumps(_jsonable(record), sort_keys=True))
    return path


def read_records(records: Path) -> list[dict]:
    out = []
    for path in sorted(Path(records).glob("*.json")):
        if path.name != PLAN:
            out.append(json.loads(path.read_text()))
    return out


def completed_in_records(records: Path) -> set[str]:
    return {r["config_hash"] for r in read_records(records) if r.get("status") == "ok"} if Path(records).is_dir() else set()


def ingest(records: Path, db: Path) -> int:
    """Load every record file into the database (idempotent); returns how many files were read."""
    found = read_records(records) if Path(records).is_dir() else []
    if found:
        with connect(db) as con:
            for record in found:
                insert_record(con, record)
    return len(found)


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
    latest = {r["config_hash"]: r for r in read_records(records) if r["config_hash"] in plan}
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
