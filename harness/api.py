"""The harness from Python (a notebook, a script): what the command line does, with lists for lists.

    from harness import api
    runs = api.run(methods=["coop", "clip_lora"], datasets=["demo_colours"], suite="demo", shots=[1, 16], seeds=[1])
    table = api.results()                          # every stored run, one row each
    cmp = api.compare("coop", "clip_lora")         # paired difference, interval, wins/ties/losses, test
    api.report(out="reports")                      # index.html + leaderboard .csv/.md/.tex

`harness run` and the other commands are a thin layer over these functions: they parse the options
and print. Bad input raises `HarnessError` with the message the command line prints (exit 2 there).
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.text import Text

from harness import paths
from harness.errors import HarnessError

EXECUTORS = ("serial", "local", "slurm")


def run(
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
    *,
    suite: str = "standard",
    all_methods: bool = False,
    all_datasets: bool = False,
    shots: list[int] | None = None,
    seeds: list[int] = (1, 2, 3),
    backbones: list[str] | None = None,
    weights: str | None = None,
    data_root: str | Path | None = None,
    db: str | Path | None = None,
    sets: dict | None = None,
    protocol: str = "fewshot",
    recipe: str | None = None,
    sampler: str = "coop",
    splits: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    executor: str = "serial",
    jobs: int = 1,
    records: str | Path | None = None,
    wait: bool = True,
    cluster=None,
    method_paths: list[str | Path] | None = None,
    console: Console | None = None,
) -> pd.DataFrame:
    """Run methods over datasets, shots and seeds and store every run; returns this grid's runs as
    stored (one row per run, `method` the leaderboard name), or with `dry_run` the planned grid with a
    `stored` column. `.attrs["failed"]` is True when a run or a job failed. Shots default to the
    protocol's (1, 2, 4, 8, 16 for few-shot), backbones to the suite's. `sets` overrides
    hyper-parameters ({"n_ctx": 4}); `recipe` takes another protocol's recipe ("fewshot": the few-shot
    recipe under base2new; "base2new" under fewshot; None: the protocol's own); `cluster` is a
    `harness.distributed.ClusterOptions`."""
    from harness.backbones import resolve_weights
    from harness.cards import get_card, suite_cards, suites
    from harness.data.fewshot import check_sampler
    from harness.grid import build_grid, canonical_method, check_grid
    from harness.plugins import load_plugins, loaded_files
    from harness.protocols import check_targets, get_protocol
    from harness.records import default_records_dir, ingest
    from harness.runner import load_datasets, resolve_device, resolve_precision, run_sweep
    from harness.store import database_id, store_or_keep, stored_ok_run, stored_run_ids
    from methods import REGISTRY

    console = console or Console()
    load_plugins([Path(p) for p in method_paths or []])  # plugins register before any name is resolved
    # an unknown method is refused before any data is read; `tip-adapter` is tip_adapter, coop_ctx4 a paper variant
    methods = list(REGISTRY) if all_methods else list(dict.fromkeys(canonical_method(m) for m in methods or []))
    if not methods:
        raise HarnessError("Name a method with -m/--method NAME (see `harness list methods`) or pass --all-methods.")
    suite_cards(suite)  # an unknown suite is refused by name
    evaluation = get_protocol(protocol)
    if recipe is not None:
        get_protocol(recipe)  # an unknown recipe is refused by name
    names = evaluation.datasets(suite, [] if all_datasets else list(datasets or []), all_datasets)
    if not names:
        raise HarnessError(f"Name a dataset with -d/--dataset NAME or pass --all-datasets (suite '{suite}').")
    names = list(dict.fromkeys(get_card(n).name for n in names))  # `oxford-pets` is oxford_pets
    for name in names:
        if get_card(name).suite != suite:
            raise HarnessError(f"Dataset '{name}' belongs to the {get_card(name).suite} suite, not '{suite}': pass --suite {get_card(name).suite}.")
    backbones = list(backbones or []) or [suites()[suite]["default_backbone"]]
    if weights and len(backbones) > 1:
        raise HarnessError("--weights applies to one backbone; run each backbone with its own --weights.")
    refuse_inapplicable(methods, backbones, all_methods, console)
    check_sampler(sampler)
    if executor not in EXECUTORS:
        raise HarnessError(f"--executor must be serial, local or slurm, not '{executor}'.")
    root = paths.data_root(data_root)
    paths.writable_folder(paths.cache_dir(), "cache folder (set HARNESS_CACHE to move it)")
    targets = [t.dataset for n in names for t in check_targets(evaluation, n, suite) if t.dataset not in names]
    loaded = load_datasets(names + list(dict.fromkeys(targets)), root)  # first: missing data is the likeliest problem
    check_class_sources(loaded)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    identities = {b: resolve_weights(b, weights)[1] for b in backbones}
    shot_list, seed_list = check_grid(methods, {n: loaded[n] for n in names}, list(shots or evaluation.shots or (1, 2, 4, 8, 16)),
                                      list(seeds))
    split_hashes = None
    if splits is not None:  # every split file is read and validated before any run
        from harness.data.splitfiles import read_split_files

        split_hashes = {(n, k, s): read_split_files(loaded[n], Path(splits), k, s)[1]
                        for n in names for k in shot_list if k > 0 for s in seed_list}
    grid = build_grid(methods, names, suite, shot_list, seed_list, identities, prec, dict(sets or {}), sampler=sampler,
                      split_hashes=split_hashes, splits_dir=str(Path(splits).resolve()) if splits else None, protocol=protocol,
                      recipe=recipe)
    db_path = paths.db_path(db)
    records_dir = Path(records) if records else default_records_dir(db_path)
    weights_paths = {b: weights for b in backbones}
    db_id = None
    if not dry_run:  # a dry run creates nothing; a real one finds an unwritable database before any training
        db_id = database_id(db_path)  # records made for this database carry it
        ingest(records_dir, db_path, db_id)  # runs that workers finished earlier count as complete
    at_start = stored_run_ids(db_path)  # read-only; a run stored under another id later was finished elsewhere
    if dry_run and executor == "serial":
        return _plan(grid, at_start)
    done = set() if force else set(at_start)
    if executor != "serial":
        from harness.distributed import ClusterOptions, run_distributed

        failed = run_distributed(
            grid, done, executor, jobs, cluster or ClusterOptions(), records=records_dir, db=db_path, data_root=root,
            weights_paths=weights_paths, device=dev, dry_run=dry_run, wait=wait, console=console,
            plugin_files=loaded_files(), db_id=db_id, replaces=at_start if force else {},
        )
        return _plan(grid, at_start) if dry_run else _stored(db_path, grid, failed)
    try:
        result = run_sweep(
            grid, datasets=loaded, done=done, store=lambda record: store_or_keep(db_path, {**record, "db_id": db_id}, records_dir),
            weights_paths=weights_paths, device=dev, console=console,
            running_dir=records_dir,  # each run is claimed: a second sweep of the same grid leaves it to this one
            stored_since=lambda config_hash: stored_ok_run(db_path, config_hash) not in (None, at_start.get(config_hash)),
        )
    except KeyboardInterrupt:
        raise HarnessError(
            f"Interrupted. Every run that finished is stored in {db_path} (or kept in {records_dir}, ingested by the next run); "
            "the run in progress was discarded. Run the same command again to resume."
        ) from None
    for folder in (records_dir / "running", records_dir):  # the claims' folders, when nothing else is in them
        try:
            folder.rmdir()
        except OSError:
            pass
    console.print(f"{result.ok} ok, {result.failed} failed, {result.skipped} skipped (already complete). Database: {db_path}")
    if result.elsewhere:
        console.print(f"{len(result.elsewhere)} run(s) were being trained by another process on this grid and were left to "
                      "it (it stores them); run the same command again once it has finished to check nothing is missing.")
    _refresh_published(db_path)
    if result.failed:  # error texts may hold brackets: printed as text, never as markup
        console.print(Text.assemble(("Failed runs:", "red"), "\n  " + "\n  ".join(result.failures)))
    return _stored(db_path, grid, bool(result.failed))


def results(db: str | Path | None = None, protocol: str | None = None) -> pd.DataFrame:
    """Every stored run, one row each (`method`: the leaderboard name, `base_method`: the registered
    one), after taking the records this database's own sweeps left beside it; `protocol` keeps one."""
    from harness.report import load_runs

    db_path = paths.db_path(db)
    ingest_own_records(db_path)
    runs, _ = load_runs(db_path, published=False)
    return runs[runs["protocol"] == protocol].reset_index(drop=True) if protocol else runs


