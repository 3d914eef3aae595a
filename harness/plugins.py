"""Methods from outside the repository: entry points (group `harness.methods`) and `--method-path FILE.py`.

A plugin is a Python module that defines a `Method` subclass (methods/base.py) and registers it
with `@register`, exactly as a built-in method does; an entry point may also name the class itself,
which is then registered. `load_plugins` runs once per process before any method name is resolved
(run, list methods, report, and every distributed worker). It refuses, as a HarnessError (exit 2)
naming the file or entry point, a plugin whose import raises, a class that is not a Method subclass
or lacks `name`/`paper`, a file that registers nothing, and a name that is already taken (a
built-in is never replaced silently). A refused plugin leaves the registry as it was.

Each plugin method carries a source identity that enters its runs' config hash: the sha256 of the
file's bytes for --method-path (content, never the path, so the cache follows edits), the
distribution's name and version for an entry point. Built-in methods carry none, so their config
hashes are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from harness.errors import HarnessError

GROUP = "harness.methods"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # no commas or spaces: `-m a,b` splits on them

SOURCES: dict[str, dict] = {}  # plugin method name -> source identity (stored in its runs' config)
ORIGINS: dict[str, str] = {}  # plugin method name -> where it came from, for messages
_state = {"entry_points": False}
_files: dict[str, str] = {}  # resolved path -> sha256 of the file loaded from it


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def method_source(name: str) -> dict | None:
    """The source identity of a plugin method; None for a built-in."""
    return SOURCES.get(name)


def origin(name: str, registry: dict | None = None) -> str:
    """Where a registered method comes from, in words (`registry`: as it was before a plugin loaded)."""
    if name in ORIGINS:
        return ORIGINS[name]
    if registry is None:
        from methods import REGISTRY as registry
    cls = registry.get(name)
    return f"the built-in method '{name}' ({cls.__module__})" if cls is not None else "unregistered"


def _taken(where: str, name: str, before: dict) -> HarnessError:
    return HarnessError(
        f"plugin {where} registers method '{name}', which is already {origin(name, before)}; "
        "rename the plugin's `name` (a plugin never replaces a registered method)."
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _import_file(path: Path, sha: str):
    module_name = f"harness_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{sha[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _check_class(cls, where: str) -> None:
    from methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls is Method:
        raise HarnessError(f"plugin {where}: {getattr(cls, '__name__', repr(cls))} is not a subclass of methods.Method.")
    for attr in ("name", "paper"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr).strip():
            raise HarnessError(
                f"plugin {where}: class {cls.__name__} has no `{attr}`; set {attr} = \"...\" on it "
                f"({'the name `-m` selects' if attr == 'name' else 'the paper it implements, or a one-line description'})."
            )
    if not NAME.match(cls.name):
        raise HarnessError(f"plugin {where}: method name {cls.name!r} must be letters, digits, '_', '.' or '-' (no spaces or commas).")


def _loaded_before(loaded, registry: dict) -> bool:
    """Whether `loaded` (a class or module) was already registered by an earlier plugin."""
    if isinstance(loaded, type):
        return getattr(loaded, "name", None) in SOURCES and registry.get(loaded.name) is loaded
    if isinstance(loaded, ModuleType):
        return any(registry[n].__module__ == loaded.__name__ for n in SOURCES if n in registry)
    return False


def _load(where: str, load, source: dict) -> list[str]:
    """Run `load` (an import) and register what it contributes; roll back on any problem."""
    from methods import REGISTRY
    from methods.base import Method

    before = dict(REGISTRY)
    try:
        try:
            loaded = load()
        except HarnessError:
            raise
        except AttributeError as exc:
            obj = getattr(exc, "obj", None)  # `@register` on a class without `name`
            if exc.name == "name" and isinstance(obj, type) and issubclass(obj, Method):
                _check_class(obj, where)  # raises: names the class and the missing attribute
            raise HarnessError(f"plugin {where} failed to import: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported in one line
            raise HarnessError(f"plugin {where} failed to import: {_one_line(exc)}") from None
        for name, cls in REGISTRY.items():
            if name in before and before[name] is not cls:
                raise _taken(where, name, before)
        added = [n for n in REGISTRY if n not in before]
        if isinstance(loaded, type) and REGISTRY.get(getattr(loaded, "name", None)) is not loaded:
            _check_class(loaded, where)  # an entry point that names a class not registered by its import
            if loaded.name in REGISTRY:
                raise _taken(where, loaded.name, before)
            REGISTRY[loaded.name] = loaded
            added.append(loaded.name)
        elif loaded is not None and not isinstance(loaded, ModuleType) and not isinstance(loaded, type):
            raise HarnessError(f"plugin {where}: the entry point names {loaded!r}, not a Method subclass or a module.")
        if not added and _loaded_before(loaded, REGISTRY):
            return []  # e.g. a second entry point into a module whose import registered both classes
        if not added:
            raise HarnessError(
                f"plugin {where} registers no method: decorate a methods.Method subclass with @register "
                "(from methods import Method, register)."
            )
        for name in added:
            _check_class(REGISTRY[name], where)
    except BaseException:
        REGISTRY.clear()
        REGISTRY.update(before)
        raise
    for name in added:
        SOURCES[name] = source
        ORIGINS[name] = f"plugin {where}"
    return added


def _entry_points() -> None:
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else "unknown"
        where = f"entry point '{ep.name} = {ep.value}' (distribution {dist_name} {version})"
        _load(where, ep.load, {"distribution": dist_name, "version": version})


def load_plugins(method_paths: list[Path] | tuple = ()) -> list[str]:
    """Register the installed entry-point methods (once per process), then each --method-path file
    (once per file). Returns the plugin method names known afterwards."""
    import methods  # noqa: F401  (the built-ins register first: a plugin cannot take their names)

    if not _state["entry_points"]:
        _state["entry_points"] = True
        _entry_points()
    for raw in method_paths or ():
        path = Path(raw).expanduser()
        if not path.is_file():
            raise HarnessError(f"--method-path {raw}: no such file (give the path of a .py file that registers a method).")
        key = str(path.resolve())
        if key in _files:
            continue
        sha = file_sha256(path)
        _load(str(raw), lambda p=path, h=sha: _import_file(p, h), {"file_sha256": sha})
        _files[key] = sha
    return list(SOURCES)


def loaded_files() -> list[str]:
    """The --method-path files loaded in this process (absolute), for workers to load the same."""
    return list(_files)


def reset() -> None:
    """Forget every plugin (tests): unregister their methods and allow loading again."""
    from methods import REGISTRY

    for name in SOURCES:
        REGISTRY.pop(name, None)
    SOURCES.clear()
    ORIGINS.clear()
    _files.clear()
    _state["entry_points"] = False
