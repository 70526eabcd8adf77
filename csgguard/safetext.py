"""Text a hostile file name cannot forge: visible escapes, rich-safe, spreadsheet-safe.

File names, class names and run paths are chosen by whoever made the files. Before
any of them reaches a terminal, a CSV file or a rich table, it passes through here:

* :func:`visible` makes every byte that would not print as itself visible, and never
  drops one: a backslash becomes ``\\\\``, newline / tab / carriage return become
  ``\\n`` / ``\\t`` / ``\\r``, other control characters (ESC, DEL, C1, bidi overrides,
  line separators) become ``\\xNN`` / ``\\uNNNN``, and bytes that are not UTF-8 become
  ``\\xNN``. Every backslash in the result starts an escape, so two different names
  never print the same (``x<0xff>.png`` is ``x\\xff.png``; a file literally named
  ``x\\xff.png`` prints as ``x\\\\xff.png``). Names without those characters print
  unchanged. Every output format (table, CSV, JSON, JSON lines, logs, errors) applies
  it exactly once, at the point of output; the Python API keeps the raw names.
* :func:`rich_safe` also escapes rich markup (``[b]``, ``[/x]``), for anything rich renders.
* :func:`csv_cell` neutralises spreadsheet formulas: a text cell starting with ``=``,
  ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'`` (OWASP's advice,
  what spreadsheet-safe exporters do), so ``=HYPERLINK(...)`` stays text. Numbers are
  written as numbers.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any

_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a non-UTF-8 byte carried by os.fsdecode's surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return ch


def visible(value: Any) -> str:
    """``value`` as text with every invisible or ambiguous character escaped (see the module doc)."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    elif isinstance(value, os.PathLike):
        value = os.fsdecode(os.fspath(value))
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text  # the common case, unchanged and fast
    return "".join(_escape_char(ch) for ch in text)


def visible_all(obj: Any) -> Any:
    """``obj`` with :func:`visible` applied to every string in it (keys included): for JSON output."""
    if isinstance(obj, str):
        return visible(obj)
    if isinstance(obj, dict):
        return {visible_all(k): visible_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [visible_all(v) for v in obj]
    return obj


def rich_safe(value: Any) -> str:
    """:func:`visible`, then rich's markup escape: safe to hand to any rich ``print``."""
    from rich.markup import escape

    return escape(visible(value))


def csv_cell(value: Any) -> Any:
    """A CSV cell: ``None`` -> empty, text made visible and formula-neutralised, numbers as they are."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return value
    text = visible(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


__all__ = ["FORMULA_PREFIXES", "csv_cell", "rich_safe", "visible", "visible_all"]
