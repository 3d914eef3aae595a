"""Generalisation protocols: CoCoOp's base/new split, cross-dataset and domain-shift targets, the
A/R class restriction, not-applicable results, and databases from before protocols."""

import json
import math

import duckdb
import pandas as pd
import pytest
import torch
from coop_layout import make_imagenet, make_imagenet_shifts, make_split_json

from harness.backbones import build_tiny
from harness.cards import get_card
from harness.cli import run_cli
from harness.data.fewshot import sample_coop
from harness.data.readers import read_dataset
from harness.protocols import base_new_labels, get_protocol, restrict


def evaluations(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(
            "SELECT r.method, e.target, e.status, e.top1, e.n_test, e.n_classes, e.reason, r.top1 "
            "FROM evaluations e JOIN runs r USING (config_hash) ORDER BY r.method, e.target"
        ).fetchall()
    finally:
        con.close()


def cocoop_reference(train_items, n_labels_hint=None):
    """Dassl's subsample_classes, written from its description: sorted labels of the train list,
    the first ceil(n/2) base, relabelled from 0."""
    labels = sorted({it.label for it in train_items})
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


@pytest.mark.parametrize("n_classes", [3, 4, 5])
def test_base_new_split_is_cocoops_rule(n_classes):
    from harness.data.readers import Item

    items = [Item(f"{c}/{k}.jpg", c, f"class {c}") for c in reversed(range(n_classes)) for k in range(2)]
    assert base_new_labels(it.label for it in items) == cocoop_reference(items)
    base, new = base_new_labels(it.label for it in items)
    kept = restrict(items, new, [f"class {c}" for c in range(n_classes)])
    assert sorted({it.label for it in kept}) == list(range(len(new)))  # relabelled from 0
    assert {it.classname for it in kept} == {f"class {c}" for c in new}


def test_base2new_trains_on_the_base_part_of_the_all_class_subset(tmp_path):
    """CoCoOp's order: the 16-shot subset is drawn on all classes, then restricted to the base ones."""
    from methods import REGISTRY
    from methods.base import Method, register

    seen = {}

    @register
    class Spy(Method):
        name = "spy_protocol"
        paper = "test double"
        open_vocabulary = True

        def fit(self, task):
            seen["train"], seen["classes"] = list(task.train.items), list(task.classnames)

        def predict(self, task, images, classnames=None):
            return torch.zeros(len(images), len(classnames or task.classnames))

    try:
        make_split_json(tmp_path, per_split=(6, 3, 5))
        ckpt = tmp_path / "t.pt"
        torch.save(build_tiny().state_dict(), ckpt)
        db = tmp_path / "d.duckdb"
        assert run_cli(["run", "-m", "spy_protocol", "--protocol", "base2new", "-d", "eurosat", "-b", "tiny", "--weights", str(ckpt),
                        "--data-root", str(tmp_path), "--db", str(db), "--shots", "4", "--seeds", "2"]) == 0
        splits = read_dataset(get_card("eurosat"), tmp_path)
        full = sample_coop(splits, 4, 2).train
        base, _ = cocoop_reference(full)
        assert seen["train"] == restrict(full, base, splits.classnames) and seen["classes"] == ["annual crop", "forest"]
        rows = evaluations(db)
        assert [(r[1], r[4], r[5]) for r in rows] == [("base", 10, 2), ("new", 5, 1)]  # each its own closed set
    finally:
        del REGISTRY["spy_protocol"]


def test_closed_set_methods_are_not_applicable_to_new_classes(tmp_path, capsys):
    db = tmp_path / "d.duckdb"
    args = ["run", "--suite", "demo", "-m", "zero_shot,tip_adapter", "--protocol", "base2new", "-d", "demo_colours",
            "--seeds", "1", "--db", str(db)]
    assert run_cli(args) == 0
    rows = {(r[0], r[1]): r for r in evaluations(db)}
    assert rows[("tip_adapter", "new")][2] == "not_applicable" and rows[("tip_adapter", "new")][3] is None
    assert "scores only the classes it was trained on" in rows[("tip_adapter", "new")][6]
    assert rows[("tip_adapter", "base")][2] == "ok" and rows[("tip_adapter", "new")][7] is None  # no headline, not failed
    zs = rows[("zero_shot", "base")][7]
    b, n = rows[("zero_shot", "base")][3], rows[("zero_shot", "new")][3]
    assert zs == pytest.approx(2 * b * n / (b + n))  # headline: harmonic mean
    out = tmp_path / "rep"
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert "Base-to-new generalisation" in html and 'class="na"' in html and "n/a" in html
    assert 'class="warn demo-note"' in html and "cannot show: generalisation" in html  # the demo says what it can show
    exported = pd.read_csv(out / "protocols.csv").set_index(["method", "target"])  # the protocol numbers are exported too
    assert exported.loc[("tip_adapter", "new"), "n_seeds"] == 0 and "trained on" in exported.loc[("tip_adapter", "new"), "not_applicable"]
    assert exported.loc[("zero_shot", "base"), "mean"] == pytest.approx(b)
    markdown, latex = (out / "leaderboard.md").read_text(), (out / "leaderboard.tex").read_text()
    assert "## Base-to-new (tiny, demo suite)" in markdown and "| method | base | new | H |" in markdown
    assert "tip_adapter" in markdown.split("## Base-to-new")[1] and "n/a" in markdown.split("## Base-to-new")[1]
    assert "% Base-to-new (tiny, demo suite)" in latex and "base & new & H" in latex
    assert "CoCoOp, Zhou et al. CVPR 2022" not in html  # published averages are for ViT-B/16 only
    baseline = tmp_path / "b.csv"  # check guards the headline and every per-target number
    assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(baseline)]) == 0
    guarded = baseline.read_text()
    assert "zero_shot (base2new),demo_colours:new" in guarded and "tip_adapter (base2new),demo_colours:base" in guarded
    assert "tip_adapter (base2new),demo_colours:new" not in guarded  # not applicable: nothing to guard
    assert run_cli(["check", "--db", str(db), "--baseline", str(baseline)]) == 0


