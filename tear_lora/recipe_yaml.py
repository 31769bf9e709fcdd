"""How a recipe's YAML becomes typed objects: line numbers, strict types, closest-key suggestions.

Why by hand (instead of pydantic): the errors are the interface. Every problem names the file, the line and
the dotted key path; a misspelled key gets the closest valid one; nothing is coerced except ints widening to
floats, so `lr: 1e-4` written as a string is caught here rather than deep inside the optimizer. Nothing here
knows what a recipe contains: recipe.py declares the sections, this maps a mapping onto them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe problem a user can fix; the message says where and how."""



def read_yaml(path: Path, text: str | None = None) -> tuple[dict, dict[str, int]]:
    """(the recipe file as a dict, each dotted key path's line); every problem a RecipeError naming FILE:LINE.
    `text`: the file's contents when the caller has already read them."""
    if text is None and not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
        lines = key_lines(yaml.compose(text), str(path))  # first: refuses duplicate keys before they are lost
        raw = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of sections (model, lora, data, ...)")
    return raw, lines


@dataclass
class Where:
    file: str
    lines: dict[str, int]
    overridden: set[str] = field(default_factory=set)

    def __call__(self, key_path: str) -> str:
        line = self.lines.get(key_path)
        while line is None and "." in key_path:
            key_path = key_path.rsplit(".", 1)[0]
            line = self.lines.get(key_path)
        return f"{self.file}:{line}" if line else self.file


def key_lines(node, source: str, prefix: str = "") -> dict[str, int]:
    """Map each dotted key path to its 1-based line, from the YAML node tree. A key twice in one mapping is
    refused: YAML loaders keep the last value silently, so half of what the user wrote would not apply."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_path in lines:
                raise RecipeError(f"{source}:{line}: duplicate key '{key_path}' (first at line {lines[key_path]}); "
                                  "YAML would silently keep only the last one: merge them into one")
            lines[key_path] = line
            lines.update(key_lines(value_node, source, key_path + "."))
    return lines


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. objective.lambda=0.5")
    key_path, value = item.split("=", 1)
    parts = key_path.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key_path}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def field_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def build(cls, raw: Any, prefix: str, where: Where):
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(prefix.rstrip('.'))}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    fields = {field_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise RecipeError(f"{where(prefix + str(key))}: unknown key '{prefix}{key}'{suggest(str(key), fields)}")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            continue
        key_path, value = prefix + key, raw[key]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = build(hint, value if value is not None else {}, key_path + ".", where)
        elif "check" in f.metadata:  # a section passed through to another library, checked by its owner
            values[f.name] = f.metadata["check"](value if value is not None else {}, where)
        else:
            values[f.name] = check_type(value, hint, key_path, where)
            choices = f.metadata.get("choices")
            if choices is not None and values[f.name] not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise RecipeError(f"{where(key_path)}: '{key_path}' must be one of {allowed}, got {value!r}")
    return cls(**values)


def check_type(value: Any, hint, key_path: str, where: Where):
    """Accept `value` if it fits the annotation; ints widen to floats, nothing else is coerced."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if origin is dict and isinstance(value, dict):
            return value
    names = " or ".join(type_name(o) for o in options)
    raise RecipeError(f"{where(key_path)}: '{key_path}' must be {names}, got {type(value).__name__} {value!r}")


def type_name(hint) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint) or hint
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list of strings",
            dict: "a mapping"}.get(origin, str(hint))


def yaml_quirks(key: str, value: Any) -> Any:
    """YAML 1.1 reads a bare `no` as false (every *_strategy field means the string "no") and `5e-2` (no dot)
    as a string; TrainingArguments would only fail on them deep inside the optimizer."""
    if value is False and key.endswith("_strategy"):
        return "no"
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {field_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj
