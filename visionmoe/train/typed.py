"""Typed values from plain data: dataclasses from nested dicts, dotted overrides, strict YAML.

The machinery under :mod:`visionmoe.train.config`, kept apart from the run's sections so that each
reads on its own: this module knows nothing of a run, only of dataclasses and their annotations.
Every value is checked against its field's annotation (``int``, ``float``, ``str``, ``bool``, unions
with None, tuples, dicts, and nested dataclasses such as :class:`visionmoe.MoEConfig`), and every
failure is one line naming the key, the value and what was expected. A nested dataclass may define
a static ``translate(values) -> dict`` that reads legacy keys of saved configs before the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import fields
from typing import Any, Union

import yaml


def build(cls: type, values: Any, source: str) -> Any:
    """A ``cls`` from a mapping of its fields; unknown keys and wrongly typed values raise one-line errors.

    ``source`` names the mapping in errors: a section's dotted key (``model.moe``), or a file.
    """
    if not isinstance(values, dict):
        raise TypeError(f"{source} must be a mapping of {cls.__name__} fields, got {values!r}")
    translate = getattr(cls, "translate", None)  # legacy keys of saved configs (MoEConfig's dropless)
    if translate is not None:
        values = translate(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    if unknown := sorted(set(values) - set(names)):
        raise ValueError(f"unknown key(s) {unknown} in {source}; valid keys: {names}")
    prefix = "" if source in ("config",) or source.endswith((".yaml", ".yml")) else f"{source}."
    return cls(**{k: coerce(f"{prefix}{k}", v, hints[k]) for k, v in values.items()})


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int -> float and list -> tuple allowed), else a one-line error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except BadValue:
                raise  # the right type, a wrong value: say so rather than "wrong type"
            except (TypeError, ValueError):
                if dataclasses.is_dataclass(option) and isinstance(value, dict):
                    raise  # a section's own error (its key, its valid keys) says more than "wrong type"
                continue
        raise TypeError(f"{key}={value!r} has the wrong type; expected {_name(annotation)}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # no float setting means anything at inf or nan (null means "none")
                raise BadValue(f"{key}={value!r} is not a finite number; expected a finite float")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return build(annotation, value, key)
    raise TypeError(f"{key}={value!r} has the wrong type; expected {_name(annotation)}")


class BadValue(ValueError):
    """A value of the right type that no field accepts (inf, nan)."""


def _name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def set_path(values: dict, root: type, path: list[str], value: Any, item: str) -> None:
    """Set ``values[path[0]][path[1]]...`` (the dict form of a ``root`` dataclass) to ``value``.

    Keys are checked against the dataclass fields on the way down (a section left None, or a dict
    field, becomes an empty mapping to set the key in); below a dict field any key goes. ``item`` is
    the override, for errors.
    """
    node, cls = values, root
    for depth, part in enumerate(path[:-1]):
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if cls is not None and part not in hints:
            valid = [f.name for f in fields(cls)]
            raise ValueError(f"unknown key {'.'.join(path[: depth + 1])!r} in override {item!r}; valid keys: {valid}")
        annotation = hints.get(part)
        section = _section(annotation) if annotation is not None else None
        if node.get(part) is None and annotation is not None and (section is not None or _is_dict(annotation)):
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ValueError(f"override {item!r}: {'.'.join(path[: depth + 1])} is not a section")
        node = node[part]
        cls = section
    last = path[-1]
    if cls is not None and last not in typing.get_type_hints(cls):
        valid = [f.name for f in fields(cls)]
        where = ".".join(path[:-1]) or "config"
        raise ValueError(f"unknown key {'.'.join(path)!r} in override {item!r}; valid keys of {where}: {valid}")
    node[last] = value


def _options(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _section(annotation: Any) -> type | None:
    """The dataclass of a field typed ``SomeDataclass`` or ``SomeDataclass | None``, else None."""
    return next((a for a in _options(annotation) if dataclasses.is_dataclass(a)), None)


def _is_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict for a in _options(annotation))


def plain(value: Any) -> Any:
    """Tuples as lists, so YAML and ``weights_only`` checkpoints hold plain types."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ---- YAML ------------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no arbitrary objects


def yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's complaint with its line and column (1-based), in one line."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else text
