"""Sweeps over several processes: N local workers (one per GPU) or SLURM job arrays, via submitit.

The grid is cut into shards that keep one (backbone, dataset) together, so a worker loads each
once and reuses its caches across consecutive runs. Workers never open the DuckDB file: each
finished run becomes one JSON record (see records.py) and the single writer ingests them. A shard
job is checkpointable: on preemption or timeout submitit requeues it, and since it skips runs that
already have a record, it loses at most the run it was in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import submitit
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.errors import HarnessError
from harness.grid import RunSpec
from harness.paths import atomic_write_text
from harness.protocols import get_protocol
from harness.records import PLAN, completed_in_records, finished_in_sweep, ingest, read_records, write_record_file
from harness.runner import load_datasets, run_sweep, sweep_progress


@dataclass
class ClusterOptions:
    """What a SLURM user sets; local workers use `time_min` only."""

    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int = 64
    time_min: int = 720
    array_parallelism: int = 64
    account: str | None = None
    qos: str | None = None


def shard(grid: list[RunSpec], jobs: int) -> list[list[RunSpec]]:
    """Cut the grid into at most `jobs` shards of whole (backbone, dataset) groups, splitting a group
    only when there are fewer groups than jobs; balance by run count, keep grid order inside a shard."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in grid:
        groups.setdefault((spec.backbone, spec.dataset), []).append(spec)
    pieces = list(groups.values())
    while len(pieces) < jobs and max(map(len, pieces), default=0) > 1:
        largest = max(range(len(pieces)), key=lambda i: len(pieces[i]))
        big = pieces.pop(largest)
        half = math.ceil(len(big) / 2)
        pieces[largest:largest] = [big[:half], big[half:]]
    shards: list[list[RunSpec]] = [[] for _ in range(min(jobs, len(pieces)))]
    for piece in sorted(pieces, key=len, reverse=True):
        min(shards, key=len).extend(piece)
    order = {spec.config_hash: i for i, spec in enumerate(grid)}
    return [sorted(s, key=lambda spec: order[spec.config_hash]) for s in shards if s]


class ShardJob(submitit.helpers.Checkpointable):
    """One worker: runs its shard, writing a record file per run. Requeued as is on preemption."""

    def __init__(self, specs: list[RunSpec], data_root: str, records: str, weights_paths: dict, device: str, threads: int,
                 plugin_files: list[str] | None = None, db_id: str | None = None, sweep_id: str | None = None,
                 replaces: dict[str, str] | None = None, parent_pid: int | None = None):
        self.specs, self.data_root, self.records = specs, data_root, records
        self.weights_paths, self.device, self.threads = weights_paths, device, threads
        self.plugin_files = plugin_files or []  # --method-path files of the planning process (absolute paths)
        # Every record names the database and the sweep it was made for, and a --force rerun the stored
        # run it replaces (config hash -> run id), so the writer can tell it from a conflicting leftover.
        self.db_id, self.sweep_id, self.replaces = db_id, sweep_id, replaces or {}
        self.parent_pid = parent_pid  # local workers: the planning process, whose death ends them

    def stamp(self, record: dict) -> dict:
        replaced = self.replaces.get(record["config_hash"])
        return {**record, "db_id": self.db_id, "sweep_id": self.sweep_id, **({"replaces": replaced} if replaced else {})}

    def __call__(self) -> dict:
        if self.parent_pid:
            exit_with(self.parent_pid)
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        check_plugins(self.specs, self.plugin_files)
        records = Path(self.records)
        names = {s.dataset for s in self.specs} | {t.dataset for s in self.specs for t in get_protocol(s.protocol).targets_for(s.dataset, s.suite)}
        datasets = load_datasets(sorted(names), Path(self.data_root))
        result = run_sweep(
            self.specs,
            datasets=datasets,
            done=completed_in_records(records, self.sweep_id),  # a requeued job skips what this sweep finished
            store=lambda record: write_record_file(records, self.stamp(record)),
            weights_paths=self.weights_paths,
            device=self.device,
            console=Console(file=sys.stdout, width=120),
            running_dir=records,
            stored_since=lambda config_hash: finished_in_sweep(records, config_hash, self.sweep_id),
        )
        return {"ok": result.ok, "failed": result.failed, "skipped": result.skipped}


