"""A finished run is never thrown away, and read-only commands are read-only (issue 11, items 7-9).

Each test breaks the store one way (locked, truncated, garbage, unkeyed, read-only folder), or the
records folder, the demo cache or an atomic write, and checks the message the user gets and that
nothing is stored as ok that should not be. Records here are FIXTURES shaped like demo runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from harness.cli import run_cli
from harness.errors import HarnessError
from harness.grid import config_hash_of
from harness.paths import atomic_write_text
from harness.records import ingest, read_records, write_record_file
from harness.store import connect, repair_runs, store_or_keep, write_record

T0 = datetime(2026, 1, 1, 12, 0)


KEYS: dict[str, str] = {}  # config hash -> the fixture's short name (h1, h2, ...)


def _record(key="h1", top1=61.5, minutes=0, method="coop", dataset="demo_shapes"):
    """A fixture run named `key`, with the real hash of its config (ingest checks it)."""
    config = {"method": method, "hparams": {"fixture": key}, "dataset": dataset, "suite": "demo", "shots": 4, "seed": 1}
    KEYS[config_hash_of(config)] = key
    return {"config_hash": config_hash_of(config), "run_id": f"fixture-{key}", "method": method, "dataset": dataset,
            "suite": "demo", "backbone": "tiny", "shots": 4, "seed": 1, "config": config, "status": "ok", "top1": top1,
            "trainable_params": 0, "started_at": T0, "finished_at": T0 + timedelta(minutes=minutes)}


def _hash(key: str) -> str:
    return _record(key)["config_hash"]


def _stored(db: Path) -> list[tuple]:
    """(fixture name, status, top1) of the stored runs."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT config_hash, status, top1 FROM runs").fetchall()
    finally:
        con.close()
    return sorted((KEYS.get(h, h), status, top1) for h, status, top1 in rows)


def _kept(records: Path, key: str = "h1") -> dict:
    return json.loads((records / f"{_hash(key)}.json").read_text())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _root_ignores_chmod(folder: Path) -> bool:
    """Root writes through mode 0o555, so a read-only folder can only be tested as another user."""
    return os.access(folder, os.W_OK)


def _good_db(db: Path) -> bytes:
    write_record(db, _record())
    return db.read_bytes()


