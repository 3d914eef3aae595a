"""Run records as JSON files: how workers that must not open DuckDB hand their runs to the store.

A worker writes one file per finished run (`<config_hash>.json`, temporary file + rename, so a
reader never sees half a record) and a marker under `running/` while a run is in flight. Each
record names the database it was made for (`db_id`) and the sweep that made it (`sweep_id`). The
single writer ingests the files: each is checked against the run-record schema, a database takes
on its own only its own records, and a record never silently replaces a stored run (see `ingest`),
so a record ingested twice is still one run. The runner also keeps a run here when the database
cannot take it (`harness.store.store_or_keep`). A file in the folder that is not a valid run record
is skipped with a warning naming it and why, never a crash, so one stray file cannot block the good
runs beside it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from harness.errors import HarnessError
from harness.paths import atomic_write_text
from harness.record_schema import MAX_RECORD_BYTES, record_problems
from harness.store import connect, database_id, insert_record

PLAN = "plan.json"
CONFLICTS = "conflicts"  # records that disagree with a stored run, moved here and named
RECORD_KEYS = ("config_hash", "status")  # what makes a JSON file a run record


def default_records_dir(db: Path) -> Path:
    return Path(db).parent / "records"


def _jsonable(record: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}


def write_record_file(records: Path, record: dict) -> Path:
    path = Path(records) / f"{record['config_hash']}.json"
    atomic_write_text(path, json.dumps(_jsonable(record), sort_keys=True))
    return path


def _read_record(path: Path) -> tuple[dict | None, str]:
    """A record file's JSON object, or None and why it is not one (unreadable, too large, too deep)."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None, f"{path.stat().st_size:,} bytes, larger than any run record ({MAX_RECORD_BYTES:,})"
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: truncated JSON, or bytes that are not text
        return None, f"not readable JSON, probably truncated or damaged ({exc})"
    except RecursionError:
        return None, "JSON nested too deep to be a run record"
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or not isinstance(record.get(k), str)]
    if missing:
        return None, f"valid JSON but not a run record (no {' or '.join(missing)})"
    return record, ""