def compare(a: str, b: str, db: str | Path | None = None, shots: list[int] | None = None, backbone: str | None = None,
            suite: str | None = None):
    """Paired comparison of B against A over the runs they share (`harness.compare.Comparison`)."""
    from harness.compare import compare as compare_methods
    from harness.report import ok_runs

    ok, _ = ok_runs(results(db))
    if suite:
        ok = ok[ok["suite"] == suite]
    if backbone:
        ok = ok[ok["backbone"] == backbone]
    if shots:
        ok = ok[ok["shots"].isin(list(shots) + [0])]  # a zero-shot reference has no shots
    return compare_methods(ok, a, b)


def report(db: str | Path | None = None, out: str | Path = "reports") -> dict[str, Path]:
    """Write index.html and leaderboard .csv/.md/.tex under `out`; returns the written paths."""
    from harness.report import render

    out = paths.writable_folder(Path(out), "report folder (--out)")
    db_path = paths.db_path(db)
    ingest_own_records(db_path)
    try:
        return render(db_path, out)
    except OSError as exc:
        if exc.errno not in paths.ENVIRONMENT_ERRNOS:
            raise
        raise paths.environment_error(exc, "the report") from None


def ingest_own_records(db_path: Path) -> int:
    """Take the records this database's own sweeps left beside it (records made for another database,
    or for none, wait for an explicit `harness ingest`); returns how many were left for that."""
    from harness.records import default_records_dir
    from harness.records import ingest as ingest_records
    from harness.store import database_id

    folder = default_records_dir(db_path)
    if not (folder.is_dir() and any(folder.glob("*.json"))):
        return 0
    where = (str(folder.resolve()), str(Path(db_path).resolve()))
    taken = _TAKEN.get(where)
    if taken and taken[0] == _ingest_state(folder, db_path):  # unchanged since this process took them (the CLI's note, then the API)
        return taken[1]
    db_id = database_id(db_path, create=False) or "none"  # a database from before identities owns no record
    left = ingest_records(folder, db_path, db_id).foreign
    _TAKEN[where] = (_ingest_state(folder, db_path), left)
    return left


