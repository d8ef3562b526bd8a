"""Command-line flags generated from the config dataclasses' fields.

Each setting is declared once, as a dataclass field whose metadata carries its help:
``field(default=..., metadata={"help": ..., "flag": "--hidden", "choices": ARCHS,
"metavar": ..., "cli": False})``. The flag is ``--`` + the field name with dashes unless
``"flag"`` names it; a bool defaulting to True becomes ``--no-<name>`` (store_false);
``"none"`` says what a None default means in the help. A dataclass inherits the fields of its
base classes (named in the class statement), and a plain value assigned to an inherited name
changes only its default, as ``RunSettings`` declares.

The classes are read from their source with :mod:`ast`, not imported: their modules import
torch, and ``compressm-tune --help`` must not pay for that. Defaults and choices are literals
or module constants (followed through ``from ... import`` lines); ``test_cli`` checks that what
is read here equals the imported dataclasses.
"""

from __future__ import annotations

import argparse
import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Field", "IntList", "add_fields", "constant", "fields_of"]

_ROOT = Path(__file__).resolve().parents[1]  # the compressm_tune package
_UNKNOWN = object()  # a default that is not a literal (a factory, an expression)


@dataclass(frozen=True)
class Field:
    """One dataclass field as the command line sees it."""

    name: str
    kind: str  # "bool", "int", "float", "str", "ints" (tuple/list of int)
    optional: bool  # ``X | None``
    default: Any
    meta: dict

    @property
    def flag(self) -> str:
        if "flag" in self.meta:
            return self.meta["flag"]
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.kind == "bool" and self.default is True else f"--{dashed}"


def _module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    base = _ROOT.joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse(_module_path(module).read_text(encoding="utf-8"))


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if _module_path(module).name == "__init__.py" else \
        module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _definition(module: str, name: str) -> tuple[str, ast.AST]:
    """Where ``name`` is defined: follows ``from X import name`` through the package."""
    for node in _tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return module, node.value
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _resolve_from(module, node)
                    if source.split(".")[0] != "compressm_tune":
                        raise LookupError(f"{name} comes from {source}, outside the package")
                    return _definition(source, alias.name)
    raise LookupError(f"{module} defines no {name}")


def _value(module: str, node: ast.AST | None) -> Any:
    """A literal, a module constant or ``range(a, b)``; ``_UNKNOWN`` otherwise."""
    if node is None:
        return _UNKNOWN
    if isinstance(node, ast.Name):
        try:
            where, value = _definition(module, node.id)
        except LookupError:
            return _UNKNOWN
        return _value(where, value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "range":
            args = [_value(module, a) for a in node.args]
            return _UNKNOWN if _UNKNOWN in args else range(*args)
        if node.func.id == "field":
            kw = {k.arg: k.value for k in node.keywords}
            if "default" in kw:
                return _value(module, kw["default"])
            factory = kw.get("default_factory")
            if isinstance(factory, ast.Lambda):
                return _value(module, factory.body)
            return _UNKNOWN
    if isinstance(node, ast.Tuple | ast.List):
        items = [_value(module, e) for e in node.elts]
        if any(i is _UNKNOWN for i in items):
            return _UNKNOWN
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        keys = [_value(module, k) for k in node.keys]
        values = [_value(module, v) for v in node.values]
        return _UNKNOWN if _UNKNOWN in keys + values else dict(zip(keys, values, strict=True))
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _UNKNOWN


def constant(where: str) -> Any:
    """A module constant, e.g. ``constant("compressm_tune.models:ARCHS")``, without importing."""
    module, name = where.split(":")
    defined_in, node = _definition(module, name)
    value = _value(defined_in, node)
    if value is _UNKNOWN:
        raise LookupError(f"{where} is not a literal")
    return value


def _kind(annotation: str) -> tuple[str, bool]:
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    base = [p for p in parts if p != "None"]
    text = base[0] if len(base) == 1 else annotation
    if text in ("bool", "int", "float", "str"):
        return text, optional
    if text in ("tuple[int, ...]", "list[int]"):
        return "ints", optional
    return "other", optional


@functools.cache
def fields_of(where: str) -> dict[str, Field]:
    """The fields of a dataclass, e.g. ``fields_of("compressm_tune.training:TrainConfig")``."""
    module, name = where.split(":")
    defined_in, cls = _definition(module, name)
    if not isinstance(cls, ast.ClassDef):
        raise LookupError(f"{where} is not a class")
    out: dict[str, Field] = {}
    for base in cls.bases:  # a base dataclass's fields come first, as in dataclasses
        if isinstance(base, ast.Name):
            out.update(fields_of(f"{defined_in}:{base.id}"))
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        is_field = (isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", "") == "field")
        # a plain value assigned to an inherited name changes only its default (RunSettings)
        meta = dict(out[name].meta) if name in out and not is_field else {}
        if is_field:
            for kw in node.value.keywords:
                if kw.arg == "metadata":
                    meta = {k: v for k, v in _value(defined_in, kw.value).items()}
        default = None if node.value is None else _value(defined_in, node.value)
        kind, optional = _kind(ast.unparse(node.annotation))
        out[name] = Field(name, kind, optional, default, meta)
    return out


class IntList(argparse.Action):
    """Comma-separated integers: ``"64,128"`` -> ``(64, 128)``.

    A bad value raises :class:`ConfigError`, which argparse lets through, so the command
    line reports it in one line like every other bad setting.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from compressm_tune.errors import ConfigError

        try:
            setattr(namespace, self.dest, tuple(int(w) for w in values.split(",")))
        except ValueError:
            raise ConfigError(f"{option_string} must be comma-separated integers, got "
                              f"{values!r}") from None


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def add_fields(parser: Any, where: str, names: list[str] | tuple[str, ...], *,
               defaults: dict[str, Any] | None = None, unset: bool = False,
               types: dict[str, Any] | None = None) -> None:
    """Add one flag per field in ``names`` (in that order) of the dataclass at ``where``.

    ``defaults`` overrides a field's default on the command line (e.g. ``device="auto"``);
    with ``unset`` every flag defaults to None (the caller keeps the dataclass's default for
    flags left out) while the help still shows the dataclass's; ``types`` overrides the
    argparse type of a field (e.g. ``str`` for a field the caller parses itself).
    """
    fields = fields_of(where)
    for name in names:
        f = fields[name]
        if f.meta.get("cli") is False:
            raise ValueError(f"{where}.{name} is not a command-line setting")
        default = (defaults or {}).get(name, f.default)
        if default is _UNKNOWN:
            raise ValueError(f"{where}.{name}: default is not a literal; pass defaults=")
        text = f.meta.get("help", "")
        if f.kind != "bool" and (default is not None or "none" in f.meta):
            text += f" (default: {_shown(default) if default is not None else f.meta['none']})"
        if f.kind == "other":
            raise ValueError(f"{where}.{name}: no flag for this type")
        kwargs: dict[str, Any] = {"dest": name, "help": text.replace("%", "%%")}
        if f.kind == "bool":
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            if f.kind == "ints" and name not in (types or {}):
                kwargs["action"] = IntList
            else:
                kwargs["type"] = (types or {}).get(name) or {
                    "int": int, "float": float, "str": str}[f.kind]
            kwargs["default"] = None if unset else default
            if "choices" not in f.meta:  # argparse's own metavar, from the flag
                kwargs["metavar"] = f.flag.lstrip("-").replace("-", "_").upper()
            for key in ("choices", "metavar"):
                if key in f.meta:
                    kwargs[key] = f.meta[key]
        parser.add_argument(f.flag, **kwargs)
