"""CLIP-LoRA and Block-LoRA end to end on the demo suite, through the real runner and CLI."""

import duckdb
import pytest
import torch
from runs import eval_images, run_method
from typer.testing import CliRunner

from harness.cli import app
from methods import REGISTRY


def test_defaults_are_the_official_recipe():
    hp = REGISTRY["clip_lora"].defaults
    assert (hp["r"], hp["alpha"], hp["dropout"], hp["encoders"], hp["params"]) == (2, 1.0, 0.25, "both", "q,k,v")
    assert (hp["lr"], hp["min_lr"], hp["weight_decay"], hp["betas"]) == (2e-4, 1e-6, 1e-2, [0.9, 0.999])
    assert (hp["batch_size"], hp["steps_per_shot"], hp["crop_scale"], hp["logit_scale"]) == (32, 500, [0.08, 1.0], 100.0)
    assert hp["template"] == "a photo of a {}."
    block = REGISTRY["block_lora"]
    assert block.defaults == {**hp, "n_blocks": 8, "chunk_norm": "none", "dropout_before_sum": True, "a_init_fan_in": "block"}
    assert "reconstruction" in block.deviations.lower() and "2501.16720" in block.paper


@pytest.fixture(scope="module")
def records(random_tiny, demo_root):
    before = {k: v.clone() for k, v in random_tiny.model.state_dict().items()}
    out = {m: run_method(m, "demo_colours", 16, random_tiny) for m in ("zero_shot", "clip_lora", "block_lora")}
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


def test_same_seed_same_accuracy(records, random_tiny):
    again = run_method("block_lora", "demo_colours", 16, random_tiny)
    assert again["top1"] == records["block_lora"]["top1"]


def test_divergence_is_a_failed_run(random_tiny, demo_root):
    rec = run_method("clip_lora", "demo_colours", 1, random_tiny, sets={"lr": 1e30, "steps_per_shot": 3})
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


@pytest.mark.parametrize("method", ["clip_lora", "coop", "tip_adapter_f"])
def test_fp16_trains_with_dynamic_loss_scaling(random_tiny, demo_root, method, monkeypatch):
    """--precision fp16 is fp16 autocast with a GradScaler (CLIP-LoRA's official recipe), exercised
    here on CPU, where torch runs both; bf16 and fp32 get a pass-through scaler."""
    from pathlib import Path

    from harness.data.fewshot import manifest_for
    from harness.runner import load_datasets
    from methods import ImageSet, Task

    splits = load_datasets(["demo_colours"], Path("."))["demo_colours"]
    manifest = manifest_for(splits, 1, 1)
    size = random_tiny.image_size
    scalers = []
    real = Task.grad_scaler

    def spy(task):
        scalers.append(real(task))
        return scalers[-1]

    monkeypatch.setattr(Task, "grad_scaler", spy)
    results = {}
    for precision in ("fp32", "fp16"):
        task = Task(
            card=splits.card, classnames=splits.classnames, shots=1, seed=1, backbone=random_tiny, precision=precision,
            train=ImageSet(splits.root, "demo_colours", manifest.train, size),
            val=ImageSet(splits.root, "demo_colours", manifest.val, size),
        )
        torch.manual_seed(0)
        fit = REGISTRY[method](**{"clip_lora": {"steps_per_shot": 8}, "coop": {"epochs": 2}, "tip_adapter_f": {"epochs": 2, "augment_views": 1}}[method])
        fit.fit(task)
        test = eval_images(task)
        logits = fit.predict(task, test)
        assert torch.isfinite(logits).all()
        results[precision] = (logits.argmax(-1) == test.labels).float().mean().item()
    assert [s.is_enabled() for s in scalers] == [False, True]
    assert scalers[1].get_scale() > 1  # the loss really was scaled
    assert abs(results["fp16"] - results["fp32"]) < 0.1, results