def scan_records(records: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """Every run record file of the folder as (file name, record), oldest finished first, and one
    line per file skipped and why: truncated or unreadable JSON, JSON that is not a run record (no
    config_hash or status, e.g. a foreign file), too large or too deep."""
    found, problems = [], []
    for path in sorted(Path(records).glob("*.json")):
        if path.name == PLAN:
            continue
        record, why = _read_record(path)
        if record is None:
            problems.append(f"{path.name}: {why}")
        else:
            found.append((path.name, record))
    found.sort(key=lambda item: (str(item[1].get("finished_at") or ""), item[0]))
    return found, problems


def latest_per_run(found: list[tuple[str, dict]]) -> dict[str, dict]:
    """One record per config hash: the last finished (what `status` shows of a run)."""
    return {record["config_hash"]: record for _, record in found}


def warn_skipped(records: Path, problems: list[str]) -> None:
    """Name every skipped file on stderr, with the reason and the fix."""
    if problems:
        lines = "\n  ".join(problems)
        print(f"warning: skipped {len(problems)} file(s) in {records} that are not valid run records; move them aside to "
              f"silence this:\n  {lines}", file=sys.stderr)


def read_records(records: Path) -> list[dict]:
    """The readable run records, one per config hash; bad files are skipped silently here (callers poll
    this in a loop), and named by `ingest` and `sweep_status`."""
    return list(latest_per_run(scan_records(records)[0]).values())


def completed_in_records(records: Path, sweep_id: str | None = None) -> set[str]:
    """Config hashes with an ok record in the folder (of sweep `sweep_id` only, when given)."""
    if not Path(records).is_dir():
        return set()
    return {r["config_hash"] for _, r in scan_records(records)[0]
            if r.get("status") == "ok" and (sweep_id is None or r.get("sweep_id") == sweep_id)}


def finished_in_sweep(records: Path, config_hash: str, sweep_id: str | None) -> bool:
    """Whether this run's record file holds an ok run of sweep `sweep_id` (one file read)."""
    path = Path(records) / f"{config_hash}.json"
    record = _read_record(path)[0] if path.is_file() else None
    return record is not None and record.get("status") == "ok" and record.get("sweep_id") == sweep_id


@dataclass
class Ingested:
    """What `ingest` did with the folder's records."""

    stored: int = 0  # new runs, and runs that replaced a failed attempt or were forced reruns
    unchanged: int = 0  # already stored (the same run, or the same number for the same config)
    foreign: int = 0  # made for another database (or naming none): skipped, or imported when asked for
    invalid: list[str] = field(default_factory=list)  # file: why it was refused
    conflicts: list[str] = field(default_factory=list)  # file: how it disagrees with the stored run


def _decide(stored: tuple | None, record: dict) -> str:
    """insert | skip | conflict, for a valid record against the stored row (run_id, status, top1)."""
    if stored is None:
        return "insert"
    run_id, status, top1 = stored
    if run_id == record.get("run_id"):
        return "skip"
    if status != "ok":
        return "insert" if record["status"] == "ok" else "skip"  # a success replaces a failed attempt
    if record["status"] != "ok":
        return "skip"  # a failed attempt never replaces an ok run
    if record.get("replaces") == run_id:
        return "insert"  # a --force rerun names the run it replaces
    return "skip" if record.get("top1") == top1 else "conflict"


def ingest(records: Path, db: Path, db_id: str | None = None) -> Ingested:
    """Load the folder's run records into the database, checking each as strictly as a run of our own.

    `db_id`: take only the records made for this database (what `run`, `report` and `check` do on
    their own); None: every valid record, counting those made elsewhere (`harness ingest`). A record
    is refused, named, when it fails the run-record schema (`harness.record_schema`). A record whose
    config hash is stored as an ok run with another number is a finding, not an update: it is moved
    to `conflicts/` in the folder and named, and the stored run stays (a --force rerun, which names
    the run it replaces, is the one way to replace a run). The same run ingested twice is one run.
    Opens the database only when there is a record to store; a bad file never raises (the good runs
    beside it are stored); a database that cannot be opened or written raises HarnessError."""
    result = Ingested()
    if not Path(records).is_dir():
        return result
    found, problems = scan_records(records)
    result.invalid = problems
    this_db = db_id if db_id is not None else (database_id(db, create=False) if found else None)
    valid = []
    for name, record in found:
        bad = record_problems(record)
        if bad:
            result.invalid.append(f"{name}: {'; '.join(bad)}")
            continue
        mine = this_db is not None and record.get("db_id") == this_db
        result.foreign += not mine
        if mine or db_id is None:
            valid.append((name, record))
    if valid:
        with connect(db) as con:
            for name, record in valid:
                stored = con.execute("SELECT run_id, status, top1 FROM runs WHERE config_hash = ?", [record["config_hash"]]).fetchone()
                action = _decide(stored, record)
                if action == "skip":
                    result.unchanged += 1
                elif action == "conflict":
                    result.conflicts.append(
                        f"{name}: {record['method']} {record['dataset']} {record['shots']}-shot seed {record['seed']} "
                        f"(config {record['config_hash']}) says top-1 {record['top1']}, the stored run {stored[0]} "
                        f"{stored[2]}; kept aside in {_set_aside(Path(records), name)}"
                    )
                else:
                    try:
                        insert_record(con, record, replace=True)
                        result.stored += 1
                    except (duckdb.DataError, duckdb.ProgrammingError, TypeError, ValueError) as exc:
                        result.invalid.append(f"{name}: values the database refuses ({str(exc).splitlines()[0]})")
    warn_skipped(records, result.invalid)
    if result.conflicts:
        lines = "\n  ".join(result.conflicts)
        print(f"warning: {len(result.conflicts)} record(s) in {records} disagree with stored runs of the same config "
              f"(the same config gives the same number; a difference is a finding). The stored runs were kept; "
              f"`harness run ... --force` reruns one to decide:\n  {lines}", file=sys.stderr)
    return result


def _set_aside(records: Path, name: str) -> Path:
    target = records / CONFLICTS / name
    target.parent.mkdir(exist_ok=True)
    os.replace(records / name, target)
    return target


def claim_run(records: Path, config_hash: str, label: str) -> Path | None:
    """Claim a run before starting it: an in-flight marker under `running/`, created only if no live
    process holds one (exclusive create), so two sweeps of one grid never train the same run twice.
    Returns the marker (unlink it when the run is stored), or None when another process has the run.
    A marker left by a process that is gone (same host, dead pid) is taken over."""
    path = Path(records) / "running" / f"{config_hash}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"label": label, "pid": os.getpid(), "host": socket.gethostname()}).encode()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                return None  # being written by its holder right now
            if holder.get("host") == socket.gethostname() and not process_alive(holder.get("pid", -1)):
                path.unlink(missing_ok=True)  # its process is gone: take the run over
                continue
            return None
        with os.fdopen(fd, "wb") as fh:
            fh.write(info)
        return path
    return None


def running(records: Path) -> list[dict]:
    """In-flight markers; a marker whose process is gone (killed worker) is reported as stale."""
    out = []
    for path in sorted((Path(records) / "running").glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        info["config_hash"] = path.stem
        info["stale"] = info.get("host") == socket.gethostname() and not process_alive(info.get("pid", -1))
        out.append(info)
    return out


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not yet reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): signal 0 reached it


def sweep_status(records: Path) -> dict:
    """Counts of the last planned sweep: done, failed, running (or stale), pending."""
    plan_path = Path(records) / PLAN
    if not plan_path.is_file():
        raise HarnessError(f"No distributed sweep found in {records} (no {PLAN}). Start one with `harness run --executor local|slurm`.")
    try:
        plan = json.loads(plan_path.read_text())["runs"]
        if not isinstance(plan, dict):
            raise TypeError("runs is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise HarnessError(
            f"The sweep plan {plan_path} is damaged ({type(exc).__name__}: {str(exc)[:120]}). It is rewritten when the "
            "sweep is submitted again: run the same `harness run --executor ...` command (finished runs are kept)."
        ) from None
    found, problems = scan_records(records)
    warn_skipped(records, problems)
    latest = {h: r for h, r in latest_per_run(found).items() if h in plan}
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
