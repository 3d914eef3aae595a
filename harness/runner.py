"""Execute a grid of runs: load each backbone and dataset once, fit and evaluate each method, store.

A run's record is written only when the run has finished (ok, or failed with its error), in one
transaction, so Ctrl-C never leaves half a run behind and the next invocation resumes where this
one stopped. Bad input (a missing dataset, a corrupt image) stops the sweep with exit code 2;
a method that crashes or diverges is stored as `failed` and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

import harness
from harness.backbones import Backbone, load_backbone
from harness.cards import get_card
from harness.cost import machine_load, open_window
from harness.data.demo import ensure_demo
from harness.data.fewshot import Manifest, manifest_for
from harness.data.readers import DatasetSplits, read_dataset
from harness.data.splitfiles import read_split_files
from harness.errors import DataError, HarnessError
from harness.evaluate import clean, evaluate
from harness.grid import RunSpec
from harness.paths import ENVIRONMENT_ERRNOS, environment_error
from harness.protocols import base_new_labels, get_protocol, restrict
from harness.records import claim_run
from methods import REGISTRY, ImageSet, Task
from methods.base import Steps


@dataclass
class SweepResult:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # runs another process was training: left to it


@lru_cache(maxsize=1)
def package_versions() -> str:
    from importlib import metadata

    names = ("torch", "torchvision", "open_clip_torch", "numpy")
    return ", ".join(f"{n} {metadata.version(n)}" for n in names) + f", python {platform.python_version()}"


@lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(harness.__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise HarnessError(f"--device must be auto, cpu or cuda, not '{device}'.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda was asked for but no CUDA GPU is visible. Use --device cpu or auto.")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """fp32 on CPU; bf16 autocast by default on CUDA (fp16 on request)."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if device == "cpu" and precision != "fp32":
        raise HarnessError(f"--precision {precision} needs a GPU; on CPU the harness runs fp32.")
    return precision


def load_datasets(names: list[str], data_root: Path) -> dict[str, DatasetSplits]:
    """Read every dataset of the grid up front; report all missing ones at once."""
    cards = [get_card(n) for n in names]
    demo = [c for c in cards if c.suite == "demo"]
    demo_root = ensure_demo(demo) if demo else None
    loaded, problems = {}, []
    for card in cards:
        try:
            loaded[card.name] = read_dataset(card, demo_root if card.suite == "demo" else data_root)
        except DataError as exc:
            problems.append(f"  - {exc}")
    if problems:
        raise DataError(
            f"{len(problems)} of {len(cards)} datasets cannot be read under the data root {data_root.resolve()}:\n"
            + "\n".join(problems)
            + "\nLay them out as in CoOp's DATASETS.md, pass --data-root PATH (or set HARNESS_DATA_ROOT), "
            "check with `harness data check`, or try the generated demo with --suite demo."
        )
    return loaded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_label(device: str) -> str:
    return f"cuda:{torch.cuda.get_device_name()}" if device == "cuda" else "cpu"


def few_shot_subset(spec: RunSpec, splits: DatasetSplits, seed: int) -> tuple[Manifest | None, list, list, list[str]]:
    """The run's few-shot subset for `seed` (its own seed, or another one a method's recipe asks
    for): manifest, train and val items, and class names, restricted to the base classes where
    the protocol trains on them."""
    manifest, train_items, val_items = None, [], []
    if spec.shots > 0:
        if spec.splits_dir:
            manifest, sha = read_split_files(splits, Path(spec.splits_dir), spec.shots, seed)
            if seed == spec.seed and sha != spec.splits_hash:  # the run's identity is the content it was planned with
                raise DataError(
                    f"The split files for {spec.dataset} {spec.shots}-shot seed {seed} under {spec.splits_dir} changed "
                    "after the sweep started. Run the command again to plan with their new content."
                )
        else:
            manifest = manifest_for(splits, spec.shots, seed, spec.sampler)
        train_items, val_items = manifest.train, manifest.val
    classnames = clean(splits.classnames)
    if get_protocol(spec.protocol).train == "base":  # CoCoOp: the subset is drawn on all classes, then kept to the base ones
        base, _ = base_new_labels([it.label for it in train_items] or range(len(classnames)))
        train_items = restrict(train_items, base, splits.classnames)
        val_items = restrict(val_items, base, splits.classnames)
        classnames = [classnames[label] for label in base]
    return manifest, train_items, val_items, classnames


