"""The `harness` command line (Typer + rich). Each command parses options and hands over to one module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness import paths
from harness.errors import HarnessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Few-shot CLIP adaptation benchmark and leaderboard.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets and few-shot subsets.")
app.add_typer(data_app, name="data")
console = Console()


def _split(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _ints(value: str, option: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise HarnessError(f"{option} expects comma-separated integers, got '{value}'.") from None


@app.command()
def run(
    method: Optional[list[str]] = typer.Option(None, "-m", "--method", help="Method name(s), comma-separated."),
    all_methods: bool = typer.Option(False, "--all-methods", help="Every registered method."),
    method_path: Optional[list[Path]] = typer.Option(None, "--method-path", help="A .py file that registers a method (see README \"Add your method\"), repeatable."),
    dataset: Optional[list[str]] = typer.Option(None, "-d", "--dataset", help="Dataset name(s), comma-separated."),
    all_datasets: bool = typer.Option(False, "--all-datasets", help="Every dataset of the suite (cross_dataset, domain_shift: their source)."),
    suite: str = typer.Option("standard", help="standard (the 11 CoOp datasets) or demo (generated)."),
    shots: Optional[str] = typer.Option(None, help="Shot counts (default 1,2,4,8,16; the protocol's own (16) for the others)."),
    seeds: str = typer.Option("1,2,3", help="Seeds."),
    backbone: Optional[list[str]] = typer.Option(None, "-b", "--backbone", help="Backbone(s); default ViT-B-16 (demo: tiny)."),
    weights: Optional[str] = typer.Option(None, help="Local checkpoint for the backbone (OpenAI .pt or open_clip file)."),
    data_root: Optional[Path] = typer.Option(None, help="Data root in CoOp layout (env HARNESS_DATA_ROOT, default ./data)."),
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Hyper-parameter override KEY=VALUE, repeatable."),
    protocol: str = typer.Option("fewshot", help="fewshot, base2new, cross_dataset or domain_shift (datasets/_protocols.yaml)."),
    recipe: Optional[str] = typer.Option(None, help="Whose hyper-parameters: another protocol's recipe (fewshot, base2new, ...); default: the protocol's own, as each paper ran it."),
    sampler: str = typer.Option("coop", help="Few-shot sampling protocol: coop (CoOp/Dassl) or clip_lora (CLIP-LoRA's code)."),
    splits: Optional[Path] = typer.Option(None, help="Read few-shot subsets from split files under DIR/<dataset folder>/split_fewshot/ instead of sampling."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16."),
    force: bool = typer.Option(False, "--force", help="Redo runs that are already complete."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the grid (and the jobs, with --executor) and exit."),
    executor: str = typer.Option("serial", help="serial (this process), local (N worker processes, one per GPU) or slurm."),
    jobs: int = typer.Option(1, "--jobs", help="Number of worker jobs for --executor local/slurm."),
    records: Optional[Path] = typer.Option(None, help="Folder for workers' run records (default records/ beside the database); shared storage on a cluster."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the jobs and ingest their records (slurm: --no-wait returns after submitting)."),
    partition: Optional[str] = typer.Option(None, help="SLURM partition."),
    gpus_per_job: int = typer.Option(1, help="SLURM: GPUs per job."),
    cpus_per_job: int = typer.Option(8, help="SLURM: CPUs per job."),
    mem_gb: int = typer.Option(64, help="SLURM: memory per job (GB)."),
    time_min: int = typer.Option(720, help="Time limit per job in minutes (jobs are requeued on timeout/preemption)."),
    array_parallelism: int = typer.Option(64, help="SLURM: array jobs running at once."),
    account: Optional[str] = typer.Option(None, help="SLURM account."),
    qos: Optional[str] = typer.Option(None, help="SLURM QoS."),
):
    """Run methods over datasets, shots and seeds; store every run in DuckDB."""
    from harness import api
    from harness.distributed import ClusterOptions
    from harness.grid import parse_sets

    runs = api.run(
        _split(method), _split(dataset), suite=suite, all_methods=all_methods, all_datasets=all_datasets,
        shots=_ints(shots, "--shots") if shots else None, seeds=_ints(seeds, "--seeds"), backbones=_split(backbone),
        weights=weights, data_root=data_root, db=db, sets=parse_sets(set_ or []), protocol=protocol, recipe=recipe, sampler=sampler,
        splits=splits, device=device, precision=precision, force=force, dry_run=dry_run, executor=executor, jobs=jobs,
        records=records, wait=wait, method_paths=method_path,
        cluster=ClusterOptions(partition, gpus_per_job, cpus_per_job, mem_gb, time_min, array_parallelism, account, qos),
        console=console,
    )
    if runs.attrs.get("dry_run") and executor == "serial":
        table = Table("#", "method", "dataset", "backbone", "shots", "seed", "config hash", "stored",
                      title=f"{len(runs)} runs, {int(runs['stored'].sum())} already stored (skipped unless --force)")
        for i, r in enumerate(runs.itertuples(), 1):
            table.add_row(str(i), r.method, r.dataset, r.backbone, str(r.shots), str(r.seed), r.config_hash, "yes" if r.stored else "")
        console.print(table)
    if runs.attrs.get("failed"):
        raise typer.Exit(1)


def _ingest_pending(db_path: Path) -> None:
    """Report and check read the database: first collect the records that its own sweeps left beside it."""
    from harness.api import ingest_own_records

    left = ingest_own_records(db_path)
    if left:
        Console(stderr=True).print(Text(
            f"note: {left} record(s) in {db_path.parent / 'records'} were made for another database (or before records "
            f"named theirs) and were not taken; `harness ingest --db {db_path} --records {db_path.parent / 'records'}` imports them."
        ))


def _warn_altered(db_path: Path) -> list[str]:
    """Name the stored runs whose content no longer matches their digest (on stderr); returns them."""
    from harness.store import altered_rows

    altered, _ = altered_rows(db_path)
    if altered:
        Console(stderr=True).print(Text.assemble(
            ("ALTERED", "bold red"), f" {len(altered)} stored run(s) in {db_path} no longer match the digest written with "
            f"them (edited after they were stored); their numbers cannot be trusted. Rerun them with --force:\n  "
            + "\n  ".join(altered)), highlight=False)
    return altered


@app.command()
def ingest(
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    records: Optional[Path] = typer.Option(None, help="Records folder (default records/ beside the database)."),
):
    """Load run records into the database, also those made for another one (idempotent; a record that
    disagrees with a stored run is kept aside and named, never stored over it)."""
    from harness.records import default_records_dir
    from harness.records import ingest as ingest_records

    db_path = paths.db_path(db)
    folder = records or default_records_dir(db_path)
    if not folder.is_dir():
        raise HarnessError(f"No records folder at {folder}. Pass --records DIR (the folder the workers wrote to).")
    result = ingest_records(folder, db_path)
    console.print(f"Ingested {result.stored} new run(s) from the record files in {folder} into {db_path}; "
                  f"{result.unchanged} already stored, {len(result.conflicts)} conflicting (kept aside), "
                  f"{len(result.invalid)} refused.")
    if result.foreign:
        console.print(f"{result.foreign} of the records taken were made for another database or name none "
                      f"(imported because you asked for {folder}).")


@app.command()
def status(
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    records: Optional[Path] = typer.Option(None, help="Records folder (default records/ beside the database)."),
):
    """Progress of the last distributed sweep (done / failed / running / pending, from the record files),
    or, without one, what the database holds."""
    from harness.records import PLAN, default_records_dir, sweep_status

    db_path = paths.db_path(db)
    folder = records or default_records_dir(db_path)
    if not (folder / PLAN).is_file() and records is None:
        _describe_database(db_path, folder)
        return
    state = sweep_status(folder)
    table = Table("done", "failed", "running", "pending", "total", title=f"sweep in {folder}")
    table.add_row(*(str(state[k]) for k in ("done", "failed", "running", "pending", "total")))
    console.print(table)
    for m in state["in_flight"]:
        console.print(f"{'[yellow]stale (worker gone)[/yellow]' if m['stale'] else 'running'}: {m['label']} (pid {m['pid']} on {m['host']})")
    for label, error in state["failures"]:
        console.print(Text.assemble(("failed", "red"), f" {label}: {error}"))


def _describe_database(db_path: Path, folder: Path) -> None:
    """Runs stored per suite, backbone and protocol (ok / failed, last finished): `status` without a sweep."""
    from harness.store import runs_frame

    if not db_path.is_file():
        raise HarnessError(f"No run database at {db_path} and no distributed sweep in {folder}. Start with `harness run ...` "
                           "(--db PATH for another database, --records DIR for a sweep's records).")
    runs = runs_frame(db_path)
    runs["protocol"] = runs["protocol"].fillna("fewshot")
    table = Table("suite", "backbone", "protocol", "methods", "ok", "failed", "last finished (UTC)", title=f"runs in {db_path}")
    for (suite, backbone, protocol), group in runs.groupby(["suite", "backbone", "protocol"]):
        last = group["finished_at"].max()
        table.add_row(str(suite), str(backbone), protocol, str(group["method"].nunique()), str(int((group.status == "ok").sum())),
                      str(int((group.status != "ok").sum())), "" if pd.isna(last) else f"{last:%Y-%m-%d %H:%M}")
    console.print(table)
    console.print(f"No distributed sweep in {folder} (no {folder.name}/plan.json): this is what the database holds.")


@app.command("list")
def list_(
    what: str = typer.Argument(..., help="methods, datasets or backbones"),
    name: Optional[str] = typer.Argument(None, help="With methods: one method's whole record (paper, code, deviations, defaults)."),
    method_path: Optional[list[Path]] = typer.Option(None, "--method-path", help="A .py file that registers a method (see README \"Add your method\"), repeatable."),
):
    """List registered methods (built-in and plugins), dataset cards or backbones."""
    from harness.backbones import BACKBONES, OPENAI_ARCH, resolve_weights
    from harness.cards import all_cards
    from methods import REGISTRY

    if what == "methods":
        from harness.grid import method_and_variant
        from harness.plugins import ORIGINS, load_plugins
        from harness.published import VARIANTS

        load_plugins(method_path or [])
        if name:
            method, variant = method_and_variant(name)
            console.print(method_record(REGISTRY[method], variant, ORIGINS.get(method)))
            return
        table = Table(title="`harness list methods NAME` shows one method's whole record", caption="closed-set: few-shot and "
                      "domain shift; base-to-new's new classes and cross-dataset targets are not applicable")
        for column in ("method", "family", "paper", "protocols"):
            table.add_column(column, no_wrap=True)
        room = max(20, console.width - 13 - 36 - 10 - 13)  # one line per method: the paper is cut to the terminal

        def cut(text: str, width: int) -> str:
            return text if len(text) <= width else text[: width - 1] + "\u2026"

        for cls in REGISTRY.values():
            table.add_row(cls.name, cut(cls.family, 36), cut(cls.paper, room), protocols_of(cls))
        for label, (base, _) in VARIANTS.items():
            table.add_row(label, cut(REGISTRY[base].family, 36), f"paper variant of {base}", protocols_of(REGISTRY[base]))
        console.print(table)
        for plugin in (n for n in REGISTRY if n in ORIGINS):
            console.print(Text(f"plugin {plugin}: {ORIGINS[plugin]}"))
        return
    elif what == "datasets":
        table = Table("dataset", "suite", "folder", "classes", "test", "template")
        for card in all_cards().values():
            table.add_row(card.name, card.suite, card.folder, str(card.num_classes), str(card.test_size), card.template)
    elif what == "backbones":
        from harness.applicability import FAMILIES, rows

        table = Table("backbone", "architecture", "weights here", title="named backbones (any open_clip MODEL:TAG works too, e.g. -b ViT-B-16-SigLIP2:webli)")
        for name in BACKBONES:
            try:
                found = resolve_weights(name)[1]
            except HarnessError:
                found = "[red]not cached[/] (--weights PATH)"
            table.add_row(name, OPENAI_ARCH.get(name, TINY_ARCH.get(name, "")), found)
        console.print(table)
        table = Table("method", *FAMILIES, title="which method runs on which backbone family (from each method's `requires`)")
        for method, cells in rows():
            table.add_row(method, *[c if c == "yes" else f"[yellow]{c}[/]" for c in cells])
    else:
        raise HarnessError(f"`harness list` takes methods, datasets or backbones, not '{what}'.")
    console.print(table)


TINY_ARCH = {"tiny": "small ViT CLIP (2+2 layers, width 64)", "tiny_rn": "small ResNet CLIP (attention pooling; 2-layer text)",
             "tiny_siglip": "small SigLIP-style CLIP (timm ViT, MAP pooling; non-causal text, logit bias)",
             "tiny_eva": "small EVA-02-style CLIP (timm EVA, rotary positions; CLIP text apart; tests only)"}


def protocols_of(cls) -> str:
    """Where a method's numbers mean something: every protocol for an open-vocabulary method; a
    class-specific one scores no new class (base-to-new's new half, cross-dataset targets: n/a)."""
    return "all four" if cls.open_vocabulary else "closed-set"


def method_record(cls, variant: dict, origin: str | None) -> Table:
    """One method's whole record, as `harness list methods NAME` prints it."""
    from harness.protocols import protocols

    table = Table(show_header=False, show_lines=True, title=cls.name + (f" ({', '.join(f'{k}={v}' for k, v in variant.items())})" if variant else ""))
    rows = [("family", cls.family), ("paper", cls.paper), ("official code followed", cls.source),
            ("known deviations", cls.deviations), ("protocols", protocols_of(cls)),
            ("defaults", ", ".join(f"{k}={v}" for k, v in {**cls.defaults, **variant}.items()) or "none")]
    for name, protocol in protocols().items():  # where its paper ran a protocol with other values
        recipe = dict(protocol.recipes.get(cls.name, {}))
        exceptions = recipe.pop("datasets", {})
        if recipe or exceptions:
            text = ", ".join(f"{k}={v}" for k, v in recipe.items()) or "the defaults"
            text += "".join(f"; {d}: " + ", ".join(f"{k}={v}" for k, v in hp.items()) for d, hp in exceptions.items())
            rows.append((f"{name} recipe", text))
    if origin:
        rows.append(("plugin", origin))
    for key, value in rows:
        table.add_row(key, value)
    return table


@data_app.command("check")
def data_check(
    data_root: Optional[Path] = typer.Option(None, help="Data root in CoOp layout (env HARNESS_DATA_ROOT, default ./data)."),
    suite: str = typer.Option("standard", help="standard or demo."),
    dataset: Optional[list[str]] = typer.Option(None, "-d", "--dataset", help="Only these datasets (each must be usable)."),
    deep: bool = typer.Option(False, "--deep", help="Also decode every image (slow on the full datasets)."),
):
    """Which datasets are present, incomplete or missing, and why. Exit 2 when a named dataset (or,
    without -d, every dataset) is unusable."""
    from harness.cards import all_cards, get_card
    from harness.data.check import check_dataset
    from harness.data.demo import ensure_demo

    cards = [get_card(n) for n in _split(dataset)] or [c for c in all_cards().values() if c.suite == suite]
    demo = [c for c in cards if c.suite == "demo"]
    root = ensure_demo(demo) if demo and len(demo) == len(cards) else paths.data_root(data_root)
    table = Table("dataset", "status", "path", "detail", title=f"data root {root.resolve()}")
    colour = {"present": "green", "incomplete": "yellow", "missing": "red"}
    results = [check_dataset(card, root, deep) for card in cards]
    for r in results:
        table.add_row(r.card.name, Text(r.status, style=colour[r.status]), Text(str(r.path)), Text(r.detail))
    console.print(table)
    counts = {s: sum(r.status == s for r in results) for s in colour}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (images {'decoded' if deep else 'listed'} and checked)")
    unusable = [r.card.name for r in results if r.status != "present"]
    if (dataset and unusable) or not counts["present"]:
        raise HarnessError(
            f"Unusable: {', '.join(unusable)} under {root.resolve()}. See the detail column; lay the data out as in "
            "CoOp's DATASETS.md or pass --data-root PATH."
        )


@data_app.command("manifest")
def data_manifest(
    dataset: str = typer.Option(..., "-d", "--dataset", help="Dataset name."),
    shots: int = typer.Option(..., help="Shots per class (K)."),
    seed: int = typer.Option(..., help="Sampling seed."),
    sampler: str = typer.Option("coop", help="coop (CoOp/Dassl) or clip_lora (CLIP-LoRA's code)."),
    data_root: Optional[Path] = typer.Option(None, help="Data root in CoOp layout (env HARNESS_DATA_ROOT, default ./data)."),
):
    """Print the few-shot subset (train and val paths and labels) as JSON."""
    from harness.data.fewshot import manifest_for
    from harness.runner import load_datasets

    if shots < 1:
        raise HarnessError("--shots must be at least 1.")
    from harness.data.fewshot import check_sampler

    check_sampler(sampler)
    paths.writable_folder(paths.cache_dir(), "cache folder (set HARNESS_CACHE to move it)")
    splits = load_datasets([dataset], paths.data_root(data_root))[dataset]
    print(manifest_for(splits, shots, seed, sampler).to_json())


@app.command()
def report(
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    out: Path = typer.Option(Path("reports"), help="Output folder for index.html and leaderboard.csv/.md/.tex."),
    method_path: Optional[list[Path]] = typer.Option(None, "--method-path", help="A .py file that registers a method (see README \"Add your method\"), repeatable."),
):
    """Render the leaderboard: a self-contained index.html plus leaderboard .csv, .md and .tex."""
    from harness.plugins import load_plugins
    from harness.report import render

    load_plugins(method_path or [])  # plugin methods' papers and deviations in the provenance section
    paths.writable_folder(out, "report folder (--out)")
    _ingest_pending(paths.db_path(db))
    try:
        written = render(paths.db_path(db), out)
    except OSError as exc:
        if exc.errno not in paths.ENVIRONMENT_ERRNOS:
            raise
        raise paths.environment_error(exc, "the report") from None
    for kind, path in written.items():
        console.print(f"{kind:>4}  {path}")
    _warn_altered(paths.db_path(db))


@app.command()
def compare(
    a: str = typer.Argument(..., help="Method A (as the report names it, e.g. coop_ctx4)."),
    b: str = typer.Argument(..., help="Method B: the difference printed is B minus A."),
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    shots: Optional[str] = typer.Option(None, help="Only these shot counts, e.g. 1,16."),
    backbone: Optional[str] = typer.Option(None, "-b", "--backbone", help="Only this backbone."),
    suite: Optional[str] = typer.Option(None, help="Only this suite (standard or demo)."),
):
    """Paired comparison of two methods over the runs they share: mean difference with its 95 %
    interval, wins/ties/losses over datasets, and a paired test (Wilcoxon, or sign test when few)."""
    from harness import api

    db_path = paths.db_path(db)
    _ingest_pending(db_path)
    result = api.compare(a, b, db_path, _ints(shots, "--shots") if shots else None, backbone, suite)
    table = Table("dataset", a, b, f"{b} - {a}", title=f"{len(result.pairs)} paired runs")
    for row in result.per_dataset.itertuples():
        table.add_row(row.dataset, f"{row.a:.2f}", f"{row.b:.2f}", f"{row.diff:+.2f}")
    console.print(table)
    c = result.cells
    console.print(Text(f"wins/ties/losses of {b} over (dataset, shots) cells: {c.wins}/{c.ties}/{c.losses}"))
    console.print(Text(result.ranking))
    console.print(Text(result.verdict))


@app.command()
def check(
    db: Optional[Path] = typer.Option(None, help="Run database (env HARNESS_DB, default results/harness.duckdb)."),
    baseline: Path = typer.Option(Path("results/baselines/demo.csv"), help="Baseline CSV to compare with."),
    update: bool = typer.Option(False, "--update", help="Write the current numbers as the new baseline (on purpose only)."),
    tolerance_floor: float = typer.Option(1.0, "--tolerance-floor", help="Smallest tolerance, in absolute top-1 points."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="With --update: write a baseline from a sweep with missing cells."),
):
    """Compare mean accuracy over seeds with a baseline; exit 1 on a regression beyond tolerance or a missing entry."""
    from harness.regression import compare, current_numbers, print_report, read_baseline, write_baseline

    if tolerance_floor < 0:
        raise HarnessError(f"--tolerance-floor must be >= 0 points, got {tolerance_floor}.")
    db_path = paths.db_path(db)
    _ingest_pending(db_path)
    altered = _warn_altered(db_path)
    if altered and update:
        raise HarnessError(f"{len(altered)} stored run(s) in {db_path} were changed after they were stored; a baseline is "
                           "not written from them. Rerun them with `harness run ... --force`.")
    if update:
        console.print(f"Wrote {write_baseline(db_path, baseline, allow_partial)} entries to {baseline} (mean top-1 over seeds). Commit it with the change that moved the numbers.")
        return
    result = compare(current_numbers(db_path), read_baseline(baseline), floor=tolerance_floor)
    print_report(result, baseline, tolerance_floor, console)
    if result.failed or altered:
        raise typer.Exit(1)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; user errors become a message and exit code 2."""
    err = Console(stderr=True)
    try:
        result = app(args=argv, standalone_mode=False)  # returns typer.Exit's code in this mode
        return result if isinstance(result, int) else 0
    except HarnessError as exc:
        err.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)  # literal text
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 2
    except typer.TyperException as exc:  # usage errors: unknown option, missing value
        exc.show()
        return 2


def main() -> None:
    sys.exit(run_cli())
