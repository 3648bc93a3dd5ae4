"""The checks a number or a settings object passes where it enters (the CLI's parsing, a library
call, an API request, a recorded plan read back): a number is finite and fits in float32, as every
tensor it ends up in does; a dataclass's fields are of their declared types (a JSON file edited by
hand, or a library caller, can hand over anything).

Knows nothing of what the numbers mean: ranges belong to the module that uses them.
"""

from __future__ import annotations

import math
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from gemmascope.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
FINITE32 = f"a finite number within ±{FLOAT32_MAX:.4g} (float32)"  # what every number must be


def finite32(value: object, what: str) -> float:
    """`value` as a float when it is a real number, finite and within float32's range (a larger one
    becomes inf in a tensor: a crash when clamped to, NaN when added); else a ConfigError naming
    `what` (e.g. "--strength")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        why = "is out of range" if math.isfinite(number) else "is not finite"
        raise ConfigError(f"{what} {value!r} {why}: expected {FINITE32}")
    return number


def check_fields(obj: Any, what: str) -> None:
    """Every field of the dataclass `obj` of its annotated type (`int`, `float`, `str`, `bool`,
    `list[...]`, `... | None`); its numbers finite float32. A ConfigError names the first that is not."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _fits(value, hints[f.name]):
            name = _name(hints[f.name])
            note = " (numbers finite and within float32)" if "float" in name else ""
            raise ConfigError(f"{what}: {f.name} {value!r} is not valid: expected {name}{note}")


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX
        )
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
