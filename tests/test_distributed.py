"""Sweeps over several worker processes through submitit: same numbers, nothing lost or doubled."""

import os
import signal
import threading
import time
from pathlib import Path

import duckdb

from harness.cli import run_cli
from harness.grid import config_hash_of
from harness.records import ingest, read_records, write_record_file
from harness.store import database_id


def stored(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT config_hash, method, dataset, shots, seed, status, top1 FROM runs ORDER BY config_hash").fetchall()
    finally:
        con.close()


SWEEP = ["run", "--suite", "demo", "-m", "zero_shot,tip_adapter", "--all-datasets", "--shots", "1,4", "--seeds", "1"]


def test_local_executor_stores_the_same_numbers_as_the_serial_run(tmp_path):
    serial, sharded = tmp_path / "serial.duckdb", tmp_path / "sharded.duckdb"
    assert run_cli(SWEEP + ["--db", str(serial)]) == 0
    assert run_cli(SWEEP + ["--db", str(sharded), "--executor", "local", "--jobs", "2"]) == 0
    assert stored(sharded) == stored(serial)
    assert len(stored(serial)) == 3 * (1 + 2)
    logs = list((tmp_path / "records" / "submitit").glob("*_log.out"))
    assert len({p.name.split("_")[0] for p in logs}) == 2  # two worker jobs ran


def test_slurm_path_runs_through_submitits_local_executor(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_SUBMITIT_CLUSTER", "local")
    db = tmp_path / "h.duckdb"
    args = ["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--db", str(db), "--executor", "slurm", "--jobs", "2",
            "--partition", "gpu", "--account", "lab", "--qos", "normal", "--time-min", "30"]
    assert run_cli(args + ["--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "9 runs in 2 slurm jobs" in out and "Nothing submitted" in out and not db.exists()
    assert run_cli(args) == 0
    assert len(stored(db)) == 9
    assert run_cli(["status", "--db", str(db)]) == 0
    assert "9" in capsys.readouterr().out


def test_records_from_concurrent_workers_are_ingested_once(tmp_path):
    records, db = tmp_path / "records", tmp_path / "h.duckdb"
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        config = {"method": "m", "dataset": "d", "suite": "demo", "shots": 1, "seed": i, "hparams": {}}
        write_record_file(records, {"config_hash": config_hash_of(config), "run_id": f"run{i}", "method": "m", "dataset": "d",
                                    "suite": "demo", "backbone": "tiny", "shots": 1, "seed": i, "status": "ok", "top1": 50.0 + i,
                                    "config": config, "finished_at": f"2026-11-22T10:00:0{i}"})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not db.exists()  # workers never touch the database
    assert ingest(records, db).stored == 2
    assert ingest(records, db).unchanged == 2  # a record ingested twice is one run
    assert sorted(r[6] for r in stored(db)) == [50.0, 51.0]


def _descendants(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            children += [child] + _descendants(child)
    return children


def test_killed_worker_then_resubmitted_sweep_loses_and_duplicates_nothing(tmp_path, demo_root):
    from harness.distributed import ClusterOptions, shard, submit, write_plan
    from harness.grid import build_grid

    db = tmp_path / "h.duckdb"
    records = tmp_path / "records"
    args = ["run", "--suite", "demo", "-m", "coop", "-d", "demo_shapes", "--shots", "1,2,4,8", "--seeds", "1,2", "--db", str(db)]
    grid = build_grid(["coop"], ["demo_shapes"], "demo", [1, 2, 4, 8], [1, 2], {"tiny": _tiny_identity()}, "fp32", {})
    shards = shard(grid, 1)
    records.mkdir(parents=True)
    write_plan(records, grid, shards, "first")
    (job,) = submit(shards, "local", records=records, data_root=demo_root, weights_paths={"tiny": None}, device="cpu",
                    opts=ClusterOptions(time_min=10), db_id=database_id(db), sweep_id="first")  # as `harness run` plans it
    deadline = time.monotonic() + 120
    while len(read_records(records)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in [int(job.job_id)] + _descendants(int(job.job_id)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_before = len(read_records(records))
    assert 2 <= done_before < len(grid), "the worker should die mid-sweep"
    first = {r["config_hash"]: r["run_id"] for r in read_records(records)}
    assert run_cli(args + ["--executor", "local", "--jobs", "2"]) == 0
    rows = stored(db)
    assert {h: run_id for h, run_id in stored_ids(db).items() if h in first} == first  # the killed worker's runs kept, not redone
    assert len(rows) == len(grid) == len({r[0] for r in rows})
    assert all(r[5] == "ok" for r in rows)
    assert {r[0] for r in rows} == {s.config_hash for s in grid}


def stored_ids(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return dict(con.execute("SELECT config_hash, run_id FROM runs").fetchall())
    finally:
        con.close()


def _tiny_identity():
    from harness.backbones import resolve_weights

    return resolve_weights("tiny")[1]
