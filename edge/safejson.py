"""JSON read from the broker, bounded before it is parsed.

Anything on the broker can be written by anyone allowed to publish there: retained discovery
configs, instance status and bridge info of other members, commands. :func:`loads_bounded` refuses
a document that is too large, nested too deeply (Python's parser recurses: a deep array raises
``RecursionError``) or holds an integer with too many digits (``int()`` past 4,300 digits raises,
and below that costs quadratic time), always as :class:`BoundedJsonError` (a ``ValueError``), so
a caller counts one exception type and never sees another.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_INT_DIGITS = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class BoundedJsonError(ValueError):
    """A document refused before or while parsing; the message says which bound or why."""


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (brackets inside strings ignored)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_bounded(
    payload: bytes | str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
) -> Any:
    """``json.loads(payload)`` within bounds, else :class:`BoundedJsonError`. NaN and Infinity
    are refused as well (they are not JSON)."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if len(data) > max_bytes:
        raise BoundedJsonError(f"{len(data)} bytes, more than {max_bytes}")
    if data.count(b"[") + data.count(b"{") > max_depth:  # only then can it be too deep
        depth = nesting_depth(data)
        if depth > max_depth:
            raise BoundedJsonError(f"nested {depth} deep, more than {max_depth}")

    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > max_int_digits:
            raise BoundedJsonError(f"an integer of {len(text)} digits, more than {max_int_digits}")
        return int(text)

    def refuse_constant(name: str) -> Any:
        raise BoundedJsonError(f"{name} is not JSON")

    try:
        return json.loads(data, parse_int=parse_int, parse_constant=refuse_constant)
    except BoundedJsonError:
        raise
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BoundedJsonError(f"not JSON ({exc})") from None
