"""Where things live by default; every location can be overridden by an option or environment variable.
Also what the harness says when the machine, not the input, fails a write (full disk, read-only or
unwritable folder, a name too long): one message naming the path and the fix, exit 2."""

import errno
import os
from pathlib import Path

from harness.errors import HarnessError

# Failures of the machine around a run, never of a method: they stop the sweep with a message.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def environment_error(exc: OSError, what: str = "a file") -> HarnessError:
    """The user's version of an OSError that the machine caused."""
    where = exc.filename or "?"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = "the disk (or your quota) is full", "free some space or point the harness at another disk"
    elif exc.errno == errno.ENAMETOOLONG:
        why, fix = "a name in the path is too long (at most 255 bytes per folder or file name)", "use a shorter path"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why, fix = "the folder is read-only or not writable", "make it writable or choose another folder"
    else:
        why, fix = exc.strerror or str(exc), "choose another folder"
    hint = " (the cache: set HARNESS_CACHE to a writable folder with space)" if str(where).startswith(str(cache_dir())) else ""
    return HarnessError(f"Could not write {what} at {where}: {why}{hint}. {fix[0].upper() + fix[1:]}.")


def check_path(path: Path, what: str) -> Path:
    """Refuse a path the file system cannot hold (a name over 255 bytes), before any work."""
    for part in Path(path).parts:
        if len(part.encode()) > 255:
            raise HarnessError(f"The {what} path {str(path)[:80]}... has a name of {len(part.encode())} bytes; file systems "
                               "allow at most 255 bytes per folder or file name. Use a shorter path.")
    return Path(path)


def writable_folder(path: Path, what: str) -> Path:
    """`path` as a folder this process can write into (created if missing), or a HarnessError saying why."""
    path = check_path(Path(path), what)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"The {what} {path} is a file, not a folder. Pass a folder (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise environment_error(exc, f"the {what}") from None
    if not os.access(path, os.W_OK):
        raise HarnessError(f"The {what} {path} is not writable. Make it writable or choose another folder.")
    return path


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    return check_path(Path(explicit or os.environ.get("HARNESS_DATA_ROOT") or "data").expanduser(), "data root")


def db_path(explicit: str | os.PathLike | None = None) -> Path:
    return check_path(Path(explicit or os.environ.get("HARNESS_DB") or "results/harness.duckdb").expanduser(), "database (--db)")


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
