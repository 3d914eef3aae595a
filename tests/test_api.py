"""The Python API (`from harness import api`): what the command line does, returning DataFrames."""

import pytest

from harness import api
from harness.errors import HarnessError


def test_run_results_compare_report_on_the_demo(tmp_path, demo_root):
    db = tmp_path / "h.duckdb"
    planned = api.run(["zero_shot", "tip-adapter"], ["demo_colours", "demo_shapes"], suite="demo", shots=[2], seeds=[1, 2],
                      db=db, dry_run=True)
    assert planned.attrs["dry_run"] and len(planned) == 4 + 4 and not planned["stored"].any() and not db.exists()
    runs = api.run(["zero_shot", "tip_adapter"], ["demo_colours", "demo_shapes"], suite="demo", shots=[2], seeds=[1, 2], db=db)
    assert not runs.attrs["failed"] and len(runs) == 8 and (runs["status"] == "ok").all()
    assert set(runs["method"]) == {"zero_shot", "tip_adapter"} and runs["top1"].between(0, 100).all()
    again = api.run(["zero_shot", "tip_adapter"], ["demo_colours", "demo_shapes"], suite="demo", shots=[2], seeds=[1, 2], db=db)
    assert sorted(again["run_id"]) == sorted(runs["run_id"])  # nothing redone: the same stored runs
    assert len(api.results(db)) == 8
    cmp = api.compare("zero_shot", "tip_adapter", db)
    assert len(cmp.pairs) == 4 and cmp.cells.wins + cmp.cells.ties + cmp.cells.losses == 2
    written = api.report(db, tmp_path / "out")
    assert written["html"].is_file() and "tip_adapter" in written["csv"].read_text()


def test_bad_input_raises_the_message_the_cli_prints(tmp_path):
    with pytest.raises(HarnessError, match="Did you mean 'clip_lora'"):
        api.run(["clip-lroa"], ["demo_colours"], suite="demo", db=tmp_path / "h.duckdb")
    with pytest.raises(HarnessError, match="Name a dataset"):
        api.run(["coop"], [], suite="demo", db=tmp_path / "h.duckdb")
