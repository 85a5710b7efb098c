"""One shard's verdict under one check: the problems found, each with a stable reason and a detail that
names the first bad key, and whether they are corruption (ERROR) or quality (WARN)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """`reason` is a short stable label to group shards by ("image hash mismatch"); `detail` is the full
    sentence with counts and the first bad key."""

    reason: str
    detail: str


@dataclass
class ShardVerdict:
    shard: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    counts: dict[str, int | float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.errors and not self.warnings

    @property
    def severity(self) -> str:
        """ERROR when anything is corrupted, else WARN (also the severity a passing result carries)."""
        return "ERROR" if self.errors else "WARN"

    @property
    def first(self) -> Problem | None:
        problems = self.errors or self.warnings
        return problems[0] if problems else None

    def error(self, reason: str, detail: str) -> None:
        self.errors.append(Problem(reason, detail))

    def warn(self, reason: str, detail: str) -> None:
        self.warnings.append(Problem(reason, detail))


def first_keys(label: str, keys: Sequence[str], reason: str) -> Problem:
    """`3 <label>, first 000010002` — the count and the first key in key order."""
    ordered = sorted(keys)
    return Problem(reason, f"{len(ordered)} {label}, first {ordered[0]}")


def audit_each(keys: Iterable[str], audit_one) -> Iterator[ShardVerdict]:  # a callable key → verdict
    """Audit shards one by one; an unexpected exception is that shard's ERROR, never the end of the audit."""
    for key in keys:
        try:
            yield audit_one(key)
        except Exception as err:  # one unreadable shard must not hide the others
            verdict = ShardVerdict(key)
            verdict.error("audit crashed", f"{type(err).__name__}: {err}")
            yield verdict
