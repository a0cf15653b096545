"""Figures the fault tests measure, printed as a table at the end of the run.

RELIABILITY.md quotes this table; every row comes from a test that asserts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Figures", "finishes"]


@dataclass
class Figures:
    """Rows of (fault, jobs, lost, duplicate results, repeated calls, recovery)."""

    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)

    def add(self, fault: str, jobs: int, lost: int, duplicates: int, repeated: int,
            recovered_in: float | None = None) -> None:
        """Record one measured fault."""
        recovery = "-" if recovered_in is None else f"{recovered_in:.1f} s"
        self.rows.append((fault, str(jobs), str(lost), str(duplicates), str(repeated), recovery))

    def table(self) -> str:
        """The rows as a Markdown table."""
        head = ("fault", "jobs", "lost", "duplicate results", "repeated upstream calls",
                "time to recover")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def finishes(logs: list[str], job_id: str) -> int:
    """How many times workers recorded an outcome for the job (their INFO log lines).

    A worker logs ``job <id> <status> (`` only after its finish script was
    accepted, so more than one means a second result was written.
    """
    needle = re.compile(rf"job {re.escape(job_id)} (succeeded|failed|cancelled) \(")
    return sum(len(needle.findall(text)) for text in logs)
