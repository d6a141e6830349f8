"""Plain text for the reports of the matrix and the bench: one table renderer
(`format_table`, plain or Markdown) and the line of an error worth showing
(`last_line`).

Owned by neither tool, so that both use it without importing each other.
Imports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table", "last_line"]


def format_table(
    header: Sequence[object],
    rows: Sequence[Sequence[object]],
    *,
    markdown: bool = False,
) -> str:
    """A table of `rows` under `header` as text: columns padded to their
    widest entry, or with `markdown` a Markdown table (`| a | b |`)."""
    if markdown:
        return "\n".join(
            [
                "| " + " | ".join(str(c) for c in header) + " |",
                "|" + "---|" * len(header),
                *["| " + " | ".join(str(c) for c in row) + " |" for row in rows],
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def last_line(text: object, default: str = "") -> str:
    """The last non-empty line of an error text (a traceback's exception line)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else default
