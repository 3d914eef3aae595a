"""Records from outside a run are checked as strictly as a run of our own: the run-record schema,
conflicts with stored runs kept aside, and records that belong to one database (issue 21, items 1-2)."""

import json

import duckdb
import pytest
from runs import run_method

from harness.cli import run_cli
from harness.records import ingest, write_record_file
from harness.store import database_id, write_record


@pytest.fixture(scope="module")
def real_record(tiny, demo_root):
    """A real zero-shot run's record (what a worker writes)."""
    record = run_method("zero_shot", "demo_colours", 0, tiny)
    assert record["status"] == "ok"
    return record


def _text(captured) -> tuple[str, str]:
    """stdout and stderr with rich's line wrapping undone."""
    return " ".join(captured.out.split()), " ".join(captured.err.split())


def _rows(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT config_hash, run_id, top1 FROM runs ORDER BY config_hash").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("change,why", [
    ({"top1": 250.0}, "top1 is 250.0, not a finite percentage in [0, 100]"),
    ({"top1": float("nan")}, "top1 is nan, not a finite percentage"),
    ({"top1": -5}, "top1 is -5, not a finite percentage"),
    ({"top1": None}, "top1 is missing"),
    ({"status": "great"}, "status is 'great', not one of ok, failed"),
    ({"shots": -1}, "shots is -1, not an integer in 0..10000"),
    ({"seed": "1"}, "seed is '1', not an integer"),
    ({"method": "../../etc/passwd x"}, "method '../../etc/passwd x' is not a name"),
    ({"config_hash": "0" * 16}, "is not the hash of the record's own config"),
    ({"dataset": "demo_shapes"}, "dataset differ between the record and its config"),
    ({"train_seconds": float("inf")}, "train_seconds is inf, not a finite non-negative number"),
    ({"error": "x" * 200_000}, "error holds 200,000 characters"),
    ({"memory_basis": "vibes"}, "memory_basis is 'vibes', not one of"),
    ({"machine_load": -1.0}, "machine_load is -1.0, not a finite non-negative number"),
])
def test_ingest_refuses_records_that_break_the_schema(tmp_path, capsys, real_record, change, why):
    records, db = tmp_path / "records", tmp_path / "h.duckdb"
    write_record_file(records, {**real_record, **change})
    result = ingest(records, db)
    assert result.stored == 0 and len(result.invalid) == 1 and why in result.invalid[0], result.invalid
    assert why in capsys.readouterr().err
    assert not db.exists()  # nothing to store: the database was never opened


def test_a_record_whose_recipe_is_no_protocol_is_refused(tmp_path, real_record):
    """`config.recipe` is outside the hash (the hyper-parameters are hashed) but labels the report's rows."""
    records, db = tmp_path / "records", tmp_path / "h.duckdb"
    write_record_file(records, {**real_record, "config": {**real_record["config"], "recipe": "vibes"}})
    result = ingest(records, db)
    assert result.stored == 0 and "config's recipe 'vibes' is not a protocol" in result.invalid[0], result.invalid


