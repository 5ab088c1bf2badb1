"""Answers as values: text (from a prompt or `--set`) or typed (from an answers file) into the
Python value a configuration key holds, with one clear error per bad answer.

Why not simply hand the text to the configuration model: the model is strict on purpose (TOML has
types, so `enabled = "no"` is a mistake there), but an operator typing at a prompt or on a command
line only has text. The key's type in the model decides how the text is read (`yes` for a bool,
`10.0.0.11, 10.0.0.12` for a list), then the model's own validator for that one key says whether
the value is acceptable, in the same words `confedge check` uses. Nothing here knows a key by
name: the model is the single source of types and rules.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any

from msgspec import Struct

from confedge.config import Config, ConfigError, field_types, parse_config

__all__ = ["AnswerError", "check_key", "convert", "field_kind", "fmt", "parse_bool", "split_list"]

_TRUE = {"y", "yes", "true", "on", "1"}
_FALSE = {"n", "no", "false", "off", "0"}


@dataclass
class AnswerError(Exception):
    """A bad answer: which key, what was given, and what is wrong with it (with the fix).

    `reason` already quotes the value where that helps (it is the model's own wording); `str()`
    is the one line an operator reads: `server.internal_address: "10.0.0.300" is not an IP
    address (e.g. "10.0.0.5" or "2001:db8::5")`.
    """

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def fmt(value: Any) -> str:
    """A value as an operator would write it in the file (strings quoted, lists bracketed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def parse_bool(text: str) -> bool | None:
    """yes/no, y/n, true/false, on/off, 1/0 (any case); None when it is none of them."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    return None


def split_list(text: str) -> list[str]:
    """A list typed as text: comma- or space-separated; "none" or "-" is the empty list."""
    t = text.strip()
    if t.lower() in ("none", "-", "[]"):
        return []
    return [p for p in t.replace(",", " ").split() if p]


def _model_field(key: str) -> tuple[type[Struct], str]:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in Config.__struct_fields__:
        raise AnswerError(key, "unknown key (check its spelling; see docs/CONFIGURATION.md)")
    section = field_types(Config)[parts[0]]
    assert isinstance(section, type) and issubclass(section, Struct)
    if parts[1] not in section.__struct_fields__:
        raise AnswerError(key, "unknown key (check its spelling; see docs/CONFIGURATION.md)")
    return section, parts[1]


def field_kind(key: str) -> str:
    """ "bool", "int", "float", "str", "list", "optional" (a str that may be unset) or "table"."""
    section, name = _model_field(key)
    ann = field_types(section)[name]
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in args:
        return "optional"
    if typing.get_origin(ann) is list:
        inner = args[0] if args else str
        return "table" if isinstance(inner, type) and issubclass(inner, Struct) else "list"
    if ann is bool:
        return "bool"
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    if typing.get_origin(ann) is typing.Literal:
        literal_args = typing.get_args(ann)
        return "int" if all(isinstance(a, int) for a in literal_args) else "str"
    return "str"


def convert(key: str, value: Any) -> Any:
    """The value `key` holds, from text or from an already typed value; None = unset the key.

    Raises AnswerError naming the key, the value and the form expected.
    """
    kind = field_kind(key)
    if kind == "table":
        section, name = key.split(".")
        raise AnswerError(
            key, f"is a list of tables; write it in the file as [[{section}.{name}]] entries"
        )
    if not isinstance(value, str):
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            return value
        return value  # typed (answers file): the model's check below says what is wrong
    text = value.strip()
    if kind == "bool":
        b = parse_bool(text)
        if b is None:
            raise AnswerError(key, f"{fmt(value)} is not yes or no (answer yes/no or true/false)")
        return b
    if kind in ("int", "float"):
        try:
            return int(text)
        except ValueError:
            pass
        if kind == "float":
            try:
                return float(text)
            except ValueError:
                pass
        word = "a whole number (digits only)" if kind == "int" else "a number (e.g. 300 or 0.5)"
        raise AnswerError(key, f"{fmt(value)} is not {word}")
    if kind == "list":
        return split_list(text)
    if kind == "optional" and not text:
        return None
    return text


def check_key(key: str, value: Any) -> Any:
    """Validate one key's value with the configuration model alone; return it unchanged.

    The other parts are switched off in the scratch configuration, so only this key's own rules
    speak (what the whole file needs together is checked once all answers are in).
    """
    if value is None:
        return None
    section, name = key.split(".")
    data: dict[str, Any] = {"proxy": {"enabled": False}, "turn": {"enabled": False}}
    data.setdefault(section, {})[name] = value
    try:
        parse_config(data)
    except ConfigError as exc:
        mine = [p for p in exc.problems if p.startswith((f"{key}:", f"{key}["))]
        if mine:
            # "proxy.nodes[1]: "x" is not ...": the item's message quotes the bad item itself
            raise AnswerError(key, mine[0].split(": ", 1)[1]) from None
    return value
