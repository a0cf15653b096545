"""Figures the fault tests measure, printed as a table at the end of the run.

RELIABILITY.md quotes this table; every row comes from a test that asserts it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Figures", "finishes", "outcomes"]


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


def outcomes(read_logs: Callable[[], list[str]], job_ids: list[str],
             timeout: float = 10.0) -> list[int]:
    """Outcomes per job, once each has one: a worker logs it just after the result lands."""
    def counts() -> list[int]:
        logs = read_logs()
        return [finishes(logs, job_id) for job_id in job_ids]
    deadline = time.monotonic() + timeout
    while min(counts(), default=1) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts()
