"""Markdown tables of result rows, the one formatter behind benchmark.py's tables and the trade-off's."""
from __future__ import annotations

import math
from collections.abc import Sequence


def cell(value, spec: str = "") -> str:
    """One table cell: `value` formatted with `spec` (format()'s mini-language), "-" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown_table(rows: Sequence[dict], cols: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with one column per (key, format spec) in `cols`, in that order."""
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c], spec) for c, spec in cols) + " |" for r in rows]
    return "\n".join(lines)
