"""Size limits on untrusted JSON, checked before and after decoding (intake, receipt webhooks).

``json.loads`` recurses once per level of nesting: 100 KB of ``[`` raises ``RecursionError`` deep
inside the decoder. So the nesting depth is measured on the raw bytes first, without recursion and
without decoding; only a document within every limit is decoded, and then walked (iteratively) for
string and list lengths. Every refusal is a ``DecodeError`` or ``SchemaError`` naming the limit and
where it was passed, so the sender knows what to change.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.errors import DecodeError, SchemaError
from gateway.settings import InputLimits

# a JSON string (with escapes), or one bracket: strings are skipped, brackets counted
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def check_depth(raw: bytes, max_depth: int) -> None:
    """Raise DecodeError if brackets nest deeper than ``max_depth`` (strings are not counted)."""
    depth = 0
    for m in _TOKENS.finditer(raw):
        token = m.group()
        if len(token) != 1:
            continue  # a string
        if token[0] in _OPEN:
            depth += 1
            if depth > max_depth:
                raise DecodeError(
                    f"nested deeper than {max_depth} levels at byte {m.start()}; "
                    "an advisory is a flat object with a few nested lists"
                )
        else:
            depth -= 1


def check_sizes(value: Any, limits: InputLimits) -> None:
    """Raise SchemaError naming the first string or list (by its path) longer than the limits."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if len(node) > limits.max_string_chars:
                raise SchemaError(
                    f"{path or 'value'}: {len(node)} characters; the limit is {limits.max_string_chars}"
                )
        elif isinstance(node, list):
            if len(node) > limits.max_list_items:
                raise SchemaError(
                    f"{path or 'value'}: {len(node)} items; the limit is {limits.max_list_items}"
                )
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
        elif isinstance(node, dict):
            if len(node) > limits.max_list_items:
                raise SchemaError(
                    f"{path or 'value'}: {len(node)} keys; the limit is {limits.max_list_items}"
                )
            for k, v in node.items():
                key = f"{path}.{k}" if path else str(k)
                if len(k) > limits.max_string_chars:
                    raise SchemaError(f"{path or 'value'}: a key of {len(k)} characters")
                stack.append((key, v))


def load_json(raw: bytes, limits: InputLimits) -> Any:
    """Untrusted bytes → a JSON value within ``limits``, or DecodeError / SchemaError saying why not."""
    if len(raw) > limits.max_record_bytes:
        raise DecodeError(f"{len(raw)} bytes; the limit is {limits.max_record_bytes}")
    check_depth(raw, limits.max_depth)
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as e:
        raise DecodeError(f"not UTF-8 text: {e.reason} at byte {e.start}") from e
    except ValueError as e:  # JSONDecodeError, and int() of a number with thousands of digits
        raise DecodeError(f"not JSON: {e}") from e
    check_sizes(value, limits)
    return value
