"""`python -m bench.run`: training / evaluation throughput, time split, peak memory and projected
16-shot run time of every method on the real ViT-B-16 / ViT-L-14 architectures (random weights,
synthetic JPEGs and prompts), and the harness's CLIP-LoRA speed-up over a reference-style loop
(bench/reference.py) on the same device in the same process.

`--quick --device cpu`: the same at tiny size in under a minute; the LAST line printed is one JSON
object with `speedup_vs_reference` and the key figures. `--accuracy`: CLIP-LoRA trained by the
harness loop and by the reference loop on a demo dataset (tiny backbone, same steps and seeds),
final top-1 of both. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from bench.reference import ReferenceLoop
from bench.synthetic import classnames, make_task, random_backbone, write_jpegs
from bench.timing import Sections, peak_mb, reset_peak, sync, timed
from bench.utilisation import peak_tflops, vision_utilisation
from methods import REGISTRY
from methods.base import ImageSet, Task

SPLIT = ("data", "text", "image", "backward", "optimizer")
# Methods that train inside the encoders with CLIP-LoRA's loop (start_training / train_step), and
# their steps per shot (2SFS: its 300 x K, the 40 % of stage 2 counted as full steps, an upper bound).
LORA_METHODS = {"clip_lora": 500, "block_lora": 500, "clip_svd": 200, "two_sfs": 300}
ALL_METHODS = ("zero_shot", "coop", "tip_adapter", "tip_adapter_f", *LORA_METHODS)


def precision_for(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def n_test_for(classes: int) -> int:
    """Test images a run evaluates in the projection: 50 per class (ImageNet: 50,000 for 1,000)."""
    return 50 * classes


# ----------------------------------------------------------------------------------------------
# CLIP-LoRA / Block-LoRA: the method's own training step (methods/clip_lora.py), timed step-wise.


def bench_lora(name: str, task: Task, test: ImageSet, cfg: dict, hp: dict | None = None) -> dict:
    dev = task.device
    reset_peak(dev)
    method = REGISTRY[name](**(hp or {}))
    setup_s, state = timed(dev, method.start_training, task)
    for s in range(cfg["warmup"]):
        method.train_step(task, state, s)
    step_s, _ = timed(dev, lambda: [method.train_step(task, state, s) for s in range(cfg["steps"])])
    step_s /= cfg["steps"]
    sections = Sections(dev)
    for s in range(cfg["split_steps"]):
        with sections("total"):
            method.train_step(task, state, s, section=sections)
    peak = peak_mb(dev)
    method.finish_training(state)
    eval_s, _ = timed(dev, method.predict, task, test)
    bs = int(method.hp["batch_size"])
    return {
        "setup_s": setup_s, "step_s": step_s, "steps_per_s": 1 / step_s, "train_images_per_s": bs / step_s,
        "eval_images_per_s": len(test) / eval_s, "peak_mb": peak,
        "split": {k: sections.totals[k] / sections.totals["total"] for k in SPLIT},
        "setup_per_image_s": setup_s / len(task.train), "trainable": method.trainable_parameters(),
    }


def project_lora(r: dict, classes: int, shots: int = 16, steps_per_shot: int = 500) -> float:
    """One 16-shot run: decoding 16 x C originals, 500 x 16 steps, evaluating 50 x C cached test images."""
    return r["setup_per_image_s"] * shots * classes + steps_per_shot * shots * r["step_s"] + n_test_for(classes) / r["eval_images_per_s"]


# ----------------------------------------------------------------------------------------------
# The reference-style loop (bench/reference.py) on the same task.


def bench_reference(task: Task, test: ImageSet, root: Path, cfg: dict, workers: int) -> dict:
    dev = task.device
    reset_peak(dev)
    hp = REGISTRY["clip_lora"].defaults
    t0 = time.perf_counter()
    loop = ReferenceLoop(task.backbone.model, task.classnames, root, task.train.items, task.backbone.image_size, dev, hp,
                         total_steps=500 * task.shots, workers=workers)
    setup_s = time.perf_counter() - t0
    for _ in range(cfg["warmup"]):
        loop.step()
    step_s, _ = timed(dev, lambda: [loop.step() for _ in range(cfg["steps"])])
    step_s /= cfg["steps"]
    sections = Sections(dev)
    for _ in range(cfg["split_steps"]):
        with sections("total"):
            loop.step(section=sections)
    peak = peak_mb(dev)
    eval_s, _ = timed(dev, loop.evaluate, test.items)
    bs = int(hp["batch_size"])
    return {
        "setup_s": setup_s, "step_s": step_s, "steps_per_s": 1 / step_s, "train_images_per_s": bs / step_s,
        "eval_images_per_s": len(test) / eval_s, "peak_mb": peak,
        "split": {k: sections.totals[k] / sections.totals["total"] for k in SPLIT},
        "precision": loop.precision, "dataloader_workers": workers,
    }


def project_reference(r: dict, classes: int, shots: int = 16, steps_per_shot: int = 500) -> float:
    return steps_per_shot * shots * r["step_s"] + n_test_for(classes) / r["eval_images_per_s"]


# ----------------------------------------------------------------------------------------------
# The other methods: their fit() timed from outside (optimizer hooks for steady steps, wrappers for the split).


class Hooked:
    """Time a method's fit from outside: optimizer-step timestamps and, when `split`, sections
    around augmentation, text encoding, image encoding and the optimizer step."""

    def __init__(self, task: Task, split: bool):
        import methods.base as mb
        import methods.coop as mc
        import methods.dassl_loop as md
        import methods.tip_adapter as mt

        self.task, self.dev, self.stamps = task, task.device, []
        self.sections = Sections(self.dev)
        self.patches = []
        self._pre = register_optimizer_step_pre_hook(self._opt_pre)
        self._post = register_optimizer_step_post_hook(self._opt_post)
        self.split = split
        if split:
            for mod, attr, sec in ((md, "random_resized_crops", "data"), (mt, "random_resized_crops", "data"),
                                   (mb, "encode_text", "text"), (mc, "encode_token_embeddings", "text")):
                self._patch(mod, attr, sec)
            model = task.backbone.model
            orig = model.encode_image
            model.encode_image = self._wrap(orig, "image")
            self.patches.append((model, "encode_image", None))

    def _wrap(self, fn, sec):
        def wrapped(*a, **k):
            with self.sections(sec):
                return fn(*a, **k)
        return wrapped

    def _patch(self, mod, attr, sec):
        orig = getattr(mod, attr)
        setattr(mod, attr, self._wrap(orig, sec))
        self.patches.append((mod, attr, orig))

    def _opt_pre(self, opt, args, kwargs):
        if self.split:
            sync(self.dev)
            self._t = time.perf_counter()

    def _opt_post(self, opt, args, kwargs):
        sync(self.dev)
        now = time.perf_counter()
        self.stamps.append(now)
        if self.split:
            self.sections.totals["optimizer"] += now - self._t

    def close(self):
        self._pre.remove()
        self._post.remove()
        for obj, attr, orig in reversed(self.patches):
            if orig is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, orig)


BUDGETS = {  # hyper-parameters that shrink a fit to a measurable size (throughput is per step / per image)
    "zero_shot": {},
    "coop": {"epochs": 2},
    "tip_adapter": {"augment_views": 1, "search": False},
    "tip_adapter_f": {"augment_views": 1, "search": False, "epochs": 3},
}


def fresh_features(task: Task) -> None:
    from harness.paths import cache_dir

    task.feature_cache.clear()
    shutil.rmtree(cache_dir() / "features", ignore_errors=True)


def bench_fit(name: str, task: Task, test: ImageSet) -> dict:
    dev = task.device
    out = {}
    for split in (False, True):
        fresh_features(task)
        reset_peak(dev)
        method = REGISTRY[name](**BUDGETS[name])
        hooks = Hooked(task, split)
        try:
            fit_s, _ = timed(dev, method.fit, task)
            if split:
                total = fit_s
                out["split"] = {k: hooks.sections.totals[k] / total for k in ("data", "text", "image", "optimizer")}
                out["split"]["backward"] = max(0.0, 1 - sum(out["split"].values()))  # and everything else
            else:
                out["fit_s"], out["peak_mb"] = fit_s, peak_mb(dev)
                st = hooks.stamps
                out["optimizer_steps"] = len(st)
                if len(st) >= 2:  # steady state: between the first and the last optimizer step
                    out["step_s"] = (st[-1] - st[0]) / (len(st) - 1)
                    out["steps_per_s"] = 1 / out["step_s"]
                    bs = int(method.hp["batch_size"])
                    out["train_images_per_s"] = min(bs, len(task.train)) / out["step_s"]
        finally:
            hooks.close()
        if not split:
            fresh_features(task)
            eval_s, _ = timed(dev, method.predict, task, test)
            out["eval_images_per_s"] = len(test) / eval_s
    return out


def project_fit(name: str, r: dict, n_pool: int, classes: int, shots: int = 16) -> float:
    n_train, ev = shots * classes, n_test_for(classes) / r["eval_images_per_s"]
    if name == "zero_shot":
        return r["fit_s"] + ev
    if name == "coop":  # 200 epochs at 16 shots (ImageNet's card: 50), full batches of 32
        return 200 * (n_train // 32) * r["step_s"] + ev
    build_s = r["fit_s"] - r.get("optimizer_steps", 0) * r.get("step_s", 0.0)  # cache of 1 view of the pool (+ text)
    cache = build_s / n_pool * 10 * n_train  # 10 augmented views of every image
    if name == "tip_adapter":
        return cache + ev
    return cache + 20 * math.ceil(n_train / 256) * r["step_s"] + ev  # tip_adapter_f: 20 epochs, batch 256


# ----------------------------------------------------------------------------------------------


def run_benchmark(args, console: Console) -> dict:
    dev = torch.device(args.device)
    precision = precision_for(dev)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    os.environ["HARNESS_CACHE"] = str(workdir / "cache")
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "precision": precision, "torch": torch.__version__, "quick": args.quick, "runs": []}
    try:
        for bb_name in args.backbones:
            backbone = random_backbone(bb_name, dev)
            util = vision_utilisation(backbone, args.util_batch, 3 if args.quick else 20, precision, peak_tflops(dev, args.peak_tflops))
            results.setdefault("vision_utilisation", {})[bb_name] = util
            console.print(f"[dim]{bb_name} vision fwd+bwd (batch {util['batch']}): {util['tflops']:.2f} TFLOP/s"
                          + (f", {100 * util['peak_fraction']:.0f} % of {util['peak_tflops']:.0f} peak" if util["peak_fraction"] else "") + "[/dim]")
            size = backbone.image_size
            img_size = (max(48, 2 * size), max(40, int(1.6 * size))) if args.quick else (500, 375)
            for classes in args.classes:
                root = workdir / f"{bb_name}-{classes}"
                items = write_jpegs(root, args.pool, classes, img_size)
                names = classnames(classes)
                test_items = (items * math.ceil(args.test_images / len(items)))[: args.test_images]
                task, test = make_task(backbone, names, root, items, test_items, precision)
                test.eval_pixels()  # the harness evaluates cached pixels; decoding them is a one-off per dataset
                for m in args.methods:
                    console.print(f"[dim]{bb_name} {classes} classes: {m}[/dim]")
                    if m in LORA_METHODS:
                        r = bench_lora(m, task, test, vars(args))
                        r["projected_run_s"] = project_lora(r, classes, steps_per_shot=LORA_METHODS[m])
                    else:
                        r = bench_fit(m, task, test)
                        r["projected_run_s"] = project_fit(m, r, len(items), classes)
                    results["runs"].append({"backbone": bb_name, "classes": classes, "loop": "harness", "method": m, **r})
                mine = {x["method"]: x for x in results["runs"] if x["backbone"] == bb_name and x["classes"] == classes}
                for m in (m for m in LORA_METHODS if m != "clip_lora" and m in mine and "clip_lora" in mine):
                    results.setdefault("step_ratios", []).append({
                        "backbone": bb_name, "classes": classes, "method": m,
                        "train_step_vs_clip_lora": mine[m]["step_s"] / mine["clip_lora"]["step_s"],
                    })
                if args.reference:
                    console.print(f"[dim]{bb_name} {classes} classes: reference-style CLIP-LoRA loop[/dim]")
                    r = bench_reference(task, test, root, vars(args), args.ref_workers)
                    r["projected_run_s"] = project_reference(r, classes)
                    results["runs"].append({"backbone": bb_name, "classes": classes, "loop": "reference", "method": "clip_lora", **r})
                    h = next((x for x in results["runs"] if x["backbone"] == bb_name and x["classes"] == classes
                              and x["loop"] == "harness" and x["method"] == "clip_lora"), None)
                    if h:
                        results.setdefault("speedups", []).append({
                            "backbone": bb_name, "classes": classes,
                            "run": r["projected_run_s"] / h["projected_run_s"],
                            "train_step": r["step_s"] / h["step_s"],
                            "eval": h["eval_images_per_s"] / r["eval_images_per_s"],
                        })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_table(results: dict, console: Console) -> None:
    mem = "peak GPU MB" if "cpu" not in results["device"] else "peak RSS MB"
    table = Table(title=f"bench on {results['device']} (harness precision {results['precision']})")
    for col in ("backbone", "classes", "loop", "method", "train img/s", "steps/s", "eval img/s", mem,
                "data / text / image / bwd+other / opt %", "16-shot run"):
        table.add_column(col, justify="right" if col not in ("backbone", "loop", "method") else "left")
    for r in results["runs"]:
        split = r.get("split")
        table.add_row(
            r["backbone"], str(r["classes"]), r["loop"], r["method"],
            f"{r['train_images_per_s']:.0f}" if "train_images_per_s" in r else "-",
            f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else "-",
            f"{r['eval_images_per_s']:.0f}", f"{r['peak_mb']:.0f}",
            " / ".join(f"{100 * split[k]:.0f}" for k in SPLIT) if split else "-",
            fmt_s(r["projected_run_s"]),
        )
    console.print(table)
    for s in results.get("step_ratios", []):
        console.print(f"{s['backbone']} {s['classes']} classes: {s['method']} training step = "
                      f"[bold]{s['train_step_vs_clip_lora']:.2f}x[/bold] CLIP-LoRA's")
    for s in results.get("speedups", []):
        console.print(f"CLIP-LoRA {s['backbone']} {s['classes']} classes: harness vs reference-style loop: "
                      f"[bold]{s['run']:.2f}x[/bold] per 16-shot run, {s['train_step']:.2f}x per training step, {s['eval']:.2f}x evaluation")


# ----------------------------------------------------------------------------------------------
# Accuracy: both loops on a demo dataset, same steps, same seeds.


def accuracy(args, console: Console) -> dict:
    from harness.backbones import Backbone, build_tiny
    from harness.data.fewshot import manifest_for
    from harness.grid import build_grid
    from harness.runner import load_datasets, run_one, seed_everything
    from methods.base import ImageSet, Steps

    dev = torch.device("cpu")
    os.environ.setdefault("HARNESS_CACHE", str(Path(tempfile.gettempdir()) / "bench-accuracy-cache"))
    backbone = Backbone("tiny", build_tiny().eval().requires_grad_(False), 32, "tiny-random:seed0", dev)
    splits = load_datasets([args.accuracy_dataset], Path("unused"))[args.accuracy_dataset]
    test = ImageSet(splits.root, args.accuracy_dataset, splits.test, backbone.image_size)
    names = [c.replace("_", " ") for c in splits.classnames]
    out = {"dataset": args.accuracy_dataset, "backbone": "tiny (random weights)", "shots": args.accuracy_shots, "seeds": args.seeds,
           "harness_top1": [], "reference_top1": []}
    for seed in args.seeds:
        (spec,) = build_grid(["clip_lora"], [args.accuracy_dataset], "demo", [args.accuracy_shots], [seed], {"tiny": backbone.weights}, "fp32", {})
        rec = run_one(spec, backbone, splits, test, {}, lambda total, desc: Steps())
        assert rec["status"] == "ok", rec.get("error")
        out["harness_top1"].append(rec["top1"])
        hp = spec.hparams
        manifest = manifest_for(splits, args.accuracy_shots, seed)
        seed_everything(seed)
        total = int(hp["steps_per_shot"]) * args.accuracy_shots
        loop = ReferenceLoop(backbone.model, names, splits.root, manifest.train, backbone.image_size, dev, hp, total, workers=0)
        for _ in range(total):
            loop.step()
        logits, labels = loop.evaluate(splits.test)
        out["reference_top1"].append((logits.argmax(-1) == labels).float().mean().item() * 100)
        out["steps"] = total
        out["hparams"] = {k: hp[k] for k in ("lr", "steps_per_shot", "batch_size")}
        console.print(f"seed {seed}: harness {out['harness_top1'][-1]:.1f} %, reference-style {out['reference_top1'][-1]:.1f} %")
    for k in ("harness_top1", "reference_top1"):
        v = torch.tensor(out[k])
        out[k + "_mean"], out[k + "_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny backbone, few classes and steps (CPU, under a minute)")
    p.add_argument("--backbones", default=None, help="comma-separated (default ViT-B-16,ViT-L-14; quick: tiny)")
    p.add_argument("--classes", default=None, help="comma-separated class counts (default 100,1000; quick: 10)")
    p.add_argument("--methods", default=None, help=f"comma-separated (default all: {','.join(ALL_METHODS)})")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--split-steps", type=int, default=None, help="steps timed section by section")
    p.add_argument("--util-batch", type=int, default=None, help="batch of the vision utilisation measurement (default 256; quick 32)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in bench/utilisation.py")
    p.add_argument("--pool", type=int, default=None, help="synthetic JPEGs per (backbone, classes)")
    p.add_argument("--test-images", type=int, default=None, help="images evaluated for eval throughput")
    p.add_argument("--ref-workers", type=int, default=None, help="DataLoader workers of the reference loop (default: 0 on CPU, min(8, cores) on CUDA)")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--accuracy", action="store_true", help="also train CLIP-LoRA with both loops on a demo dataset and compare top-1")
    p.add_argument("--accuracy-dataset", default="demo_colours")
    p.add_argument("--accuracy-shots", type=int, default=16)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick default: 1)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    q = args.quick
    args.backbones = (args.backbones or ("tiny" if q else "ViT-B-16,ViT-L-14")).split(",")
    args.classes = [int(c) for c in (args.classes or ("10" if q else "100,1000")).split(",")]
    args.methods = (args.methods or ",".join(ALL_METHODS)).split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.util_batch = args.util_batch or (32 if q else 256)
    defaults = {"steps": (30, 30), "warmup": (3, 5), "split_steps": (10, 10), "pool": (64, 1024), "test_images": (128, 2048)}
    for k, (quick_v, full_v) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick_v if q else full_v)
    if args.ref_workers is None:
        args.ref_workers = min(8, os.cpu_count() or 1) if args.device == "cuda" else 0
    if args.threads or q:
        torch.set_num_threads(args.threads or 1)
    console = Console(width=max(150, shutil.get_terminal_size().columns))
    t0 = time.perf_counter()
    results = run_benchmark(args, console)
    print_table(results, console)
    if args.accuracy:
        results["accuracy"] = accuracy(args, console)
    results["wall_s"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    summary = summary_line(results)
    print(json.dumps(summary))


def summary_line(results: dict) -> dict:
    """The key figures, the first (backbone, classes) pair's CLIP-LoRA speed-up as `speedup_vs_reference`."""
    out: dict = {"device": results["device"], "precision_harness": results["precision"]}
    runs = results["runs"]
    h = next((r for r in runs if r["loop"] == "harness" and r["method"] == "clip_lora"), None)
    ref = next((r for r in runs if r["loop"] == "reference"), None)
    if results.get("speedups"):
        s = results["speedups"][0]
        out.update(speedup_vs_reference=round(s["run"], 3), train_step_speedup=round(s["train_step"], 3),
                   eval_speedup=round(s["eval"], 3), backbone=s["backbone"], classes=s["classes"])
    if h:
        out.update(harness_train_images_per_s=round(h["train_images_per_s"], 1), harness_eval_images_per_s=round(h["eval_images_per_s"], 1),
                   harness_split={k: round(v, 3) for k, v in h["split"].items()}, harness_projected_run_s=round(h["projected_run_s"], 1))
    if ref:
        out.update(reference_train_images_per_s=round(ref["train_images_per_s"], 1), reference_eval_images_per_s=round(ref["eval_images_per_s"], 1),
                   reference_split={k: round(v, 3) for k, v in ref["split"].items()}, reference_projected_run_s=round(ref["projected_run_s"], 1),
                   reference_precision=ref["precision"], reference_dataloader_workers=ref["dataloader_workers"])
    if "accuracy" in results:
        a = results["accuracy"]
        out.update(accuracy_dataset=a["dataset"], accuracy_steps=a["steps"],
                   accuracy_harness_top1=[round(v, 2) for v in a["harness_top1"]], accuracy_reference_top1=[round(v, 2) for v in a["reference_top1"]],
                   accuracy_harness_mean=round(a["harness_top1_mean"], 2), accuracy_reference_mean=round(a["reference_top1_mean"], 2))
    for name, u in results.get("vision_utilisation", {}).items():
        out.setdefault("vision_tflops", {})[name] = round(u["tflops"], 3)
        out.setdefault("vision_peak_fraction", {})[name] = round(u["peak_fraction"], 3) if u["peak_fraction"] else None
    out["wall_s"] = round(results.get("wall_s", 0), 1)
    return out


if __name__ == "__main__":
    main()
