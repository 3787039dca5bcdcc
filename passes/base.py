"""What a pass is, and where passes are registered.

A pass is a class with a kebab-case `name`, a `version` (part of the artifact's cache key and
manifest), typed `options`, and `run(module) -> bool` that rewrites the module in place and says
whether it changed anything.  Registration is explicit and scoped: a duplicate name is an error,
never a silent overwrite, and `PassRegistry.scope()` gives a child registry whose additions
vanish when the scope ends (tests, plugins loaded for one compile).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from amxc.ir import Module


class PassError(ValueError):
    pass


@dataclass(frozen=True)
class Option:
    type: type                 # int, float, bool or str
    default: Any
    help: str = ""

    def coerce(self, pass_name: str, name: str, value: Any) -> Any:
        if isinstance(value, str) and self.type is not str:
            text = value.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    return text.lower() in ("true", "1")
                return self.type(text)
            except ValueError:
                raise PassError(f"pass '{pass_name}': option '{name}' expects {self.type.__name__}, "
                                f"got '{value}'") from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise PassError(f"pass '{pass_name}': option '{name}' expects {self.type.__name__}, "
                            f"got {value!r}")
        return value


class Pass:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    options: ClassVar[dict[str, Option]] = {}
    origin: ClassVar[str] = "builtin"      # or "plugin:<distribution or module>", "python:<module>"

    def __init__(self, **opts):
        unknown = set(opts) - set(self.options)
        if unknown:
            raise PassError(f"pass '{self.name}' has no option '{sorted(unknown)[0]}' "
                            f"(options: {', '.join(self.options) or 'none'})")
        self.opts = {k: o.coerce(self.name, k, opts[k]) if k in opts else o.default
                     for k, o in self.options.items()}

    def run(self, module: Module) -> bool:
        raise NotImplementedError

    def spec(self) -> str:
        """This pass as it appears in a pipeline string: name{non-default options}."""
        shown = {k: v for k, v in self.opts.items() if v != self.options[k].default}
        if not shown:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_fmt(v)}" for k, v in shown.items()) + "}"

    def __repr__(self) -> str:
        return f"<pass {self.spec()} v{self.version}>"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and (not v or v != v.strip() or not v.isprintable()
                               or any(c in v for c in ',{}"')):
        return json.dumps(v)       # the pipeline syntax's quoted form, so the spec parses back
    return str(v)


class PassRegistry:
    def __init__(self, parent: "PassRegistry | None" = None):
        self.parent = parent
        self._passes: dict[str, type[Pass]] = {}

    def register(self, cls: type[Pass]) -> type[Pass]:
        if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
            raise PassError(f"pass class {cls.__name__} needs a kebab-case name")
        if self.lookup(cls.name) is not None:
            existing = self.lookup(cls.name)
            raise PassError(f"pass '{cls.name}' is already registered (by {existing.origin}, "
                            f"{existing.__module__}.{existing.__qualname__})")
        if "origin" not in vars(cls):   # the manifest must not call a user's pass builtin
            cls.origin = "builtin" if cls.__module__.startswith("amxc.") else f"python:{cls.__module__}"
        self._passes[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type[Pass] | None:
        if name in self._passes:
            return self._passes[name]
        return self.parent.lookup(name) if self.parent else None

    def get(self, name: str) -> type[Pass]:
        cls = self.lookup(name)
        if cls is None:
            raise PassError(f"unknown pass '{name}' (known: {', '.join(sorted(self.names()))})")
        return cls

    def names(self) -> set[str]:
        return set(self._passes) | (self.parent.names() if self.parent else set())

    @contextlib.contextmanager
    def scope(self) -> Iterator["PassRegistry"]:
        """A child registry, current for the block: passes registered in it (by decorator,
        plugin or entry point) are gone when the block ends."""
        child = PassRegistry(self)
        token = _CURRENT.set(child)
        try:
            yield child
        finally:
            _CURRENT.reset(token)


REGISTRY = PassRegistry()
_CURRENT: contextvars.ContextVar[PassRegistry] = contextvars.ContextVar("amxc_passes", default=REGISTRY)


def current_registry() -> PassRegistry:
    return _CURRENT.get()


def register_pass(name: str, *, version: int = 1, registry: PassRegistry | None = None):
    """Class decorator: give the pass its name and version and register it (in the current
    scope unless a registry is given)."""
    def wrap(cls: type[Pass]) -> type[Pass]:
        cls.name, cls.version = name, version
        (registry or current_registry()).register(cls)
        return cls
    return wrap
