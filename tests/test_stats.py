"""Intervals, paired tests, ranks and the compare command, against values computed independently."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from harness.cli import run_cli
from harness.compare import compare, pair_runs
from harness.stats import interval, paired, ranks, t_interval, wilson_interval
from harness.store import write_record

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student t quantiles from printed tables


def test_t_interval_matches_the_textbook_formula():
    x = [70.0, 72.0, 74.5]
    mean, sd = sum(x) / 3, math.sqrt(sum((v - sum(x) / 3) ** 2 for v in x) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert t_interval(x) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert all(math.isnan(v) for v in t_interval([70.0]))
    assert t_interval([5.0, 5.0]) == (5.0, 5.0)


def test_wilson_interval_matches_the_closed_form():
    top1, n = 80.0, 200
    p, z = 0.8, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(top1, n) == pytest.approx((100 * (centre - half), 100 * (centre + half)), abs=1e-9)
    assert interval([80.0], 200) == wilson_interval(80.0, 200)  # one seed: the test-set interval
    assert interval([70.0, 72.0, 74.5]) == t_interval([70.0, 72.0, 74.5])  # seeds: the t-interval


def test_paired_uses_wilcoxon_or_the_sign_test():
    a = np.array([50.0, 60, 70, 80, 55, 65, 75])
    b = a + np.array([1.0, 2, 0.5, 1.5, 3, 0.2, 1])  # B ahead in all 7 cells
    r = paired(a, b)
    assert (r.test, r.wins, r.ties, r.losses) == ("wilcoxon", 7, 0, 0)
    assert r.p == pytest.approx(2 / 2**7)  # exact: only the all-positive sign pattern is as extreme, two-sided
    assert r.mean == pytest.approx(np.mean(b - a)) and r.lo < r.mean < r.hi and r.significant
    few = paired([50, 60, 70], [51, 61, 69])
    assert (few.test, few.wins, few.losses) == ("sign", 2, 1) and few.p == pytest.approx(1.0)  # binomial, 3 trials
    assert not few.significant


def test_ranks_friedman_and_critical_difference():
    scores = np.array([[80, 70, 60], [81, 72, 61], [79, 73, 62], [85, 70, 65], [82, 71, 60]], dtype=float)
    r = ranks(["a", "b", "c"], scores)
    assert r.avg_rank == [1.0, 2.0, 3.0]
    # Friedman statistic: 12N/(k(k+1)) * sum(R_j^2) - 3N(k+1) = 10, chi2 with 2 dof: p = exp(-5)
    assert r.friedman_p == pytest.approx(math.exp(-5))
    # Nemenyi: q_0.05 for k = 3 is 2.343 (Demsar 2006, Table 5a); CD = q sqrt(k(k+1)/(6N))
    assert r.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / 30), abs=2e-3)


def _run(method, dataset, shots, seed, top1, manifest="m", backbone="tiny", suite="demo"):
    config = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "hparams": {}}
    if shots:
        config["manifest_hash"] = f"{manifest}-{dataset}-{shots}-{seed}"
    return {"config_hash": f"{method}{dataset}{shots}{seed}{manifest}", "run_id": "x", "method": method, "dataset": dataset,
            "suite": suite, "backbone": backbone, "weights": "w", "shots": shots, "seed": seed, "config": json.dumps(config),
            "status": "ok", "top1": top1, "n_test": 100, "started_at": pd.Timestamp("2026-01-01"),
            "finished_at": pd.Timestamp("2026-01-01") + pd.Timedelta(seconds=seed)}


def test_runs_on_different_subsets_are_never_paired():
    rows = [_run("a", "d1", 1, 1, 50.0), _run("b", "d1", 1, 1, 60.0),  # same subset: paired
            _run("a", "d2", 1, 1, 50.0), _run("b", "d2", 1, 1, 60.0, manifest="other"),  # another subset: not
            _run("a", "d3", 1, 2, 50.0), _run("b", "d3", 1, 3, 60.0),  # other seed: not
            _run("z", "d1", 0, 1, 40.0)]  # zero-shot: pairs with any shots
    ok = pd.DataFrame(rows)
    assert pair_runs(ok, "a", "b")[["dataset", "a", "b"]].values.tolist() == [["d1", 50.0, 60.0]]
    assert pair_runs(ok, "z", "b")[["dataset", "shots", "a", "b"]].values.tolist() == [["d1", 1, 40.0, 60.0]]


def test_compare_verdict_in_words():
    rows = [_run(m, f"d{d}", k, s, 50 + d + k + (2 if m == "b" else 0) + 0.1 * s)
            for m in ("a", "b") for d in range(4) for k in (1, 16) for s in (1, 2)]
    result = compare(pd.DataFrame(rows), "a", "b")
    assert result.cells.n == 8 and result.cells.mean == pytest.approx(2.0)
    assert result.verdict.startswith("b better than a on 4 of 4 datasets, +2.0 points [2.0, 2.0] (wilcoxon")


def test_compare_command_exit_codes(tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    for r in [_run("a", "d1", 1, s, 50.0 + s) for s in (1, 2, 3)] + [_run("b", "d1", 1, s, 52.0 + s) for s in (1, 2, 3)] + [
        _run("c", "d2", 1, 1, 40.0)
    ]:
        write_record(db, r)
    assert run_cli(["compare", "a", "b", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "b - a" in out and "+2.00" in out and "1 of 1 datasets" in out.replace("\n", " ")
    assert run_cli(["compare", "a", "nope", "--db", str(db)]) == 2
    assert "No successful runs of 'nope'" in capsys.readouterr().err
    assert run_cli(["compare", "a", "c", "--db", str(db)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "Nothing to pair" in err and "c: d2 at shots [1]" in err


def test_bold_only_when_significantly_ahead_else_tied():
    from harness.report.significance import column_emphasis

    runs = [_run(m, f"d{d}", 4, s, 60 + d + s + gap) for m, gap in (("top", 2.0), ("far", 0.0)) for d in range(3) for s in (1, 2, 3)]
    ok = pd.DataFrame(runs)
    assert column_emphasis(ok, {"top": 63.0, "far": 61.0}) == {"top": "best"}  # 9 of 9 pairs ahead: Wilcoxon p < 0.05
    noisy = [_run("near", f"d{d}", 4, s, 60 + d + s + (2.5 if (d + s) % 2 else -1.5)) for d in range(3) for s in (1, 2, 3)]
    ok = pd.DataFrame(runs + noisy)
    marks = column_emphasis(ok, {"top": 63.0, "far": 61.0, "near": 62.5})
    assert marks == {"near": "tied", "top": "tied"}  # near is not significantly behind: nothing is bold


def test_demo_like_report_shows_intervals_pairs_and_ranks(tmp_path):
    db = tmp_path / "r.duckdb"
    for m, gap in (("a", 0.0), ("b", 1.5), ("c", 3.0)):
        for d in range(4):
            for k in (4, 16):
                for s in (1, 2, 3):
                    write_record(db, _run(m, f"demo_{d}", k, s, 50 + 3 * d + k / 4 + s + gap + 0.2 * ((d * s) % 3)))
    out = tmp_path / "rep"
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert "Paired comparisons" in html and "c better than a on 4 of 4 datasets" in html
    assert "Average ranks over datasets" in html and html.count("CD = ") >= 1
    assert re.search(r'<span class="ci">\[\d+\.\d, \d+\.\d\]</span>', html)
    board = pd.read_csv(out / "leaderboard.csv")
    assert {"lo", "hi"} <= set(board.columns) and (board["lo"] < board["mean"]).all()
    assert "[" in (out / "leaderboard.md").read_text()


def test_intervals_stay_in_range_and_identical_seeds_are_not_certainty():
    from harness.stats import interval, wilson_interval

    lo, hi = interval([99.0, 100.0, 100.0], n_test=240)
    assert 0 <= lo < 99.7 and hi == 100.0  # the t-interval alone would pass 100
    lo, hi = interval([55.0, 55.0, 55.0], n_test=240)  # three identical seeds
    w_lo, w_hi = wilson_interval(55.0, 240)
    assert (lo, hi) == pytest.approx((w_lo, w_hi)) and hi - lo > 10  # the test set's own error, not zero width
    assert interval([0.0, 0.0], n_test=100)[0] == 0.0
    assert interval([70.0], n_test=240) == wilson_interval(70.0, 240)  # one run: Wilson


def test_a_single_seed_shows_no_spread_and_pairs_read_row_vs_column(tmp_path):
    db = tmp_path / "r.duckdb"
    for m, gap in (("a", 0.0), ("c", 3.0)):
        for d in range(6):
            write_record(db, _run(m, f"demo_{d}", 4, 1, 50 + 3 * d + gap))
    out = tmp_path / "rep"
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert "\u00b10.00" not in html  # one seed: its Wilson interval, never a zero spread
    assert "Row vs column: row &minus; column" in html
    pairs = html[html.index('<table class="plain pairs">'):]
    rows = {r.split("</td>")[0].split(">")[-1]: r for r in pairs.split("</table>")[0].split('<tr><td class="name">')[1:]}
    assert 'class="better" title="c better than a on 6 of 6 datasets' in rows["c"]  # the better method's row is green
    assert 'class="worse" title="a worse than c' in rows["a"]
