"""End-to-end runs through the CLI: the store, resuming, failures, interruptions, bad input."""

import subprocess
import sys
import time

import duckdb
import pytest
import torch
from coop_layout import make_fgvc, make_imagenet, make_split_json
from safetensors.torch import save_file

from harness.backbones import build_tiny
from harness.cli import run_cli
from methods import REGISTRY
from methods.base import Method, check_finite
from methods.zero_shot import ZeroShot


def rows(db, where="TRUE"):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT method, dataset, shots, seed, status, top1, error, weights FROM runs WHERE {where} ORDER BY dataset, seed").fetchall()
    finally:
        con.close()


def test_demo_zero_shot_sweep_stores_runs_and_resumes(tmp_path, capsys):
    db = tmp_path / "runs.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--db", str(db)]) == 0
    stored = rows(db)
    assert len(stored) == 3 * 3  # 3 demo datasets x 3 seeds, zero-shot at shots=0
    assert all(r[4] == "ok" and 0 <= r[5] <= 100 for r in stored)
    con = duckdb.connect(str(db), read_only=True)
    provenance = con.execute("SELECT DISTINCT packages, harness_version, device, precision FROM runs").fetchall()
    con.close()
    assert len(provenance) == 1 and "open_clip_torch" in provenance[0][0] and provenance[0][2:] == ("cpu", "fp32")
    capsys.readouterr()
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "Nothing to do" in out and "9 skipped" in out
    assert len(rows(db)) == 9
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--seeds", "1", "--db", str(db), "--force"]) == 0
    assert len(rows(db)) == 9  # redone, not duplicated


