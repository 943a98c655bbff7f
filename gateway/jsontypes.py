"""JSON (and TOML) value types as the request and config checks test and name them.

One definition for the gen2 body, the OpenAI create params and the config file, so the
three agree on what an integer is and how a wrong type is worded.
"""

from __future__ import annotations

from typing import Any

_NAMES: dict[type, str] = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}


def is_type(value: Any, kind: type) -> bool:
    """`isinstance`, except that a boolean is not an integer: JSON and TOML keep them apart,
    Python's `bool` subclasses `int`."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def a_type_name(kind: type) -> str:
    """The type as an error message says it: "a string", "an integer", ..."""
    return _NAMES.get(kind, "of another type")