def test_domain_shift_restricts_a_and_r_to_their_classes(tmp_path, capsys):
    make_imagenet(tmp_path)
    make_imagenet_shifts(tmp_path)
    ckpt = tmp_path / "t.pt"
    torch.save(build_tiny().state_dict(), ckpt)
    db = tmp_path / "d.duckdb"
    args = ["run", "-m", "zero_shot,tip_adapter", "--protocol", "domain_shift", "-b", "tiny", "--weights", str(ckpt),
            "--data-root", str(tmp_path), "--db", str(db), "--shots", "2", "--seeds", "1", "--set", "augment_views=1"]
    assert run_cli(args) == 0
    rows = {(r[0], r[1]): r for r in evaluations(db)}
    for method in ("zero_shot", "tip_adapter"):  # tip_adapter too: A/R classes are a subset of the source's
        assert rows[(method, "imagenet_a")][5] == 2 and rows[(method, "imagenet_r")][5] == 2
        assert rows[(method, "imagenetv2")][5] == 3 and rows[(method, "imagenet")][5] == 3
        assert all(rows[(method, t)][2] == "ok" for t in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"))
    # An A/R class list that does not name ImageNet's classes stops before any run.
    (tmp_path / "imagenet-adversarial" / "classnames.txt").write_text("n01443537 gold fish\nn01484850 great white shark\nn01440764 tench\n")
    assert run_cli(args + ["--db", str(tmp_path / "other.duckdb")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "imagenet_a" in err and "gold fish" in err and not (tmp_path / "other.duckdb").exists()


def test_sourced_protocols_train_on_their_source(tmp_path, capsys):
    """--all-datasets means the protocol's datasets: the source for cross-dataset and domain shift (not
    every dataset as a source); a domain-shift run on another dataset would score it on the source's
    shifted versions, and is refused before any run; -d X is X as a cross-dataset source."""
    protocol = get_protocol("domain_shift")
    assert protocol.datasets("demo", [], all_datasets=True) == ["demo_shapes"]
    assert get_protocol("cross_dataset").datasets("demo", [], all_datasets=True) == ["demo_shapes"]
    assert get_protocol("cross_dataset").datasets("demo", ["demo_colours"]) == ["demo_colours"]
    assert get_protocol("base2new").datasets("demo", [], all_datasets=True) == ["demo_colours", "demo_shapes", "demo_textures"]
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--protocol", "domain_shift", "-d", "demo_colours", "--db", str(db)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trains on demo_shapes only" in err and "not demo_colours's" in err and not db.exists()


def test_cross_dataset_from_the_demo_source(tmp_path):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--protocol", "cross_dataset", "--seeds", "1", "--db", str(db)]) == 0
    rows = evaluations(db)
    assert [r[1] for r in rows] == ["demo_colours", "demo_shapes", "demo_textures"]
    headline = rows[0][7]
    assert headline == pytest.approx((rows[0][3] + rows[2][3]) / 2)  # the targets' mean, not the source
    assert get_protocol("cross_dataset").targets_for("demo_shapes", "demo")[0].name == "demo_shapes"
    # zero-shot scores each target with the target's own template, as every paper's zero-shot row:
    # the same number as its own zero-shot run on that dataset
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_colours,demo_textures", "--seeds", "1", "--db", str(db)]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        own = dict(con.execute("SELECT dataset, top1 FROM runs WHERE protocol = 'fewshot' OR protocol IS NULL").fetchall())
    assert {r[1]: r[3] for r in rows if r[1] != "demo_shapes"} == pytest.approx(own)


def test_a_database_from_before_protocols_still_reports(tmp_path):
    """The runs table as the harness wrote it before protocols: no protocol column, no evaluations."""
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE runs (config_hash VARCHAR PRIMARY KEY, run_id VARCHAR, method VARCHAR, dataset VARCHAR, suite VARCHAR, "
                "backbone VARCHAR, weights VARCHAR, shots INTEGER, seed INTEGER, config JSON, status VARCHAR, top1 DOUBLE, "
                "n_test INTEGER, trainable_params BIGINT, train_seconds DOUBLE, eval_seconds DOUBLE, peak_mem_mb DOUBLE, "
                "device VARCHAR, precision VARCHAR, harness_version VARCHAR, git_sha VARCHAR, started_at TIMESTAMP, "
                "finished_at TIMESTAMP, error VARCHAR)")
    for seed in (1, 2):
        config = json.dumps({"method": "coop", "hparams": {"n_ctx": 16}, "dataset": "demo_shapes", "shots": 4, "seed": seed})
        con.execute("INSERT INTO runs VALUES (?, 'r', 'coop', 'demo_shapes', 'demo', 'tiny', 'w', 4, ?, ?, 'ok', ?, 240, 1024, "
                    "1.0, 0.1, 900.0, 'cpu', 'fp32', '0.1.0', 'abc', '2026-01-01 00:00:00', '2026-01-01 00:01:00', NULL)",
                    [f"h{seed}", seed, config, 50.0 + seed])
    con.close()
    out = tmp_path / "rep"
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    assert "coop" in (out / "leaderboard.md").read_text()
    assert run_cli(["check", "--db", str(db), "--update", "--baseline", str(tmp_path / "b.csv")]) == 0