def exit_with(pid: int, every: float = 1.0) -> None:
    """End this worker when process `pid` (the `harness run` that started it) is gone: submitit's local
    jobs are built to outlive their parent, but a killed sweep must not leave workers training."""
    from harness.records import process_alive

    def watch():
        while process_alive(pid):
            time.sleep(every)
        os._exit(143)  # the run in flight is lost; its claim is stale and taken over by the next sweep

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def check_plugins(specs: list[RunSpec], plugin_files: list[str]) -> None:
    """Load the plugins the sweep was planned with (entry points and --method-path files) in this
    worker, and refuse to run a plugin method whose source is not the one its config hash names."""
    from harness.plugins import load_plugins, method_source
    from methods import REGISTRY

    load_plugins([Path(f) for f in plugin_files])
    for spec in specs:
        planned = spec.method_source
        if spec.method not in REGISTRY:
            raise HarnessError(f"method '{spec.method}' (planned from {planned}) is not available in this worker: install "
                               "its plugin in the workers' environment or put its --method-path file on shared storage.")
        if method_source(spec.method) != planned:
            raise HarnessError(f"method '{spec.method}' is {method_source(spec.method)} in this worker but was planned as "
                               f"{planned}: the plugin changed after the sweep started. Run the command again.")


def make_executor(kind: str, folder: Path, opts: ClusterOptions) -> submitit.Executor:
    if kind == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=opts.time_min)
        return executor
    # HARNESS_SUBMITIT_CLUSTER=local runs this very SLURM path on submitit's local executor (CI does).
    cluster = os.environ.get("HARNESS_SUBMITIT_CLUSTER", "slurm")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise HarnessError("--executor slurm needs SLURM's sbatch on PATH; run from a cluster login node, or use --executor local.")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(
        name="harness", timeout_min=opts.time_min, gpus_per_node=opts.gpus_per_job, cpus_per_task=opts.cpus_per_job,
        mem_gb=opts.mem_gb, slurm_array_parallelism=opts.array_parallelism,
    )
    params.update({f"slurm_{k}": v for k, v in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos)) if v})
    executor.update_parameters(**params)
    return executor


def write_plan(records: Path, grid: list[RunSpec], shards: list[list[RunSpec]], sweep_id: str) -> None:
    """What `harness status` compares the records with."""
    plan = {"sweep_id": sweep_id, "runs": {s.config_hash: s.label for s in grid}, "jobs": [[s.config_hash for s in sh] for sh in shards]}
    atomic_write_text(records / PLAN, json.dumps(plan, indent=1))


