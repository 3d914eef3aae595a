"""The command line a newcomer meets: names as typed, suggestions after a typo, paper variants in
`run`, a dry run that says what is stored, a listing that fits a terminal, `status` without a sweep."""

import duckdb

from harness.cli import run_cli

DEMO = ["run", "--suite", "demo", "--seeds", "1", "--shots", "1"]


def _out(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return " ".join(captured.out.split()), " ".join(captured.err.split())


def test_typos_get_suggestions_and_names_are_taken_as_typed(tmp_path, capsys, demo_root):
    db = tmp_path / "h.duckdb"
    assert run_cli([*DEMO, "-m", "tip-adaptr", "-d", "demo_colours", "--db", str(db)]) == 2
    assert "Did you mean 'tip_adapter'" in _out(capsys)[1]
    assert run_cli([*DEMO, "-m", "zero_shot", "-d", "demo_colors", "--db", str(db)]) == 2
    assert "Did you mean 'demo_colours'" in _out(capsys)[1]
    assert not db.exists()
    # `Tip-Adapter` and `demo-colours` are tip_adapter and demo_colours; coop_ctx4 runs coop with its variant's hparams
    assert run_cli([*DEMO, "-m", "Tip-Adapter,coop_ctx4", "-d", "demo-colours", "--db", str(db), "--set", "epochs=4"]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT method, json_extract_string(config, '$.hparams.n_ctx') FROM runs ORDER BY method").fetchall()
    assert rows == [("coop", "4"), ("tip_adapter", None)]


def test_dry_run_marks_stored_runs_and_creates_nothing(tmp_path, capsys, demo_root):
    db = tmp_path / "h.duckdb"
    assert run_cli([*DEMO, "-m", "zero_shot", "-d", "demo_colours", "--db", str(db)]) == 0
    capsys.readouterr()
    assert run_cli([*DEMO, "-m", "zero_shot,coop_ctx4", "-d", "demo_colours", "--db", str(db), "--dry-run"]) == 0
    out = _out(capsys)[0]
    assert "2 runs, 1 already stored" in out and "coop_ctx4" in out
    assert run_cli([*DEMO, "-m", "zero_shot", "-d", "demo_colours", "--db", str(tmp_path / "new.duckdb"), "--dry-run"]) == 0
    assert not (tmp_path / "new.duckdb").exists()


def test_list_methods_fits_a_terminal_and_shows_one_record(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert run_cli(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert any(line.startswith("│ two_sfs ") and "all four" in line for line in lines)
    assert any(line.startswith("│ gda ") and "closed-set" in line for line in lines)
    assert run_cli(["list", "methods", "coop-ctx4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "KaiyangZhou/CoOp@" in out and "n_ctx=4" in out and "known deviations" in out


def test_status_without_a_sweep_describes_the_database(tmp_path, capsys, demo_root):
    db = tmp_path / "h.duckdb"
    assert run_cli(["status", "--db", str(db)]) == 2
    assert run_cli([*DEMO, "-m", "zero_shot", "-d", "demo_colours", "--db", str(db)]) == 0
    capsys.readouterr()
    assert run_cli(["status", "--db", str(db)]) == 0
    out = _out(capsys)[0]
    assert "demo │ tiny │ fewshot │ 1 │ 1 │ 0" in out and "No distributed sweep" in out


def test_check_with_missing_entries_does_not_advise_update(tmp_path, capsys, demo_root):
    db, baseline = tmp_path / "h.duckdb", tmp_path / "b.csv"
    assert run_cli([*DEMO, "-m", "zero_shot", "-d", "demo_colours,demo_shapes", "--db", str(db)]) == 0
    assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(baseline)]) == 0
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM runs WHERE dataset = 'demo_shapes'")
    capsys.readouterr()
    assert run_cli(["check", "--db", str(db), "--baseline", str(baseline)]) == 1
    out = _out(capsys)[0]
    assert "missing from the database" in out and "`--update` would write a baseline without them" in out