def run_one(spec: RunSpec, backbone: Backbone, splits: DatasetSplits, test: ImageSet, feature_cache: dict, start_steps,
            datasets: dict[str, DatasetSplits] | None = None, eval_cache: dict | None = None) -> dict:
    """Fit and evaluate one run on its protocol's targets; returns its record (status ok or failed).
    `datasets` holds the target datasets of cross-dataset and domain-shift runs. The method is fitted
    on a Task without test images or their cached features (`eval_cache` is attached after fit)."""
    protocol = get_protocol(spec.protocol)
    device = backbone.device.type
    record = {
        "run_id": uuid.uuid4().hex,
        "config_hash": spec.config_hash,
        "config": spec.config,
        "method": spec.method,
        "dataset": spec.dataset,
        "suite": spec.suite,
        "backbone": spec.backbone,
        "weights": spec.weights,
        "shots": spec.shots,
        "seed": spec.seed,
        "precision": spec.precision,
        "device": device_label(device),
        "harness_version": harness.__version__,
        "git_sha": git_sha(),
        "packages": package_versions(),
        "started_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "n_test": len(test),
        "protocol": spec.protocol,
    }
    seed_everything(spec.seed)
    memory = open_window(device)
    size = backbone.image_size
    manifest, train_items, val_items, classnames = few_shot_subset(spec, splits, spec.seed)
    if manifest is not None:
        record["config"] = {**spec.config, "manifest_hash": manifest.content_hash}
    mode = backbone.preprocess.resize_mode
    train = ImageSet(splits.root, spec.dataset, train_items, size, resize_mode=mode)
    val = ImageSet(splits.root, spec.dataset, val_items, size, resize_mode=mode)
    learnable = dataclasses.replace(splits, test=[])  # what a recipe may draw other seeds' subsets from
    task = Task(
        card=splits.card,
        classnames=classnames,
        shots=spec.shots,
        seed=spec.seed,
        backbone=backbone,
        precision=spec.precision,
        train=train,
        val=val,
        full_val=ImageSet(splits.root, spec.dataset, splits.val, size, resize_mode=mode),
        start_steps=start_steps,
        feature_cache=feature_cache,
        train_of_seed=lambda seed: ImageSet(learnable.root, spec.dataset, few_shot_subset(spec, learnable, seed)[1], size, resize_mode=mode),
    )
    cls = REGISTRY[spec.method]
    record["config"] = {**record["config"], "source": cls.source}
    method = cls(**spec.hparams)
    try:
        t0 = time.perf_counter()
        method.fit(task)
        t1 = time.perf_counter()
        record["config"]["selection"] = method.selection()
        task.eval_cache = {} if eval_cache is None else eval_cache
        targets = protocol.targets_for(spec.dataset, spec.suite)
        evaluations = evaluate(method, task, targets, splits, datasets or {}, test)
        t2 = time.perf_counter()
        top1 = protocol.headline_of({e["target"]: e["top1"] for e in evaluations})
        record.update(status="ok", top1=top1, train_seconds=t1 - t0, eval_seconds=t2 - t1)
        if spec.protocol != "fewshot":  # fewshot: the one target is the run itself
            record["evaluations"] = evaluations
    except HarnessError:
        raise
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:  # the machine failed (full disk, read-only cache), not the method
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")
        else:
            raise environment_error(exc, "a cache file") from None
    except Exception as exc:  # noqa: BLE001 - a crashing method is a failed run, not a crashed sweep
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")
    finally:
        record["trainable_params"] = method.trainable_parameters()
        record.update(peak_mem_mb=memory.peak_mb(), memory_basis=memory.basis, machine_load=machine_load())
        record["finished_at"] = datetime.now(timezone.utc).replace(tzinfo=None)
    return record


def headline_text(record: dict) -> str:
    """top-1 for a few-shot run; each target's top-1 (or n/a) and the headline for the others."""
    if not record.get("evaluations"):
        return f"top-1 {record['top1']:.2f}%"
    parts = [f"{e['target']} {e['top1']:.2f}" if e["top1"] is not None else f"{e['target']} n/a" for e in record["evaluations"]]
    headline = "n/a" if record["top1"] is None else f"{record['top1']:.2f}"
    return f"{', '.join(parts)}; headline {get_protocol(record['protocol']).headline} {headline}"


