"""The pass registry: every pass has a kebab-case name, typed options (dataclass fields) and a docstring.

A pass is a frozen dataclass subclassing `Pass` whose fields are its options, or a plain function
`fn(graph, *, option: type = default, ...) -> bool` registered with `@register("name")`. Installed
packages add passes through the entry-point group `lowbit.passes` (each entry point names a module
to import, or a pass class or function to register).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from importlib import metadata
from typing import Any, Callable, ClassVar

from lowbit.errors import LowbitError
from lowbit.ir import Graph

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ENTRY_POINT_GROUP = "lowbit.passes"


class PassError(LowbitError):
    """An unknown pass, a bad option, or a pipeline string that does not parse."""


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base class of passes. Subclasses set `name` and implement `run`, returning whether they changed the graph."""

    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> bool:
        raise NotImplementedError

    def __call__(self, graph: Graph) -> bool:
        return self.run(graph)

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())

    @classmethod
    def options(cls) -> dict[str, tuple[Any, Any]]:
        """Option name → (type, default)."""
        hints = typing.get_type_hints(cls)
        return {f.name: (hints.get(f.name, str), f.default) for f in dataclasses.fields(cls)}

    def spec(self) -> str:
        """This pass as pipeline text, e.g. `prune-nm{n=2,m=4}` (only options that differ from defaults)."""
        changed = [f"{f.name}={_format_option(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(changed) + "}" if changed else "")


_PASSES: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register(target: Any = None, *, name: str | None = None) -> Any:
    """Register a pass: `@register` on a `Pass` subclass, or `@register("name")` on a function."""
    if isinstance(target, str):
        return lambda fn: _register_function(fn, target)
    if target is None:
        return lambda item: register(item, name=name)
    if inspect.isclass(target) and issubclass(target, Pass):
        if name:
            target.name = name
        _add(target)
        return target
    if callable(target):
        return _register_function(target, name or target.__name__.replace("_", "-"))
    raise PassError(f"cannot register {target!r} as a pass")


def _register_function(fn: Callable[..., bool], name: str) -> Callable[..., bool]:
    hints = typing.get_type_hints(fn)
    fields = []
    for parameter in list(inspect.signature(fn).parameters.values())[1:]:
        if parameter.default is inspect.Parameter.empty:
            raise PassError(f"option '{parameter.name}' of pass '{name}' needs a default")
        fields.append((parameter.name, hints.get(parameter.name, type(parameter.default)),
                       dataclasses.field(default=parameter.default)))

    def run(self: Pass, graph: Graph) -> bool:
        return bool(fn(graph, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))

    cls = dataclasses.make_dataclass(
        "".join(part.title() for part in name.split("-")) + "Pass", fields, bases=(Pass,), frozen=True,
        namespace={"run": run, "name": name, "__doc__": inspect.getdoc(fn) or "",
                   "__module__": fn.__module__})
    _add(cls)
    fn.pass_class = cls
    return fn


def _add(cls: type[Pass]) -> None:
    if not _NAME.match(cls.name or ""):
        raise PassError(f"pass name {cls.name!r} must be kebab-case (e.g. 'fold-batchnorm')")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise PassError(f"a pass named '{cls.name}' is already registered ({existing.__module__})")
    _PASSES[cls.name] = cls


def load_entry_points() -> None:
    """Import the passes that installed packages declare in the `lowbit.passes` entry-point group."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plugin must not break lowbit; say which one
            raise PassError(f"pass plugin '{entry_point.name}' ({entry_point.value}) failed to load: {error}") \
                from error
        if inspect.isclass(loaded) and issubclass(loaded, Pass) and loaded.name not in _PASSES:
            _add(loaded)
        elif inspect.isfunction(loaded) and not hasattr(loaded, "pass_class"):
            register(loaded, name=entry_point.name)


def get_pass(name: str) -> type[Pass]:
    load_entry_points()
    try:
        return _PASSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, sorted(_PASSES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PassError(f"unknown pass '{name}'{hint} (`lowbit passes` lists them)") from None


def registered_passes() -> dict[str, type[Pass]]:
    load_entry_points()
    return dict(sorted(_PASSES.items()))


def make_pass(name: str, options: dict[str, str | Any] | None = None) -> Pass:
    """An instance of pass `name`; option values given as text are converted to the option's type."""
    cls = get_pass(name)
    declared = cls.options()
    values = {}
    for key, raw in (options or {}).items():
        if key not in declared:
            raise PassError(f"pass '{name}' has no option '{key}'; its options are {sorted(declared) or 'none'}")
        values[key] = convert_option(raw, declared[key][0], f"option '{key}' of pass '{name}'")
    return cls(**values)


def convert_option(raw: Any, kind: Any, where: str) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        origin = typing.get_origin(kind)
        if origin is tuple:
            item_type = (typing.get_args(kind) or (str,))[0]
            parts = [p for p in re.split(r"[x:;/ ]", text) if p]
            return tuple(convert_option(p, item_type, where) for p in parts)
    except ValueError:
        raise PassError(f"{where}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from None
    return text


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)