@contextmanager
def holding_lock(db: Path, seconds: float):
    """Another process with `db` open (DuckDB's file lock) for `seconds`, from when it says ready."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ready', flush=True); time.sleep({seconds})"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_locked_database_keeps_the_run_as_a_record(tmp_path, monkeypatch):
    db, records = tmp_path / "h.duckdb", tmp_path / "records"
    _good_db(db)
    with holding_lock(db, 30) as holder:
        monkeypatch.setenv("HARNESS_DB_LOCK_WAIT", "1")
        with pytest.raises(HarnessError) as err:
            store_or_keep(db, _record("h2", 70.0), records)
    msg = _one_line(str(err.value))
    assert "is locked" in msg and f"PID {holder.pid}" in msg and "Waited 1 s" in msg
    assert f"kept in {records / (_hash('h2') + '.json')}" in msg and f"harness ingest --db {db} --records {records}" in msg
    assert _kept(records, "h2")["top1"] == 70.0
    assert _stored(db) == [("h1", "ok", 61.5)]  # nothing stored behind the lock
    assert ingest(records, db).stored == 1  # once the lock is gone, the kept run is stored
    assert _stored(db) == [("h1", "ok", 61.5), ("h2", "ok", 70.0)]


def test_lock_released_within_the_wait_is_waited_for(tmp_path, monkeypatch):
    db = tmp_path / "h.duckdb"
    _good_db(db)
    with holding_lock(db, 0.5):
        monkeypatch.setenv("HARNESS_DB_LOCK_WAIT", "20")
        store_or_keep(db, _record("h2", 70.0), tmp_path / "records")
    assert _stored(db) == [("h1", "ok", 61.5), ("h2", "ok", 70.0)]
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_database_file_keeps_the_run(tmp_path, damage):
    db, records = tmp_path / "h.duckdb", tmp_path / "records"
    data = _good_db(db)
    db.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"not a database\n" * 300)
    with pytest.raises(HarnessError) as err:
        store_or_keep(db, _record("h2", 70.0), records)
    msg = _one_line(str(err.value))
    assert f"{db} is not a readable DuckDB database" in msg and f"mv {db} {db}.broken" in msg
    assert "harness ingest" in msg and _kept(records, "h2")["top1"] == 70.0
    with pytest.raises(HarnessError, match="not a readable DuckDB database"), connect(db, read_only=True):
        pass
    assert run_cli(["report", "--db", str(db), "--out", str(tmp_path / "out")]) == 2


def test_runs_table_without_primary_key_is_refused_and_repaired(tmp_path):
    db, records = tmp_path / "h.duckdb", tmp_path / "records"
    con = duckdb.connect(str(db))  # as if restored from an export that dropped the key
    con.execute("CREATE TABLE runs (config_hash VARCHAR, status VARCHAR, top1 DOUBLE, finished_at TIMESTAMP)")
    con.execute("INSERT INTO runs VALUES ('h1', 'ok', 50.0, '2026-01-01 10:00'), ('h1', 'ok', 55.0, '2026-01-01 11:00')")
    con.close()
    with pytest.raises(HarnessError) as err:
        store_or_keep(db, _record("h2", 70.0), records)
    msg = _one_line(str(err.value))
    assert "has no PRIMARY KEY on config_hash" in msg and f"repair_runs('{db}')" in msg
    assert _kept(records, "h2")["top1"] == 70.0
    assert repair_runs(db) == 1  # the newest attempt of h1 kept
    assert ingest(records, db).stored == 1
    assert _stored(db) == [("h1", "ok", 55.0), ("h2", "ok", 70.0)]


def test_read_only_folder_keeps_the_run_elsewhere(tmp_path):
    folder, records = tmp_path / "ro", tmp_path / "records"
    folder.mkdir()
    db = folder / "h.duckdb"
    _good_db(db)
    folder.chmod(0o555)
    try:
        if _root_ignores_chmod(folder):
            pytest.skip("running as root: chmod does not make a folder read-only")
        with pytest.raises(HarnessError) as err:
            store_or_keep(db, _record("h2", 70.0), records)
    finally:
        folder.chmod(0o755)
    msg = _one_line(str(err.value))
    assert f"its folder {folder} is read-only or not writable" in msg and "write-ahead log" in msg
    assert _kept(records, "h2")["top1"] == 70.0 and _stored(db) == [("h1", "ok", 61.5)]


def test_run_that_cannot_be_kept_either_prints_its_numbers(tmp_path):
    db, records = tmp_path / "h.duckdb", tmp_path / "records"
    db.write_bytes(b"garbage" * 100)
    records.write_text("a file where the records folder should be")
    with pytest.raises(HarnessError) as err:
        store_or_keep(db, _record("h2", 70.25), records)
    msg = _one_line(str(err.value))
    assert "nor kept as a JSON record" in msg
    assert f"method=coop, dataset=demo_shapes, backbone=tiny, shots=4, seed=1, status=ok, top1=70.25, config_hash={_hash('h2')}" in msg


def test_ctrl_c_while_waiting_for_the_lock_keeps_the_run(tmp_path, monkeypatch):
    import harness.store

    def interrupted(db, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.store, "write_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store_or_keep(tmp_path / "h.duckdb", _record("h2", 70.0), tmp_path / "records")
    assert _kept(tmp_path / "records", "h2")["top1"] == 70.0


def test_report_and_check_on_a_read_only_folder_write_nothing(tmp_path):
    """Even as root (where chmod does not bite) the bytes, mtime and listing prove nothing was written."""
    folder, out = tmp_path / "ro", tmp_path / "out"
    folder.mkdir()
    db = folder / "h.duckdb"
    write_record(db, _record("h1", 61.0))
    write_record(db, {**_record("h0", 40.0, method="zero_shot"), "shots": 0})
    before = (db.read_bytes(), db.stat().st_mtime_ns, sorted(os.listdir(folder)))
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
        assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(out / "baseline.csv")]) == 0
        after = (db.read_bytes(), db.stat().st_mtime_ns, sorted(os.listdir(folder)))
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert after == before
    assert "Reproduction gap" in (out / "index.html").read_text()  # published numbers read from the CSVs
    con = duckdb.connect(str(db), read_only=True)
    assert "published" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    con.close()


def test_ingest_without_record_files_never_opens_the_database(tmp_path):
    db = tmp_path / "h.duckdb"
    assert ingest(tmp_path / "records", db).stored == 0  # no folder
    (tmp_path / "records" / "running").mkdir(parents=True)
    (tmp_path / "records" / "plan.json").write_text('{"runs": {}}')
    assert ingest(tmp_path / "records", db).stored == 0  # a folder with no record file
    assert not db.exists()


def test_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(UnicodeEncodeError):  # fails after the temporary file was created
        atomic_write_text(tmp_path / "a.json", "\ud800")
    (tmp_path / "b.json").mkdir()
    (tmp_path / "b.json" / "inside").write_text("x")
    with pytest.raises(OSError):  # the rename fails: a non-empty folder is in the way
        atomic_write_text(tmp_path / "b.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_half_generated_demo_folder_is_drawn_again(tmp_path, monkeypatch):
    from harness.cards import get_card
    from harness.data.demo import MARKER, ensure_demo

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    card = get_card("demo_shapes")
    root = ensure_demo([card])
    folder = root / card.folder
    split = (folder / card.split_file).read_text()
    images = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    marker_time = (folder / MARKER).stat().st_mtime_ns
    assert ensure_demo([card]) == root and (folder / MARKER).stat().st_mtime_ns == marker_time  # complete: kept

    # A run killed while drawing (by an older harness, without the marker): images missing, no split file.
    for path in images[len(images) // 2:]:
        (folder / path).unlink()
    (folder / card.split_file).unlink()
    (folder / MARKER).unlink()
    ensure_demo([card])
    assert (folder / card.split_file).read_text() == split
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.png")) == images
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    (folder / MARKER).write_text("drawn by another generator")
    (folder / card.split_file).unlink()
    ensure_demo([card])
    assert (folder / card.split_file).read_text() == split


def test_records_folder_with_truncated_foreign_and_duplicate_files(tmp_path, capsys):
    records, db = tmp_path / "records", tmp_path / "h.duckdb"
    write_record_file(records, _record("h1", 50.0, minutes=0))
    h1 = records / f"{_hash('h1')}.json"
    same = records / "h1 (copy from node 3).json"  # the same run copied: one run
    same.write_text(h1.read_text())
    other = records / "h1 (copy from node 2).json"  # the same config finished again with another number: a finding
    other.write_text(json.dumps({**json.loads(h1.read_text()), "run_id": "another", "top1": 52.0, "finished_at": "2026-01-01T13:00:00"}))
    write_record_file(records, _record("h2", 60.0))
    (records / "h3.json").write_text(json.dumps({k: str(v) for k, v in _record("h3").items()})[:80])  # truncated
    (records / "notes.json").write_text(json.dumps({"author": "me", "todo": ["more seeds"]}))  # foreign
    (records / "list.json").write_text("[1, 2, 3]")
    (records / "bad_values.json").write_text(json.dumps({**_record("h4"), "top1": "n/a", "started_at": None, "finished_at": None}))

    assert len(read_records(records)) == 3  # h1, h2, h4: the readers never crash
    result = ingest(records, db)
    assert (result.stored, result.unchanged, len(result.conflicts)) == (2, 1, 1)
    err = _one_line(capsys.readouterr().err)
    assert f"skipped 4 file(s) in {records}" in err
    assert "h3.json: not readable JSON, probably truncated" in err
    assert "notes.json: valid JSON but not a run record (no config_hash or status)" in err
    assert "list.json: valid JSON but not a run record" in err
    assert "bad_values.json: top1 is 'n/a', not a finite percentage in [0, 100]" in err
    assert "h1 (copy from node 2).json: coop demo_shapes 4-shot seed 1" in err and "says top-1 52.0" in err
    assert _stored(db) == [("h1", "ok", 50.0), ("h2", "ok", 60.0)]  # the stored run stays; the other is kept aside
    assert (records / "conflicts" / other.name).is_file() and not other.exists()
    again = ingest(records, db)
    assert (again.stored, again.unchanged, again.conflicts) == (0, 3, []) and _stored(db) == [("h1", "ok", 50.0), ("h2", "ok", 60.0)]