def test_a_deeply_nested_or_huge_file_is_refused_not_a_crash(tmp_path, capsys, real_record):
    records, db = tmp_path / "records", tmp_path / "h.duckdb"
    write_record_file(records, real_record)
    (records / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (records / "huge.json").write_text(json.dumps({"config_hash": "x", "status": "ok", "pad": "x" * 3_000_000}))
    result = ingest(records, db)
    assert result.stored == 1
    assert any("deep.json: JSON nested too deep" in p for p in result.invalid)
    assert any("huge.json: 3,000,0" in p and "larger than any run record" in p for p in result.invalid)
    assert run_cli(["check", "--db", str(db), "--baseline", str(tmp_path / "none.csv")]) == 2  # a message, no traceback
    assert "no baseline" in _text(capsys.readouterr())[1].lower()


def test_a_conflicting_record_is_kept_aside_and_a_forced_rerun_replaces(tmp_path, capsys, real_record):
    records, db = tmp_path / "elsewhere", tmp_path / "h.duckdb"
    write_record(db, real_record)
    later = {**real_record, "run_id": "b" * 32, "top1": 99.9, "finished_at": "2030-01-01T00:00:00"}
    write_record_file(records, later)
    assert run_cli(["ingest", "--db", str(db), "--records", str(records)]) == 0
    out, err = _text(capsys.readouterr())
    assert "0 new run(s)" in out and "1 conflicting (kept aside)" in out
    assert "says top-1 99.9" in err and f"the stored run {real_record['run_id']}" in err
    assert _rows(db) == [(real_record["config_hash"], real_record["run_id"], real_record["top1"])]  # never replaced
    assert (records / "conflicts" / f"{real_record['config_hash']}.json").is_file()
    # the same number under another run id is the same result: nothing to report
    write_record_file(records, {**later, "top1": real_record["top1"]})
    assert ingest(records, db).unchanged == 1
    # a --force rerun names the run it replaces
    write_record_file(records, {**later, "replaces": real_record["run_id"]})
    assert ingest(records, db).stored == 1
    assert _rows(db) == [(real_record["config_hash"], "b" * 32, 99.9)]


def test_a_database_takes_only_its_own_records(tmp_path, capsys, real_record):
    """Two databases in one folder share its records/ folder: each takes its own on its own; a
    record for the other waits for an explicit `harness ingest`, which says where it came from."""
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    other = {**real_record, "config": {**real_record["config"], "seed": 2}, "seed": 2, "run_id": "c" * 32}
    from harness.grid import config_hash_of

    other["config_hash"] = config_hash_of(other["config"])
    write_record(b, other)  # b holds one run of its own
    records = tmp_path / "records"
    write_record_file(records, {**real_record, "db_id": database_id(a)})  # a's sweep left a record
    out = tmp_path / "out"
    assert run_cli(["report", "--db", str(b), "--out", str(out)]) == 0
    assert "were made for another database" in _text(capsys.readouterr())[1]
    assert [r[1] for r in _rows(b)] == ["c" * 32]
    assert run_cli(["check", "--db", str(b), "--update", "--baseline", str(out / "b.csv")]) == 0
    assert (out / "b.csv").read_text().count("\n") == 2  # header + b's own run
    assert run_cli(["report", "--db", str(a), "--out", str(out)]) == 0  # a takes its own record
    assert [r[1] for r in _rows(a)] == [real_record["run_id"]]
    capsys.readouterr()
    assert run_cli(["ingest", "--db", str(b), "--records", str(records)]) == 0  # asked for: imported, and said so
    assert "made for another database" in _text(capsys.readouterr())[0]
    assert len(_rows(b)) == 2


def test_a_command_reads_the_records_once_and_a_later_record_is_taken(tmp_path, monkeypatch, real_record):
    """`harness compare` takes the database's records for its note and again through the API: the folder
    is parsed once while nothing changed (compare, then report); a record written afterwards is taken
    by the next call, and an unchanged folder is not parsed again."""
    import harness.records as records_module
    from harness import api
    from harness.grid import config_hash_of

    scans = []
    real_scan = records_module.scan_records
    monkeypatch.setattr(records_module, "scan_records", lambda folder: scans.append(folder) or real_scan(folder))
    db = tmp_path / "a.duckdb"
    records = tmp_path / "records"
    write_record_file(records, {**real_record, "db_id": database_id(db)})
    run_cli(["compare", "zero_shot", "tip_adapter", "--db", str(db)])  # (nothing to pair: the records are read all the same)
    assert len(scans) == 1 and [r[1] for r in _rows(db)] == [real_record["run_id"]]
    assert run_cli(["report", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert len(scans) == 1
    later = {**real_record, "config": {**real_record["config"], "seed": 2}, "seed": 2, "run_id": "d" * 32, "db_id": database_id(db)}
    later["config_hash"] = config_hash_of(later["config"])
    write_record_file(records, later)
    assert len(api.results(db)) == 2 and len(scans) == 2
    assert len(api.results(db)) == 2 and len(scans) == 2  # unchanged: not parsed again


TAMPER = '''
import os

import duckdb
import torch

from methods.base import Method, register


@register
class Tamper(Method):
    """A plugin that rewrites another method's stored number while it "trains"."""

    name = "tamper"
    paper = "test fixture"
    uses_shots = False

    def fit(self, task):
        con = duckdb.connect(os.environ["TAMPER_DB"])
        con.execute("UPDATE runs SET top1 = 99.9 WHERE method = 'zero_shot'")
        con.close()

    def predict(self, task, images, classnames=None):
        return torch.zeros(len(images), len(classnames or task.classnames))
'''


def test_a_row_changed_after_it_was_stored_is_named_by_report_and_check(tmp_path, monkeypatch, capsys, demo_root):
    db, plugin = tmp_path / "h.duckdb", tmp_path / "tamper.py"
    plugin.write_text(TAMPER)
    monkeypatch.setenv("TAMPER_DB", str(db))
    base = ["--suite", "demo", "-d", "demo_colours", "--seeds", "1", "--db", str(db)]
    assert run_cli(["run", "-m", "zero_shot", *base]) == 0
    assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(tmp_path / "b.csv")]) == 0
    assert run_cli(["run", "-m", "tamper", "--method-path", str(plugin), *base]) == 0
    capsys.readouterr()
    assert run_cli(["check", "--db", str(db), "--baseline", str(tmp_path / "b.csv")]) == 1  # a pass would hide it
    err = _text(capsys.readouterr())[1]
    assert "ALTERED 1 stored run(s)" in err and "zero_shot demo_colours 0-shot seed 1" in err and "top-1 99.9" in err
    assert run_cli(["report", "--db", str(db), "--out", str(tmp_path / "out"), "--method-path", str(plugin)]) == 0
    html = (tmp_path / "out" / "index.html").read_text()
    assert 'id="altered"' in html and "zero_shot demo_colours 0-shot seed 1" in html
    assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(tmp_path / "b.csv")]) == 2
    assert run_cli(["run", "-m", "zero_shot", *base, "--force"]) == 0  # a rerun seals the row again
    assert run_cli(["check", "--db", str(db), "--baseline", str(tmp_path / "b.csv")]) == 0
