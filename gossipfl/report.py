"""Text shared by the commands that print results: Markdown tables and readable units."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B"))


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table, padded so it also reads as plain text."""
    texts = [[cell(row.get(c)).replace("|", "\\|") for c in columns] for row in rows]
    widths = [max(len(c), 3, *(len(t[i]) for t in texts)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(t.ljust(w) for t, w in zip(row, widths)) + " |" for row in texts]
    return "\n".join(lines)


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the unit that shows `largest` bytes with one to three integer digits."""
    return next(((size, name) for size, name in BYTE_UNITS if largest >= size), BYTE_UNITS[-1])


def readable_bytes(count: float) -> str:
    size, name = byte_unit(count)
    return f"{count / size:.3g} {name}"