def test_empty_data_root_names_every_missing_dataset(tmp_path, capsys):
    code = run_cli(["run", "-m", "zero_shot", "--all-datasets", "--data-root", str(tmp_path / "nothing"), "--db", str(tmp_path / "db.duckdb")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for folder in ("imagenet", "caltech-101", "food-101", "fgvc_aircraft", "ucf101"):
        assert str(tmp_path / "nothing" / folder) in err.replace("\n", "")
    assert not (tmp_path / "db.duckdb").exists()


def test_zero_shot_with_weights_file_on_coop_layout_data(tmp_path):
    make_split_json(tmp_path)
    make_fgvc(tmp_path)
    make_imagenet(tmp_path)
    model = build_tiny()
    with torch.no_grad():
        model.logit_scale.fill_(1.0)  # a distinct, saved checkpoint
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    db = tmp_path / "runs.duckdb"
    args = ["run", "-m", "zero_shot", "-d", "eurosat,fgvc_aircraft,imagenet", "-b", "tiny", "--weights", str(ckpt),
            "--data-root", str(tmp_path), "--db", str(db), "--seeds", "1"]
    assert run_cli(args) == 0
    stored = rows(db)
    assert [r[1] for r in stored] == ["eurosat", "fgvc_aircraft", "imagenet"]
    assert all(r[4] == "ok" and r[7].startswith("file:") for r in stored)
    # The same weights saved as safetensors give the same accuracies.
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    db2 = tmp_path / "runs2.duckdb"
    assert run_cli([a if a != str(ckpt) else str(st) for a in args[:-4]] + ["--db", str(db2), "--seeds", "1"]) == 0
    assert [r[5] for r in rows(db2)] == [r[5] for r in stored]


def test_mismatched_or_missing_weights_exit_2(tmp_path, capsys):
    make_split_json(tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3)}, bad)
    base = ["run", "-m", "zero_shot", "-d", "eurosat", "-b", "tiny", "--data-root", str(tmp_path), "--db", str(tmp_path / "d.duckdb")]
    assert run_cli(base + ["--weights", str(bad)]) == 2
    assert "do not fit backbone 'tiny'" in capsys.readouterr().err
    assert run_cli(base + ["--weights", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_openai_weights_fail_fast_with_instructions(tmp_path, capsys):
    make_split_json(tmp_path)
    start = time.monotonic()
    code = run_cli(["run", "-m", "zero_shot", "-d", "eurosat", "-b", "ViT-B-32", "--data-root", str(tmp_path), "--db", str(tmp_path / "d.duckdb")])
    assert code == 2 and time.monotonic() - start < 10
    assert "--weights PATH" in capsys.readouterr().err.replace("\n", " ")


def test_unknown_method_and_bad_set_exit_2(tmp_path, capsys):
    assert run_cli(["run", "--suite", "demo", "-m", "nope", "--all-datasets", "--db", str(tmp_path / "d.duckdb")]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--set", "bogus=1", "--db", str(tmp_path / "d.duckdb")]) == 2


class Exploding(Method):
    name = "exploding"
    paper = "test double"

    def fit(self, task):
        if task.card.name == "demo_colours":
            raise RuntimeError("boom")

    def predict(self, task, images):
        return torch.zeros(len(images), len(task.classnames))


class Diverging(Method):
    name = "diverging"
    paper = "test double"

    def fit(self, task):
        check_finite(torch.tensor(float("nan")), step=7)


def test_failed_and_diverged_runs_are_stored_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "exploding", Exploding)
    monkeypatch.setitem(REGISTRY, "diverging", Diverging)
    db = tmp_path / "d.duckdb"
    code = run_cli(["run", "--suite", "demo", "-m", "exploding,diverging", "-d", "demo_colours,demo_shapes", "--shots", "1", "--seeds", "1", "--db", str(db)])
    assert code == 1
    stored = rows(db)
    assert len(stored) == 4
    status = {(r[0], r[1]): (r[4], r[6]) for r in stored}
    assert status[("exploding", "demo_colours")][0] == "failed" and "boom" in status[("exploding", "demo_colours")][1]
    assert status[("exploding", "demo_shapes")][0] == "ok"
    assert status[("diverging", "demo_shapes")][0] == "failed" and "nan at step 7" in status[("diverging", "demo_shapes")][1]


def test_ctrl_c_keeps_completed_runs_and_the_next_invocation_resumes(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    class Interrupted(ZeroShot):
        def fit(self, task):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            super().fit(task)

    monkeypatch.setitem(REGISTRY, "zero_shot", Interrupted)
    db = tmp_path / "d.duckdb"
    args = ["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--db", str(db)]
    assert run_cli(args) == 2
    assert "Interrupted" in capsys.readouterr().err
    assert len(rows(db)) == 2
    assert run_cli(args) == 0
    stored = rows(db)
    assert len(stored) == 9 and len({(r[1], r[3]) for r in stored}) == 9


def test_locked_database_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_DB_LOCK_WAIT", "1")
    db = tmp_path / "d.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        code = run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--seeds", "1", "--db", str(db)])
        assert code == 2
        assert "locked" in capsys.readouterr().err
    finally:
        holder.kill()


def test_corrupt_test_image_stops_with_exit_2_naming_the_file(tmp_path, capsys):
    folder = make_split_json(tmp_path)
    victim = folder / "2750" / "forest" / "test_2.jpg"
    victim.write_bytes(b"\x00garbage")
    code = run_cli(["run", "-m", "zero_shot", "-d", "eurosat", "-b", "tiny", "--seeds", "1", "--data-root", str(tmp_path), "--db", str(tmp_path / "d.duckdb")])
    assert code == 2
    assert "test_2.jpg" in capsys.readouterr().err.replace("\n", "")


def test_sigint_mid_sweep_in_a_real_process(tmp_path, demo_root):
    """Ctrl-C as a user sends it: exit 2 with a message, finished runs kept, the rerun completes the rest."""
    import os
    import signal

    db = tmp_path / "d.duckdb"
    cmd = [sys.executable, "-m", "harness", "run", "--suite", "demo", "-m", "coop", "-d", "demo_shapes", "--shots", "1,2,4,8,16",
           "--seeds", "1", "--db", str(db)]
    # Unbuffered: the "ok" line must reach the pipe when it is printed, not when the process exits
    # (block-buffered, a busy machine saw the whole sweep finish before the signal was sent).
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    # A shell's background jobs inherit SIGINT as ignored, and Python then keeps ignoring it: give
    # the sweep the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # the first finished run: four runs of several seconds each are still to come
        if line.startswith("ok coop"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Interrupted" in err and "Traceback" not in err
    kept = rows(db)
    assert 1 <= len(kept) < 5 and all(r[4] == "ok" for r in kept)
    assert subprocess.run(cmd, capture_output=True, text=True, env=env).returncode == 0
    final = rows(db)
    assert len(final) == 5 and len({r[2] for r in final}) == 5


class Hungry(Method):
    """Holds ~400 MB during fit on one dataset only."""

    name = "hungry"
    paper = "test double"

    def fit(self, task):
        if task.card.name == "demo_colours":
            block = torch.ones(100_000_000)  # 400 MB, touched
            assert float(block[-1]) == 1.0

    def predict(self, task, images):
        return torch.zeros(len(images), len(task.classnames))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-run CPU peak uses Linux's VmHWM reset")
def test_cpu_peak_memory_is_per_run(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "hungry", Hungry)
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "hungry", "-d", "demo_colours,demo_shapes", "--shots", "1", "--seeds", "1", "--db", str(db)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT dataset, peak_mem_mb, memory_basis, machine_load FROM runs").fetchall()
    con.close()
    peak = {dataset: mb for dataset, mb, _, _ in rows}
    assert peak["demo_colours"] - peak["demo_shapes"] > 300  # the later, small run does not inherit the big one's peak
    # The run's own rise over the process's resident memory: the big run's 400 MB, not the process's ~1 GB.
    assert 380 < peak["demo_colours"] < 600 and peak["demo_shapes"] < 200
    assert {basis for _, _, basis, _ in rows} == {"cpu resident increase"}
    assert all(load is not None and load >= 0 for *_, load in rows)
