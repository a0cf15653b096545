"""``top``'s view of a snapshot, read back as its tables' rows of cells."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from api_tasks import top

__all__ = ["top_rows"]


def top_rows(now: dict[str, Any], before: dict[str, Any] | None) -> list[list[str]]:
    """Every table row ``top`` shows for ``now`` (rates against ``before``), as its cells."""
    console = Console(record=True, width=240)
    console.print(top.render(now, before, "p"))
    return [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in console.export_text().splitlines() if line.startswith("│")]
