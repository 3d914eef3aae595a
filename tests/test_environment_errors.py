"""When the machine fails, not the input: a message and exit 2, nothing half-written, no run stored as
failed for it (issue 21, item 6). A full disk is simulated by raising the OSError it raises."""

import errno
import json

import duckdb
import pytest

import harness.cache
import harness.data.demo
import harness.store
from harness.cli import run_cli

ZERO_SHOT = ["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_colours", "--seeds", "1"]


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/the/full/disk/file")


def test_bad_places_and_devices_are_messages(tmp_path, capsys, demo_root):
    db = tmp_path / "h.duckdb"
    assert run_cli([*ZERO_SHOT, "--db", str(db)]) == 0
    (tmp_path / "a_file").write_text("")
    cases = [
        (["report", "--db", str(db), "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        ([*ZERO_SHOT, "--db", str(db), "--device", "tpu"], "--device must be auto, cpu or cuda, not 'tpu'"),
        ([*ZERO_SHOT, "--db", str(tmp_path / ("x" * 300 + ".duckdb"))], "has a name of 307 bytes"),
        (["report", "--db", str(db), "--out", str(tmp_path / ("y" * 256))], "has a name of 256 bytes"),
    ]
    for args, message in cases:
        assert run_cli(args) == 2, args
        assert message in _err(capsys)


def test_a_damaged_plan_is_named(tmp_path, capsys):
    records = tmp_path / "records"
    records.mkdir()
    for damaged in ("{not json", json.dumps({"runs": ["not", "a", "map"]}), "[" * 100_000):
        (records / "plan.json").write_text(damaged)
        assert run_cli(["status", "--records", str(records)]) == 2
        err = _err(capsys)
        assert f"The sweep plan {records / 'plan.json'} is damaged" in err and "harness run --executor" in err


def test_an_unwritable_home_without_harness_cache_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.delenv("HARNESS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "a_file" / "home"))  # no folder can be made there
    assert run_cli([*ZERO_SHOT, "--db", str(tmp_path / "h.duckdb")]) == 2
    err = _err(capsys)
    assert "cache folder" in err and "HARNESS_CACHE" in err and not (tmp_path / "h.duckdb").exists()


def test_a_full_disk_while_drawing_the_demo_leaves_no_half_drawn_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = harness.data.demo.draw_image

    def fills_up(*args):
        calls["n"] += 1
        if calls["n"] > 20:
            _full_disk()
        return real(*args)

    monkeypatch.setattr(harness.data.demo, "draw_image", fills_up)
    assert run_cli([*ZERO_SHOT, "--db", str(tmp_path / "h.duckdb")]) == 2
    err = _err(capsys)
    assert "Could not write the demo datasets at /the/full/disk/file: the disk (or your quota) is full" in err
    demo = harness.data.demo.demo_root()
    assert not [p.name for p in demo.iterdir() if p.name.startswith(".")], list(demo.iterdir())  # no .tmp folder left


def test_a_full_cache_disk_during_a_run_stops_the_sweep_and_stores_no_failure(tmp_path, monkeypatch, capsys, demo_root):
    monkeypatch.setattr(harness.cache, "load_file", lambda path: {})  # every cached tensor is computed and written again
    monkeypatch.setattr(harness.cache, "save_file", _full_disk)
    db = tmp_path / "h.duckdb"
    assert run_cli([*ZERO_SHOT, "--db", str(db)]) == 2
    assert "the disk (or your quota) is full" in _err(capsys)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)  # not a failed run: the method did nothing wrong


@pytest.mark.parametrize("failure,message", [
    (KeyboardInterrupt, "Interrupted. Every run that finished is stored"),
    (duckdb.IOException("IO Error: No space left on device"), "is full"),
])
def test_a_database_write_that_fails_midway_keeps_the_run(tmp_path, monkeypatch, capsys, demo_root, failure, message):
    """Ctrl-C or a full disk inside the write's transaction: rolled back, the run kept as a record, no
    'cannot rollback' traceback."""
    def fails(*args):
        raise failure

    monkeypatch.setattr(harness.store, "row_digest", fails)
    db = tmp_path / "h.duckdb"
    assert run_cli([*ZERO_SHOT, "--db", str(db)]) == 2
    err = _err(capsys)
    assert message in err and "rollback" not in err.lower() and "Traceback" not in err
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)  # nothing half-written
    kept = list((tmp_path / "records").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["status"] == "ok"
    monkeypatch.undo()
    assert run_cli(["report", "--db", str(db), "--out", str(tmp_path / "out")]) == 0  # the kept run is ingested
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'ok'").fetchone() == (1,)


def test_a_database_in_a_read_only_folder_stops_before_the_first_run(tmp_path, monkeypatch, capsys, demo_root):
    """As root chmod does not bite, so the folder's permission check is what is made to fail here."""
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(folder) else real(path, mode, **kw))
    assert run_cli([*ZERO_SHOT, "--db", str(folder / "h.duckdb")]) == 2
    out, err = capsys.readouterr()
    assert "cannot be written" in " ".join(err.split()) and "ok zero_shot" not in out  # nothing trained first