def submit(
    shards: list[list[RunSpec]], kind: str, *, records: Path, data_root: Path, weights_paths: dict, device: str, opts: ClusterOptions,
    plugin_files: list[str] | None = None, db_id: str | None = None, sweep_id: str | None = None, replaces: dict | None = None,
) -> list[submitit.Job]:
    executor = make_executor(kind, records / "submitit", opts)
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    threads = max(1, (os.cpu_count() or 1) // len(shards))
    jobs = []

    def job_for(specs):
        return ShardJob(specs, str(data_root), str(records), weights_paths, device, threads if kind == "local" else opts.cpus_per_job,
                        plugin_files, db_id, sweep_id, {s.config_hash: replaces[s.config_hash] for s in specs if s.config_hash in (replaces or {})},
                        os.getpid() if kind == "local" else None)

    if kind == "local":
        for i, specs in enumerate(shards):
            if n_gpus:  # one GPU per worker, round robin
                executor.update_parameters(gpus_per_node=1, visible_gpus=[i % n_gpus])
            jobs.append(executor.submit(job_for(specs)))
    else:
        with executor.batch():  # one SLURM job array
            jobs = [executor.submit(job_for(specs)) for specs in shards]
    return jobs


def follow(jobs: list[submitit.Job], records: Path, total: int, sweep_id: str, console: Console) -> list[str]:
    """Show progress from the record files (those of sweep `sweep_id`) until every job ends; returns
    the errors of jobs that died."""
    progress = sweep_progress(console)
    planned = set(json.loads((records / PLAN).read_text())["runs"])
    with progress:
        task = progress.add_task(f"{len(jobs)} jobs", total=total)
        while True:
            finished = sum(1 for r in read_records(records) if r["config_hash"] in planned and r.get("sweep_id") == sweep_id)
            progress.update(task, completed=min(finished, total))
            if all(job.done() for job in jobs):
                break
            time.sleep(1.0)
    errors = []
    for job in jobs:
        exc = job.exception()
        if exc is not None:
            errors.append(f"job {job.job_id}: {str(exc).strip().splitlines()[-1]} (log: {job.paths.stderr})")
    return errors


def run_distributed(
    grid: list[RunSpec], done: set[str], executor: str, jobs: int, opts: ClusterOptions, *, records: Path, db: Path,
    data_root: Path, weights_paths: dict, device: str, dry_run: bool, wait: bool, console: Console,
    plugin_files: list[str] | None = None, db_id: str | None = None, replaces: dict[str, str] | None = None,
) -> bool:
    """Shard, submit, follow and ingest a sweep; returns True when a run or a job failed. `db_id`:
    the database the records are made for; `replaces`: for --force, the stored run each rerun replaces."""
    from harness.published import load_published

    todo = [s for s in grid if s.config_hash not in done]
    if len(todo) < len(grid):
        console.print(f"[dim]{len(grid) - len(todo)} of {len(grid)} runs already complete; skipping them (--force redoes them).[/dim]")
    if not todo:
        console.print("Nothing to do: every run of this grid is already stored.")
        return False
    shards = shard(todo, max(1, jobs))
    table = Table("job", "runs", "backbone / dataset groups", title=f"{len(todo)} runs in {len(shards)} {executor} jobs")
    for i, specs in enumerate(shards):
        groups = dict.fromkeys(f"{s.backbone}/{s.dataset}" for s in specs)
        table.add_row(str(i), str(len(specs)), ", ".join(groups))
    console.print(table)
    if dry_run:
        console.print(f"Job parameters: {opts}. Records would go to {records}. Nothing submitted (--dry-run).")
        return False
    records.mkdir(parents=True, exist_ok=True)
    sweep_id = uuid.uuid4().hex
    write_plan(records, todo, shards, sweep_id)
    submitted = submit(shards, executor, records=records, data_root=data_root, weights_paths=weights_paths, device=device, opts=opts,
                       plugin_files=plugin_files, db_id=db_id, sweep_id=sweep_id, replaces=replaces)
    console.print(f"Submitted {len(submitted)} jobs ({', '.join(j.job_id for j in submitted)}); records go to {records}.")
    if executor == "slurm" and not wait:
        console.print("Follow them with `harness status`; collect the records with `harness ingest` (report and check also ingest).")
        return False
    try:
        errors = follow(submitted, records, len(todo), sweep_id, console)
    except KeyboardInterrupt:
        if executor == "local":
            for job in submitted:
                job.cancel(check=False)
        ingest(records, db, db_id)
        raise HarnessError("Interrupted. Finished runs are stored; run the same command again to resume.") from None
    ingest(records, db, db_id)
    load_published(db)
    planned = {s.config_hash for s in todo}
    mine = [r for r in read_records(records) if r["config_hash"] in planned and r.get("sweep_id") == sweep_id]
    failed = [r for r in mine if r["status"] != "ok"]
    console.print(f"{len(mine) - len(failed)} ok, {len(failed)} failed, {len(grid) - len(todo)} skipped. Database: {db}")
    for line in errors:
        console.print(Text.assemble(("job died:", "red"), f" {line}"))
    for r in failed:
        console.print(Text.assemble(("failed", "red"), f" {r['method']} {r['dataset']} {r['shots']}-shot seed {r['seed']}: {r['error'].splitlines()[0]}"))
    return bool(failed or errors)
