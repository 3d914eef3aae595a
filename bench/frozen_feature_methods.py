"""Runs per minute of the frozen-feature methods (CLIP-Adapter, TaskRes, LP++, CLAP, GDA, ProLIP) on the demo suite,
with the bank of encoded augmented views cold and warm.

Every run goes through the real runner (`run_one`, demo-suite overrides included), one process:
- cold: before each run the views cached on disk and in memory are dropped, so the run encodes
  every augmented view it trains on (no sharing between methods or runs);
- warm: the same runs again, the views now in memory (what a later method or a repeated run on the
  same few-shot subset gets in a sweep; from disk across processes).
Test pixels and frozen test features are cached by a zero-shot pass first, so both passes time the
training side only. The cache is a temporary folder unless --cache is given.

    python -m bench.frozen_feature_methods [--shots 1,16] [--seeds 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.frozen_feature_methods", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="clip_adapter,taskres,lp_pp,clap,gda,prolip")
    p.add_argument("--shots", default="1,16")
    p.add_argument("--seeds", default="1")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="cache folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="bench-frozen-"))
    os.environ["HARNESS_CACHE"] = str(cache)

    import torch

    from harness.backbones import load_backbone
    from harness.cards import suite_cards
    from harness.grid import build_grid
    from harness.paths import cache_dir
    from harness.runner import load_datasets, run_one
    from methods import ImageSet
    from methods.base import Steps

    torch.set_num_threads(args.threads)
    methods, shots = args.methods.split(","), [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = [c.name for c in suite_cards("demo")]
    backbone = load_backbone(args.backbone, None, args.device)
    splits = load_datasets(datasets, Path("unused"))
    tests = {d: ImageSet(splits[d].root, d, splits[d].test, backbone.image_size) for d in datasets}
    memory: dict = {}

    def run(method, dataset, k, seed):
        (spec,) = build_grid([method], [dataset], "demo", [k], [seed], {backbone.name: backbone.weights}, "fp32", {})
        t0 = time.perf_counter()
        record = run_one(spec, backbone, splits[dataset], tests[dataset], memory, lambda total, desc: Steps())
        assert record["status"] == "ok", record.get("error")
        return time.perf_counter() - t0, record["top1"]

    for d in datasets:  # test pixels and frozen test features, shared by both passes
        run("zero_shot", d, 0, 1)
    points = [(m, d, k, s) for d in datasets for m in methods for k in shots for s in seeds]
    seconds: dict[str, dict[str, float]] = {"cold": {m: 0.0 for m in methods}, "warm": {m: 0.0 for m in methods}}
    top1 = {}
    for phase in ("cold", "warm"):
        for m, d, k, s in points:
            if phase == "cold":
                for key in [k_ for k_ in memory if isinstance(k_, tuple) and k_[0] == "view"]:
                    del memory[key]
                shutil.rmtree(cache_dir() / "views", ignore_errors=True)
            dt, acc = run(m, d, k, s)
            seconds[phase][m] += dt
            top1[(phase, m, d, k, s)] = acc
    same = all(top1[("cold", *pt)] == top1[("warm", *pt)] for pt in points)
    per_method = len(datasets) * len(shots) * len(seeds)
    print(f"{'method':<14}{'cold runs/min':>15}{'warm runs/min':>15}{'cold s/run':>12}{'warm s/run':>12}")
    summary = {"backbone": backbone.name, "device": args.device, "runs_per_method": per_method, "shots": shots,
               "same_top1_cold_and_warm": same, "methods": {}}
    for m in methods:
        cold, warm = seconds["cold"][m] / per_method, seconds["warm"][m] / per_method
        print(f"{m:<14}{60 / cold:>15.1f}{60 / warm:>15.1f}{cold:>12.2f}{warm:>12.2f}")
        summary["methods"][m] = {"cold_s_per_run": round(cold, 3), "warm_s_per_run": round(warm, 3),
                                 "cold_runs_per_min": round(60 / cold, 1), "warm_runs_per_min": round(60 / warm, 1)}
    total_cold, total_warm = sum(seconds["cold"].values()), sum(seconds["warm"].values())
    summary["all"] = {"cold_runs_per_min": round(60 * len(points) / total_cold, 1),
                      "warm_runs_per_min": round(60 * len(points) / total_warm, 1)}
    print(f"{'all':<14}{summary['all']['cold_runs_per_min']:>15.1f}{summary['all']['warm_runs_per_min']:>15.1f}")
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
