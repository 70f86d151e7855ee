"""Plain-text tables for the CLIs' printouts: columns padded to their widest cell."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str,
    rule: bool = False,
    min_widths: Sequence[int] | None = None,
) -> str:
    """Header and rows as lines of columns two spaces apart.

    Args:
        align: one letter per column, ``l`` (left) or ``r`` (right).
        rule: a line of dashes under the header.
        min_widths: the least width of each column (e.g. one width for columns of numbers).
    """
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    if min_widths is not None:
        widths = [max(w, m) for w, m in zip(widths, min_widths, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            f"{cell:<{width}}" if side == "l" else f"{cell:>{width}}"
            for cell, width, side in zip(map(str, cells), widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(header)]
    if rule:
        lines.append("-" * len(lines[0]))
    return "\n".join(lines + [line(row) for row in rows])


def render_rows(rows: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines, the names padded to the longest."""
    return render_table(("", ""), rows, "ll").split("\n", 1)[1] if rows else ""