_TAKEN: dict[tuple[str, str], tuple[tuple, int]] = {}  # (records folder, database) -> (their state when taken, records left)


def _ingest_state(folder: Path, db_path: Path) -> tuple:
    """What an ingest depends on: each record file (name, size, mtime: one stat each, no parsing) and
    the database file."""
    db = Path(db_path)
    files = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(FileNotFoundError):  # moved away (a conflict) meanwhile
            stat = path.stat()
            files.append((path.name, stat.st_size, stat.st_mtime_ns))
    db_stat = db.stat() if db.is_file() else None
    return tuple(files), db_stat and (db_stat.st_size, db_stat.st_mtime_ns)


def refuse_inapplicable(methods: list[str], backbones: list[str], all_methods: bool, console: Console) -> None:
    """A method named on the command line that cannot run on a chosen backbone
    (harness.backbones.refusal) is refused, with why, before any data is read; with --all-methods
    the grid leaves out those (method, backbone) pairs, named here."""
    from harness.backbones import refusal
    from harness.grid import method_class

    refused = [why for m in methods for b in backbones if (why := refusal(method_class(m), b))]
    if refused and not all_methods:
        raise HarnessError(" ".join(refused) + " See the applicability table: `harness list backbones`.")
    for why in refused:
        console.print(f"[yellow]skipped:[/] {why}")


def check_class_sources(datasets: dict) -> None:
    """A target that declares its classes a subset of another dataset's (ImageNet-A/-R: 200 of
    ImageNet's) must name only classes that dataset has: they are scored by matching names."""
    for splits in datasets.values():
        source = datasets.get(splits.card.class_source) if splits.card.class_source else None
        if source is None:
            continue
        missing = sorted(set(splits.classnames) - set(source.classnames))
        if missing:
            raise HarnessError(
                f"{splits.card.name}: {len(missing)} class names in {splits.root / 'classnames.txt'} are not "
                f"{source.card.name}'s (e.g. '{missing[0]}'). Copy {source.card.name}'s classnames.txt there, as "
                "CoOp's DATASETS.md says."
            )


def _plan(grid, stored: dict[str, str]) -> pd.DataFrame:
    from harness.published import display_name

    frame = pd.DataFrame([{"method": display_name(s.method, s.config), "dataset": s.dataset, "backbone": s.backbone,
                           "shots": s.shots, "seed": s.seed, "config_hash": s.config_hash, "stored": s.config_hash in stored}
                          for s in grid])
    frame.attrs.update(dry_run=True, failed=False)
    return frame


def _stored(db_path: Path, grid, failed: bool) -> pd.DataFrame:
    from harness.report import load_runs

    hashes = {s.config_hash for s in grid}
    runs = load_runs(db_path, published=False)[0] if db_path.is_file() else pd.DataFrame(columns=["config_hash"])
    frame = runs[runs["config_hash"].isin(hashes)].reset_index(drop=True)
    frame.attrs.update(dry_run=False, failed=bool(failed))
    return frame


def _refresh_published(db_path: Path) -> None:
    from harness.published import load_published

    try:
        load_published(db_path)  # published numbers queryable beside the runs (table `published`)
    except HarnessError as exc:  # every run is stored already; only the convenience table is stale
        Console(stderr=True).print(f"warning: the published table was not refreshed: {exc}", markup=False)
