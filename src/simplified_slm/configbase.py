"""Validated dataclass configs shared by models, tokenizers, data and training.

Configs come from files users edit by hand, so every parse error must name the section,
the field and the fix instead of surfacing later as a shape error deep inside torch.
`ConfigBase.from_dict` checks unknown keys (with a "did you mean" hint) and types against
the dataclass annotations; subclasses add range checks in `validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from simplified_slm.errors import SLMError

T = TypeVar("T", bound="ConfigBase")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise SLMError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SLMError as err:
                errors.append(str(err))
        raise SLMError(errors[0] if len(errors) == 1 else
                       f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SLMError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SLMError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise SLMError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SLMError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, value_tp = (typing.get_args(tp) or (Any, Any))[:2]
        out = {}
        for key, item in value.items():
            if key_tp is str and not isinstance(key, str):
                raise SLMError(f"{where}: key {key!r} must be a string")
            out[key] = _check_json(item, f"{where}.{key}") if value_tp is Any else _coerce(item, value_tp,
                                                                                         f"{where}.{key}")
        return out
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SLMError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SLMError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SLMError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SLMError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SLMError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _check_json(value: Any, where: str, _open: frozenset[int] = frozenset()) -> Any:
    """Free-form config values (`dict[str, Any]`, whole config files) must be plain JSON
    data: configs are hashed and stored as JSON in run.json and checkpoints, so a YAML date,
    a non-string key or a self-referencing YAML alias would otherwise fail later, mid-run."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, dict)):
        if id(value) in _open:
            raise SLMError(f"{where}: the value contains itself (a recursive YAML alias)")
        inner = _open | {id(value)}
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise SLMError(f"{where}: key {key!r} must be a string")
            return {k: _check_json(v, f"{where}.{k}", inner) for k, v in value.items()}
        return [_check_json(v, f"{where}[{i}]", inner) for i, v in enumerate(value)]
    raise SLMError(f"{where}: {str(value)[:60]!r} is a {type(value).__name__}; use a number, string, true/false, "
                   "list or mapping (quote dates and other YAML types)")


@dataclasses.dataclass
class ConfigBase:
    """Base of every config: strict parsing, validation and a JSON round trip."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            where = f"{type(self).__name__}.{field.name}"
            setattr(self, field.name, _coerce(value, hints[field.name], where))
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; raise SLMError naming the field."""

    def _fail(self, field: str, message: str) -> None:
        raise SLMError(f"{type(self).__name__}.{field}: {message}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise SLMError(f"{where}: expected a mapping, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SLMError(f"{where}: unknown key {key!r}; {hint}valid keys: {', '.join(names)}")
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise SLMError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(read_config_file(path), where=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON or YAML config file (never executed) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise SLMError(f"config file not found: {path}; pass an existing .json or .yaml file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError / yaml.YAMLError
        raise SLMError(f"cannot parse config {path}: {parse_error_where(err)}; fix the file there") from None
    if not isinstance(data, dict):
        raise SLMError(f"config {path} must hold a mapping at the top level, got {type(data).__name__}")
    return _check_json(data, f"config {path}")


def parse_error_where(err: Exception) -> str:
    """A JSON or YAML parse error as one line that keeps its position: "line 4, column 2:
    <problem> (<context> at line 1, column 1)". PyYAML's own message spreads the position
    over several lines, which a one-line error would otherwise cut off."""
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem is None or mark is None:  # not a marked YAML error
        return (str(err).splitlines() or [type(err).__name__])[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        where += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        where += f" ({context})"
    return where
