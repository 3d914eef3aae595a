"""A plain (non-editable) install finds the dataset cards, demo weights, templates and published numbers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_ships_its_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    assert not (target / "datasets").exists()  # no top-level package shadowing Hugging Face `datasets`
    probe = (
        "import harness, harness.cards as c, harness.backbones as b, harness.published as p, harness.protocols as pr;"
        "print(harness.__file__); print(len(c.all_cards())); print(b.resolve_weights('tiny')[1]); print(p.published_dir());"
        "print(len(pr.protocols()), len(p.generalisation_frame()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "HARNESS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert int(out[1]) == 20  # 11 standard + 4 domain-shift targets + 3 demo + 2 demo shifted copies
    assert out[2].startswith("tiny-demo:")
    assert str(target) in out[3]
    from harness.published import generalisation_frame

    assert out[4] == f"4 {len(generalisation_frame())}"  # the protocols file and every published generalisation number ship too
