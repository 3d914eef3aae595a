"""`harness check` guards the stored numbers against a baseline: equal passes, a drop beyond the
seed-derived tolerance fails naming method, dataset, shots and drop, a missing entry fails.

Records here are FIXTURES written with harness.store.write_record (shaped like demo runs).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import run_cli
from harness.regression import compare
from harness.store import connect, write_record

ACCURACY = {("zero_shot", 0): 45.0, ("clip_lora", 1): 60.0, ("clip_lora", 4): 70.0, ("coop", 1): 55.0, ("coop", 4): 66.0}


def _write(db: Path, method: str, dataset: str, shots: int, seed: int, top1: float) -> None:
    hparams = {"n_ctx": 4, "ctx_init": "a photo of a"} if method == "coop" else {}
    config = {"method": method, "hparams": hparams, "dataset": dataset, "suite": "demo", "shots": shots, "seed": seed}
    write_record(db, {"config_hash": f"{method}-{dataset}-{shots}-{seed}", "run_id": f"fixture-{method}-{seed}", "method": method,
                      "dataset": dataset, "suite": "demo", "backbone": "tiny", "shots": shots, "seed": seed, "config": config,
                      "status": "ok", "top1": top1, "trainable_params": 0, "finished_at": datetime.now()})


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "demo.duckdb"
    for (method, shots), acc in ACCURACY.items():
        for dataset in ("demo_shapes", "demo_colours"):
            for seed in (1, 2):
                _write(path, method, dataset, shots, seed, acc + 0.2 * seed)
    return path


def check(db: Path, baseline: Path, *extra: str) -> int:
    return run_cli(["check", "--db", str(db), "--baseline", str(baseline), *extra])


def test_update_then_equal_passes(db, tmp_path, capsys):
    baseline = tmp_path / "baselines" / "demo.csv"
    assert check(db, baseline) == 2 and "--update" in capsys.readouterr().err  # no baseline yet: usage error, not a pass
    assert check(db, baseline, "--update") == 0
    frame = pd.read_csv(baseline)
    assert len(frame) == len(ACCURACY) * 2 and set(frame.method) == {"zero_shot", "clip_lora", "coop_ctx4"}
    assert check(db, baseline) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "tolerance = max(floor" in out


def test_lowered_accuracy_fails_naming_the_drop(db, tmp_path, capsys):
    baseline = tmp_path / "demo.csv"
    assert check(db, baseline, "--update") == 0
    for seed in (1, 2):  # clip_lora, 4 shots, demo_shapes: 3 points lower on both seeds
        _write(db, "clip_lora", "demo_shapes", 4, seed, ACCURACY[("clip_lora", 4)] + 0.2 * seed - 3.0)
    assert check(db, baseline) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "REGRESSION clip_lora on demo_shapes, 4 shots (tiny): dropped 3.00 points" in out
    assert check(db, baseline, "--tolerance-floor", "5") == 0  # within a 5-point floor


def test_small_moves_within_the_seed_spread_pass(db, tmp_path):
    baseline = tmp_path / "demo.csv"
    assert check(db, baseline, "--update") == 0
    _write(db, "coop", "demo_colours", 1, 1, ACCURACY[("coop", 1)] + 0.2 - 0.8)  # mean drops 0.4 < floor 1.0
    assert check(db, baseline) == 0


def test_missing_entry_fails(db, tmp_path, capsys):
    baseline = tmp_path / "demo.csv"
    assert check(db, baseline, "--update") == 0
    with connect(db) as con:
        con.execute("DELETE FROM runs WHERE method = 'coop' AND dataset = 'demo_colours' AND shots = 4")
    assert check(db, baseline) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "MISSING coop_ctx4 on demo_colours, 4 shots (tiny)" in out


def test_tolerance_grows_with_the_seed_spread():
    key = {"method": "m", "dataset": "d", "backbone": "tiny", "shots": 1}
    base = pd.DataFrame([{**key, "mean": 70.0, "std": 2.0, "n_seeds": 3}])
    now = pd.DataFrame([{**key, "mean": 67.0, "std": 1.0, "n_seeds": 3}])
    row = compare(now, base, floor=1.0).table.iloc[0]
    assert row.tolerance == pytest.approx(4.0) and row.status == "ok"  # 2 x std 2.0
    assert compare(now, base.assign(std=0.5), floor=1.0).table.iloc[0].status == "regression"


GOOD = "method,dataset,backbone,shots,mean,std,n_seeds\nzero_shot,demo_shapes,tiny,0,45.3,0.14,2\n"


@pytest.mark.parametrize("content,where", [
    (GOOD + "coop_ctx4,demo_shapes,tiny,1,,0.1,2\n", "row 3, column 'mean': ''"),
    (GOOD + "coop_ctx4,demo_shapes,tiny,1,n/a,0.1,2\n", "row 3, column 'mean': 'n/a'"),
    (GOOD + "coop_ctx4,demo_shapes,tiny,1,nan,0.1,2\n", "row 3, column 'mean': 'nan'"),
    (GOOD + "coop_ctx4,demo_shapes,tiny,1,130,0.1,2\n", "row 3, column 'mean': '130'"),
    (GOOD + "coop_ctx4,demo_shapes,tiny,one,55.3,0.1,2\n", "row 3, column 'shots': 'one'"),
    (GOOD + "coop_ctx4,demo_shapes,tiny,1,55.3,high,2\n", "row 3, column 'std': 'high'"),
    (GOOD + GOOD.splitlines()[1] + "\n", "has 2 rows for the same entry"),
    ('method,dataset\n"unterminated,x\n', "not a readable CSV"),
    ("", "not a readable CSV"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a text CSV file"),
])
def test_a_baseline_that_is_not_all_numbers_is_refused_by_row_and_column(db, tmp_path, capsys, content, where):
    baseline = tmp_path / "bad.csv"
    baseline.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert check(db, baseline) == 2  # a usage error, never a pass and never a traceback (exit 1 reads as a regression)
    err = " ".join(capsys.readouterr().err.split())
    assert where in err and "bad.csv" in err


def test_update_refuses_a_partial_sweep_unless_asked(db, tmp_path, capsys):
    with connect(db) as con:  # an interrupted sweep: one cell lost a seed, another is gone
        con.execute("DELETE FROM runs WHERE method = 'coop' AND dataset = 'demo_colours' AND shots = 4 AND seed = 2")
        con.execute("DELETE FROM runs WHERE method = 'clip_lora' AND dataset = 'demo_shapes' AND shots = 1")
    baseline = tmp_path / "demo.csv"
    assert check(db, baseline, "--update") == 2 and not baseline.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "2 cell(s) missing or with fewer seeds" in err
    assert "clip_lora demo_shapes 1-shot tiny: 0 of 2 seeds" in err and "coop_ctx4 demo_colours 4-shot tiny: 1 of 2 seeds" in err
    assert check(db, baseline, "--update", "--allow-partial") == 0 and baseline.exists()
