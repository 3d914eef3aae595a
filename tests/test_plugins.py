"""Methods from outside the repository: the example package installed with its entry point, the
same file through --method-path, submitit workers, and broken plugins refused with exit 2."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from harness import plugins
from harness.cli import run_cli
from harness.grid import RunSpec
from methods import REGISTRY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "linear_probe"
PROBE = EXAMPLE / "linear_probe.py"
DEMO_RUN = ["run", "--suite", "demo", "-m", "linear_probe", "-d", "demo_shapes", "--shots", "1", "--seeds", "1"]


def runs(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT method, status, top1, config, protocol FROM runs ORDER BY started_at").fetchall()
    finally:
        con.close()


def test_the_installed_example_is_listed_run_stored_and_reported(tmp_path):
    """pip-installed into a folder on PYTHONPATH, the example's entry point registers linear_probe in a
    fresh process: listed, run, stored, reported; and a broken plugin there is one line, exit 2."""
    source = shutil.copytree(EXAMPLE, tmp_path / "src")  # setuptools builds in the source tree: not in the repo's
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert pip.returncode == 0, pip.stderr
    db, bad = tmp_path / "h.duckdb", tmp_path / "bad.py"
    bad.write_text("import not_a_module_anywhere\n")
    commands = [["list", "methods"], DEMO_RUN + ["--db", str(db)], ["report", "--db", str(db), "--out", str(tmp_path / "rep")],
                ["list", "methods", "--method-path", str(bad)]]
    script = f"import sys\nfrom harness.cli import run_cli\nfor argv in {commands!r}:\n    print('exit', run_cli(argv), flush=True)\n"
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("exit ")] == ["exit 0", "exit 0", "exit 0", "exit 2"]
    assert "linear_probe" in out.stdout and "harness-linear-probe 0.1.0" in out.stdout
    assert f"plugin {bad} failed to import: ModuleNotFoundError" in " ".join(out.stderr.split())
    [(method, status, top1, config, _)] = runs(db)
    assert (method, status) == ("linear_probe", "ok") and math.isfinite(top1)
    assert json.loads(config)["method_source"] == {"distribution": "harness-linear-probe", "version": "0.1.0"}
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "linear_probe" in html and "no longer registered" not in html  # the entry point loads for report too
    assert "linear_probe" in (tmp_path / "rep" / "leaderboard.csv").read_text()


def test_method_path_runs_under_every_protocol_keyed_by_file_content(tmp_path, capsys):
    probe = tmp_path / "probe.py"
    shutil.copy(PROBE, probe)
    db = tmp_path / "h.duckdb"
    assert run_cli(DEMO_RUN + ["--db", str(db), "--method-path", str(probe)]) == 0
    [(_, status, top1, config, _)] = runs(db)
    assert status == "ok" and math.isfinite(top1)
    assert json.loads(config)["method_source"] == {"file_sha256": hashlib.sha256(probe.read_bytes()).hexdigest()}
    assert str(probe) not in config  # the content, never the path, keys the run
    assert run_cli(DEMO_RUN + ["--db", str(db), "--method-path", str(probe)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    plugins.reset()  # a new process: an edited file is a new run
    probe.write_text(probe.read_text() + "\n# edited\n")
    assert run_cli(DEMO_RUN + ["--db", str(db), "--method-path", str(probe)]) == 0
    assert len(runs(db)) == 2
    b2n = ["run", "--suite", "demo", "-m", "linear_probe", "--protocol", "base2new", "-d", "demo_colours", "--seeds", "1",
           "--db", str(db), "--method-path", str(probe)]
    assert run_cli(b2n) == 0
    con = duckdb.connect(str(db), read_only=True)
    evals = dict(con.execute("SELECT e.target, e.status FROM evaluations e JOIN runs r USING (config_hash) "
                             "WHERE r.protocol = 'base2new'").fetchall())
    con.close()
    assert evals == {"base": "ok", "new": "not_applicable"}  # open_vocabulary False: a head over its training classes
    assert run_cli(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--method-path", str(probe)]) == 0


def test_builtin_hashes_are_unchanged():
    spec = RunSpec("zero_shot", "demo_shapes", "tiny", 0, 1, "demo", "w", "fp32", {"templates": "card"}, {})
    assert "method_source" not in spec.config
    assert spec.config_hash == "d6e89d375f574abd"  # as without plugins (protocol coop-v3)


def test_a_worker_loads_the_method_path_file_itself(tmp_path):
    """A submitit worker is a fresh process: ShardJob loads the planning process's --method-path files
    before running, and refuses a plugin whose content changed since the sweep was planned."""
    from harness.distributed import ShardJob, check_plugins
    from harness.grid import build_grid
    from harness.records import read_records

    plugins.load_plugins([PROBE])
    files = plugins.loaded_files()
    [spec] = build_grid(["linear_probe"], ["demo_shapes"], "demo", [1], [1], {"tiny": "w"}, "fp32", {})
    plugins.reset()
    assert "linear_probe" not in REGISTRY  # as in a new worker process
    records = tmp_path / "records"
    job = ShardJob([spec], str(tmp_path), str(records), {}, "cpu", 1, files)
    assert job() == {"ok": 1, "failed": 0, "skipped": 0}
    [record] = read_records(records)
    assert record["status"] == "ok" and record["config"]["method_source"] == spec.method_source
    changed = RunSpec("linear_probe", "demo_shapes", "tiny", 1, 1, "demo", "w", "fp32", {}, {}, method_source={"file_sha256": "0" * 64})
    with pytest.raises(plugins.HarnessError, match="changed after the sweep started"):
        check_plugins([changed], files)


BROKEN = {
    "import_error": ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    "raises": ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    "no_name": ("from methods import Method, register\n@register\nclass P(Method):\n    paper = 'x'\n", "class P has no `name`"),
    "no_paper": ("from methods import Method, register\n@register\nclass P(Method):\n    name = 'p'\n", "class P has no `paper`"),
    "not_a_method": ("from methods import register\n@register\nclass P:\n    name = 'p'\n", "P is not a subclass of methods.Method"),
    "nothing": ("def helper():\n    return 1\n", "registers no method"),
    "builtin_name": ("from methods import Method, register\n@register\nclass P(Method):\n    name = 'coop'\n    paper = 'x'\n",
                     "registers method 'coop', which is already the built-in method 'coop' (methods.coop)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_plugin_is_exit_2_naming_the_file(tmp_path, capsys, case):
    code, message = BROKEN[case]
    bad = tmp_path / f"{case}.py"
    bad.write_text(code)
    before = dict(REGISTRY)
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "--all-datasets", "--db", str(tmp_path / "h.duckdb"),
                    "--method-path", str(bad)]) == 2
    out = capsys.readouterr()
    err = " ".join(out.err.split())
    assert f"plugin {bad}" in err and message in err and "Traceback" not in out.err + out.out
    assert REGISTRY == before and not (tmp_path / "h.duckdb").exists()  # refused before anything ran, nothing left registered


def test_two_plugins_with_one_name_name_both_files(tmp_path, capsys):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    shutil.copy(PROBE, first)
    second.write_text(PROBE.read_text().replace("(linear probe)", "(another probe)"))
    assert run_cli(["list", "methods", "--method-path", str(first), "--method-path", str(second)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"plugin {second} registers method 'linear_probe', which is already plugin {first}" in err


def test_entry_points_naming_classes_modules_or_other_things(tmp_path, monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    (tmp_path / "two_probes.py").write_text(
        "from methods import Method, register\n"
        "@register\nclass A(Method):\n    name = 'probe_a'\n    paper = 'x'\n"
        "@register\nclass B(Method):\n    name = 'probe_b'\n    paper = 'x'\n"
        "class Unregistered(Method):\n    name = 'probe_c'\n    paper = 'x'\n"
        "class Clash(Method):\n    name = 'zero_shot'\n    paper = 'x'\n"
        "def helper():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "two_probes", raising=False)
    found = []
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [e for e in found if e.group == group])

    def load(*values):
        plugins.reset()
        found[:] = [EntryPoint(f"ep{i}", v, plugins.GROUP) for i, v in enumerate(values)]
        return run_cli(["list", "methods"])

    assert load("two_probes:A", "two_probes:B", "two_probes", "two_probes:Unregistered") == 0  # a class is registered for it
    assert {"probe_a", "probe_b", "probe_c"} <= set(REGISTRY) and plugins.method_source("probe_c") == {"distribution": "unknown",
                                                                                                         "version": "unknown"}
    capsys.readouterr()
    assert load("two_probes:Clash") == 2
    assert "entry point 'ep0 = two_probes:Clash'" in " ".join(capsys.readouterr().err.split())
    assert REGISTRY["zero_shot"].__module__ == "methods.zero_shot"
    assert load("two_probes:helper") == 2
    assert "not a Method subclass or a module" in " ".join(capsys.readouterr().err.split())
