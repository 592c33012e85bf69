"""The pass manager: run named passes in order, lint after each, keep a report and optional IR dumps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx

# A pass rewrites the graph in place and returns counts of what it changed.
Pass = Callable[[fx.GraphModule], dict[str, int]]


@dataclass(frozen=True)
class PassReport:
    name: str
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        changes = ", ".join(f"{k}={v}" for k, v in self.counts.items()) or "no change"
        return f"{self.name}: {changes}"


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[tuple[str, Pass]],
    observe: Callable[[str, fx.GraphModule], None] | None = None,
) -> list[PassReport]:
    """Apply `passes` to `gm` in order. `observe(label, gm)` sees the graph before the first pass and after
    each (to print the IR, or, in tests, to check the program against the reference)."""
    if observe:
        observe("captured", gm)
    reports = []
    for name, rewrite in passes:
        counts = rewrite(gm)
        gm.graph.lint()
        gm.recompile()
        reports.append(PassReport(name, counts))
        if observe:
            observe(f"after {name}", gm)
    return reports
