"""Passes from outside amxc: installed packages' entry points and `--pass-plugin` specs.

    [project.entry-points."amxc.passes"]          (an installed distribution's pyproject.toml)
    my-pass = "my_package.passes:MyPass"          a Pass subclass, a function returning some,
                                                  or a module (every named Pass defined in it)

    --pass-plugin my_package.passes:MyPass        the same three kinds, by module name
    --pass-plugin path/to/passes.py:MyPass        or from a file; ':NAME' may be left out

Plugins register into the current registry, which the caller makes a scope
(`with REGISTRY.scope(): load_plugins(...)`) so they live for one compile.  Each class gets an
`origin` for the manifest: `plugin:<distribution>==<version>` for entry points, `plugin:<spec
module or file>` for `--pass-plugin`.  Classes are collected from the module rather than relying
on `@register_pass` having run, because a module imported once (an earlier scope) is not
executed again.  A name taken by a different class is an error naming both origins.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from .base import Pass, PassError, current_registry

ENTRY_POINT_GROUP = "amxc.passes"


def load_plugins(specs: Iterable[str] = (), entry_points: bool = True) -> list[type[Pass]]:
    """Register the passes of every installed `amxc.passes` entry point (unless entry_points
    is False) and of each `--pass-plugin` spec, in that order; return the classes loaded."""
    loaded: list[type[Pass]] = []
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = f"{ep.dist.name}=={ep.dist.version}"
            where = f"entry point '{ep.name} = {ep.value}' of {dist}"
            loaded += _register(where, f"plugin:{dist}", _passes_of(where, _guarded(where, ep.load)))
    for spec in specs:
        where = f"--pass-plugin '{spec}'"
        target, attr = _split(spec)
        module = _import(where, target)
        obj = module if attr is None else _attribute(where, module, attr)
        loaded += _register(where, f"plugin:{target}", _passes_of(where, obj))
    return loaded


def _split(spec: str) -> tuple[str, str | None]:
    """'module:Name' or 'path/file.py:Name' -> (module or path, Name); no ':Name' -> None.
    Only a trailing identifier counts as the name, so 'C:\\dir\\file.py' stays a path."""
    target, sep, attr = spec.rpartition(":")
    if sep and attr.isidentifier():
        return target, attr
    return spec, None


def _import(where: str, target: str) -> ModuleType:
    if target.endswith(".py") or "/" in target or "\\" in target:
        return _guarded(where, lambda: _import_file(Path(target)))
    return _guarded(where, lambda: importlib.import_module(target))


def _import_file(path: Path) -> ModuleType:
    """Execute a .py file as module `amxc_plugin_<stem>`, afresh on every load, so that a plugin
    edited between two compiles in one process is seen, and no installed module is shadowed."""
    if not path.is_file():
        raise PassError(f"no such file {path}")
    name = f"amxc_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _guarded(where: str, load):
    """Run plugin code; its failure is the plugin's, reported on one line with its location."""
    try:
        return load()
    except PassError as e:      # e.g. @register_pass in the plugin hit a name already taken
        raise PassError(f"{where}: {e}") from None
    except Exception as e:
        raise PassError(f"{where}: failed to load: {type(e).__name__}: {e}{_location(e)}") from e


def _location(e: BaseException) -> str:
    """' (file.py:12)' for the innermost frame in the plugin's own code, if any."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not (frame.filename.startswith("<") or "importlib" in frame.filename
                or frame.filename == __file__):
            return f" ({Path(frame.filename).name}:{frame.lineno})"
    return ""


def _attribute(where: str, module: ModuleType, attr: str) -> Any:
    if not hasattr(module, attr):
        found = ", ".join(c.__name__ for c in _defined_passes(module)) or "none"
        raise PassError(f"{where}: module '{module.__name__}' has no '{attr}' (passes defined "
                        f"there: {found})")
    return getattr(module, attr)


def _passes_of(where: str, obj: Any) -> list[type[Pass]]:
    """The Pass classes `obj` stands for: itself, what it returns when called, or a module's."""
    if isinstance(obj, ModuleType):
        passes = _defined_passes(obj)
        if not passes:
            raise PassError(f"{where}: module '{obj.__name__}' defines no Pass subclass with a name")
        return passes
    if _is_pass(obj):
        return [obj]
    if callable(obj):
        result = _guarded(where, obj)
        passes = list(result) if isinstance(result, (list, tuple)) else [result]
        if passes and all(_is_pass(p) for p in passes):
            return passes
        raise PassError(f"{where}: {getattr(obj, '__name__', obj)}() returned {result!r}; "
                        f"expected a Pass subclass or a list of them")
    raise PassError(f"{where}: {obj!r} is not a Pass subclass, a function returning passes, or a module")


def _is_pass(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Pass) and obj is not Pass


def _defined_passes(module: ModuleType) -> list[type[Pass]]:
    return [obj for obj in vars(module).values()
            if _is_pass(obj) and obj.__module__ == module.__name__ and obj.name]


def _register(where: str, origin: str, passes: list[type[Pass]]) -> list[type[Pass]]:
    registry = current_registry()
    for cls in passes:
        existing = registry.lookup(cls.name)
        if existing is None:
            try:
                registry.register(cls)
            except PassError as e:      # e.g. a class without a kebab-case name
                raise PassError(f"{where}: {e}") from None
        elif existing is not cls:
            raise PassError(f"{where}: pass '{cls.name}' ({origin}, {_qualname(cls)}) is already "
                            f"registered by {existing.origin} ({_qualname(existing)})")
        elif registry.parent is not None and registry.parent.lookup(cls.name) is cls:
            continue        # registered before this scope (amxc's own, say): its origin stands
        cls.origin = origin
    return passes


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