def sweep_progress(console: Console) -> Progress:
    """Run i of n with elapsed time and ETA (and, per run, its training steps)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console,
    )


def run_sweep(
    grid: list[RunSpec],
    *,
    datasets: dict[str, DatasetSplits],
    done: set[str],
    store: Callable[[dict], None],
    weights_paths: dict[str, str | None],
    device: str,
    console: Console,
    running_dir: Path | None = None,
    stored_since: Callable[[str], bool] = lambda config_hash: False,
) -> SweepResult:
    """Run every spec not in `done`, handing each finished record to `store` (the database, or a
    record file for workers). With `running_dir`, each run is claimed first (an in-flight marker,
    `records.claim_run`): a run another process is training is left to it, and one it stored since
    this sweep started (`stored_since`) is not trained again."""
    result = SweepResult()
    todo = [s for s in grid if s.config_hash not in done]
    result.skipped = len(grid) - len(todo)
    if result.skipped:
        console.print(f"[dim]{result.skipped} of {len(grid)} runs already complete; skipping them (--force redoes them).[/dim]")
    if not todo:
        console.print("Nothing to do: every run of this grid is already stored.")
        return result
    progress = sweep_progress(console)
    started = time.monotonic()

    def position(i: int) -> str:
        """`[i/n, ETA m:ss]`: the live bar's figures on every finished run's line, for logs that are not terminals."""
        left = (time.monotonic() - started) / i * (len(todo) - i)
        return f"[{i}/{len(todo)}, ETA {int(left // 60)}:{int(left % 60):02d}]"

    backbone: Backbone | None = None
    test: ImageSet | None = None  # the current dataset's test split; runs are grouped by backbone, then dataset
    feature_cache: dict = {}
    eval_cache: dict = {}  # features of evaluation images, out of fit's reach (Task.eval_cache)
    with progress:
        overall = progress.add_task("runs", total=len(todo))
        for i, spec in enumerate(todo, 1):
            marker = claim_run(running_dir, spec.config_hash, spec.label) if running_dir else None
            if running_dir and (marker is None or stored_since(spec.config_hash)):
                if marker is None:
                    result.elsewhere.append(spec.label)
                    progress.console.print(Text.assemble(("elsewhere", "yellow"), f" {spec.label}: another process is running it"))
                else:  # finished by another process since this sweep started
                    marker.unlink(missing_ok=True)
                    result.skipped += 1
                progress.advance(overall)
                continue
            try:
                if backbone is None or backbone.name != spec.backbone:
                    progress.update(overall, description=f"loading {spec.backbone}")
                    backbone = load_backbone(spec.backbone, weights_paths.get(spec.backbone), device)
                    test = None
                splits = datasets[spec.dataset]
                if test is None or test.dataset != spec.dataset:
                    feature_cache.clear()
                    eval_cache.clear()
                    test = ImageSet(splits.root, spec.dataset, splits.test, backbone.image_size, evaluation=True,
                                    resize_mode=backbone.preprocess.resize_mode)
                progress.update(overall, description=f"run {i}/{len(todo)} {spec.label}")
                inner = None

                def start_steps(total: int, desc: str) -> Steps:
                    nonlocal inner
                    if inner is not None:
                        progress.remove_task(inner)
                    inner = progress.add_task(f"  {desc}", total=total)
                    return Steps(lambda n, t=inner: progress.advance(t, n))

                record = run_one(spec, backbone, splits, test, feature_cache, start_steps, datasets, eval_cache)
                if inner is not None:
                    progress.remove_task(inner)
                store(record)
            finally:
                if marker:
                    marker.unlink(missing_ok=True)
            if record["status"] == "ok":
                result.ok += 1
                progress.console.print(Text.assemble(("ok", "green"), f" {spec.label}: {headline_text(record)}  "
                    f"(train {record['train_seconds']:.1f} s, eval {record['eval_seconds']:.1f} s, "
                    f"peak {record['peak_mem_mb']:.0f} MB, {record['trainable_params']:,} trainable) {position(i)}"))
            else:
                result.failed += 1
                first_line = record["error"].splitlines()[0]
                result.failures.append(f"{spec.label}: {first_line}")
                progress.console.print(Text.assemble(("failed", "red"), f" {spec.label}: {first_line} {position(i)}"))
            progress.advance(overall)
    return result
