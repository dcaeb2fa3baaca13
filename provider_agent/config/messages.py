"""The one-line errors an operator reads when agent.toml is wrong: tomllib's and pydantic's
wording turned into the operator's, with the key path written as a TOML key (config.md)."""

from __future__ import annotations

import ast
import json
import re
from decimal import Decimal
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from provider_agent.errors import ConfigError, ConfigRuleError
from provider_agent.safe_text import printable

#: Characters a TOML basic string must escape beyond what json.dumps escapes.
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f]")


#: How tomllib writes a key in its messages: a tuple of strings, `('backends', 'x')`.
_KEY_TUPLE = re.compile(r"\((?:(?:'[^'\\]*'|\"[^\"\\]*\"),? ?)+\)")


def toml_message(message: str) -> str:
    """tomllib's wording, made an operator's: `duplicate` said plainly, keys written as keys."""
    where = re.search(r"\((at line \d+, column \d+|at end of document)\)$", message)
    position = f" ({where[1]})" if where else ""
    if message.startswith("Cannot overwrite"):
        return f"TOML syntax error: duplicate key{position}"
    keys = _KEY_TUPLE.search(message)
    if keys is None:
        return f"TOML syntax error: {message}"
    parts = ast.literal_eval(keys[0])
    dotted = printable(".".join(parts if isinstance(parts, tuple) else [parts]))
    if message.startswith("Cannot declare"):
        return f"TOML syntax error: duplicate table [{dotted}]{position}"
    return f"TOML syntax error: {message.replace(keys[0], dotted)}"


#: pydantic's error types, said the way an operator reads them.
_MESSAGES: Final = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (check the spelling against agent.toml.example)",
    "model_type": "must be a table (a [section] or { key = value })",
    "model_attributes_type": "must be a table (a [section] or { key = value })",
    "dict_type": 'must be a table, like { "key" = "value" }',
    "list_type": 'must be a list, like ["a", "b"]',
    "string_type": "must be a string in quotes",
    "bool_type": "must be true or false",
    "int_type": "must be an integer written without quotes",
    "int_parsing": "must be an integer written without quotes",
    "int_from_float": "must be an integer (a whole number, without a decimal point)",
    "float_type": "must be a number written without quotes",
    "float_parsing": "must be a number written without quotes",
    "finite_number": "must be a finite number",
    "decimal_type": "must be a number written without quotes",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}


def first_error(file: str, exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    # A misspelt key also makes the real one "missing": name the typo, it is the cause.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, ConfigRuleError):
        return ConfigError(file, ctx_error.key, _one_line(ctx_error.message))
    key = _key_path(error["loc"])
    message = _human_message(error)
    if message.startswith(("url: ", "markup: ", "api_key_env: ")):
        field, _, message = message.partition(": ")
        key = f"{key}.{field}"
    return ConfigError(file, key, _one_line(message))


def _human_message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "less_than_equal": ("at most", "le"),
        "greater_than": ("greater than", "gt"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds and bounds[kind][1] in ctx:
        word, name = bounds[kind]
        return f"must be {word} {number_text(ctx[name])}"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be {ctx['expected']}"
    message = str(error["msg"])
    message = re.sub(r"^Input should be", "must be", message)
    return re.sub(r" or instance of \w+", "", message)


def number_text(value: Any) -> str:
    """Large bounds the way TOML writes them (1_000_000_000_000_000), readable at a glance."""
    if isinstance(value, int) and abs(value) >= 100_000:
        return f"{value:_}"
    if isinstance(value, float | Decimal) and value == int(value):
        return str(int(value))
    return str(value)


def _one_line(message: str) -> str:
    """Errors are one line, whatever text (a key, a value) ended up inside them."""
    return " ".join(message.split())


def _toml_escaped(text: str) -> str:
    """A key as a TOML basic string writes it: what json.dumps left raw, as a `\\u` escape of
    four hex digits."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """('backends', 1, 'url') → 'backends[1].url'; models-table keys are quoted when needed."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's marker for "the key itself" (of the table entry just named)
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            # A JSON string is a valid TOML basic string: quotes, newlines etc. come out escaped.
            # Line and paragraph separators, which json leaves raw, are escaped as well.
            quoted = _toml_escaped(json.dumps(part, ensure_ascii=False))
            out += f".{quoted}" if out else quoted
    return out
