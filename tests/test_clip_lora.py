"""CLIP-LoRA and Block-LoRA end to end on the demo suite, through the real runner and CLI."""

import duckdb
import pytest
import torch
from typer.testing import CliRunner

from harness.backbones import Backbone, build_tiny
from harness.cli import app
from harness.grid import build_grid
from harness.runner import load_datasets, run_one
from methods import REGISTRY, ImageSet
from methods.base import Steps


def test_defaults_are_the_official_recipe():
    hp = REGISTRY["clip_lora"].defaults
    assert (hp["r"], hp["alpha"], hp["dropout"], hp["encoders"], hp["params"]) == (2, 1.0, 0.25, "both", "q,k,v")
    assert (hp["lr"], hp["min_lr"], hp["weight_decay"], hp["betas"]) == (2e-4, 1e-6, 1e-2, [0.9, 0.999])
    assert (hp["batch_size"], hp["steps_per_shot"], hp["crop_scale"], hp["logit_scale"]) == (32, 500, [0.08, 1.0], 100.0)
    assert hp["template"] == "a photo of a {}."
    block = REGISTRY["block_lora"]
    assert block.defaults == {**hp, "n_blocks": 8, "chunk_norm": "none", "dropout_before_sum": True, "a_init_fan_in": "block"}
    assert "reconstruction" in block.deviations.lower() and "2501.16720" in block.paper


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine a busy
    second thread can slow every step several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_tiny():
    """The seeded random-weight tiny CLIP, whatever demo weights are installed: zero-shot is at
    chance and the test measures what the adapters learn, not what pre-training put there."""
    return Backbone("tiny", build_tiny().eval().requires_grad_(False), 32, "tiny-random:seed0", torch.device("cpu"))


@pytest.fixture(scope="module")
def colours(demo_root):
    from pathlib import Path

    splits = load_datasets(["demo_colours"], Path("unused"))["demo_colours"]
    return splits, ImageSet(splits.root, "demo_colours", splits.test, 32)


def run(method, backbone, colours, shots=16, seed=1, sets=None):
    splits, test = colours
    (spec,) = build_grid([method], ["demo_colours"], "demo", [shots], [seed], {"tiny": backbone.weights}, "fp32", sets or {})
    return run_one(spec, backbone, splits, test, {}, lambda total, desc: Steps())


@pytest.fixture(scope="module")
def records(random_tiny, colours):
    before = {k: v.clone() for k, v in random_tiny.model.state_dict().items()}
    out = {m: run(m, random_tiny, colours) for m in ("zero_shot", "clip_lora", "block_lora")}
    after = random_tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a run changed the shared backbone"
    return out


@pytest.mark.parametrize("method,trainable", [("clip_lora", 4 * 3 * 2 * (64 + 64)), ("block_lora", 4 * 3 * 2 * (64 + 64 // 8))])
def test_beats_zero_shot_at_16_shots(records, method, trainable):
    zs, rec = records["zero_shot"], records[method]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["trainable_params"] == trainable
    assert rec["config"]["suite_overrides"] == {"steps_per_shot": 10, "lr": 5e-3}
    # observed: zero-shot 11.7 %, CLIP-LoRA 90.8 %, Block-LoRA 80.8 %
    assert rec["top1"] >= zs["top1"] + 30, (method, rec["top1"], zs["top1"])


def test_same_seed_same_accuracy(records, random_tiny, colours):
    again = run("block_lora", random_tiny, colours)
    assert again["top1"] == records["block_lora"]["top1"]


def test_divergence_is_a_failed_run(random_tiny, colours):
    rec = run("clip_lora", random_tiny, colours, shots=1, sets={"lr": 1e30, "steps_per_shot": 3})
    assert rec["status"] == "failed" and "diverged" in rec["error"]


def test_cli_runs_both_methods(demo_root, tmp_path):
    db = tmp_path / "x.duckdb"
    args = ["run", "--suite", "demo", "-m", "clip_lora,block_lora", "-d", "demo_shapes", "--shots", "1", "--seeds", "1",
            "--db", str(db), "--set", "steps_per_shot=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("select method, status, trainable_params, json_extract(config, '$.hparams.steps_per_shot') from runs order by method").fetchall()
    assert [(r[0], r[1], int(r[3])) for r in rows] == [("block_lora", "ok", 2), ("clip_lora", "ok", 2)]
    assert rows[0][2] < rows[1][2]
