"""Where things live by default; every location can be overridden by an option or environment variable."""

import os
from pathlib import Path


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("HARNESS_DATA_ROOT") or "data").expanduser()


def db_path(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("HARNESS_DB") or "results/harness.duckdb").expanduser()


def cache_dir() -> Path:
    """Generated demo data, manifests, image and feature caches. Safe to delete."""
    root = os.environ.get("HARNESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "harness"
    return Path(root).expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file; a failed write (full disk, unwritable
    folder, text that cannot be encoded) removes its temporary file and re-raises, leaving no debris."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
