"""No waste when processes meet: two identical sweeps on one database train each run once, and local
workers end when the `harness run` that started them is killed (issue 21, item 7)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from test_distributed import _descendants

from harness.records import claim_run

GRID = ["run", "--suite", "demo", "-m", "coop", "-d", "demo_shapes", "--shots", "1,2", "--seeds", "1,2"]


def test_a_claimed_run_is_left_to_its_holder_and_a_dead_holders_claim_taken_over(tmp_path):
    first = claim_run(tmp_path, "abc", "a run")
    assert first is not None and claim_run(tmp_path, "abc", "a run") is None  # held by this (live) process
    first.write_text('{"label": "a run", "pid": 999999, "host": "%s"}' % os.uname().nodename)  # its process died
    assert claim_run(tmp_path, "abc", "a run") is not None


def test_two_identical_sweeps_on_one_database_train_each_run_once(tmp_path, demo_root):
    db = tmp_path / "h.duckdb"
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "harness", *GRID, "--db", str(db)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [line for out in outs for line in out.splitlines() if line.startswith("ok coop")]
    assert len(trained) == 4 == len(set(trained)), outs  # every run trained once, by one of the two
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT config_hash) FROM runs WHERE status = 'ok'").fetchone() == (4, 4)
    assert not (tmp_path / "records").exists()  # the claims are gone with the runs


def test_local_workers_end_when_their_sweep_is_killed(tmp_path, demo_root):
    db = tmp_path / "h.duckdb"
    cmd = [sys.executable, "-m", "harness", *GRID, "--shots", "1,2,4,8", "--db", str(db), "--executor", "local", "--jobs", "1"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and not any(Path(tmp_path, "records").glob("*.json")):
        workers = _descendants(parent.pid) or workers
        time.sleep(0.2)
    workers = _descendants(parent.pid)
    assert workers, "the sweep should have started its worker"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers), "workers outlived the sweep that started them"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
