"""Pure figures the control-plane benchmarks share: percentiles, seconds and markdown tables, and the load line."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` (0-1) percentile with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within 0-1, got {share}")
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def seconds(value: float | None, places: int = 2) -> str:
    """A duration for a table cell: `1.23 s`, or an em dash when it was not observed."""
    return "—" if value is None else f"{value:.{places}f} s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """A GitHub markdown table; columns whose index is in `right` are right-aligned (numbers)."""
    width = len(header)
    for number, row in enumerate(rows, 1):
        if len(row) != width:
            raise ValueError(f"row {number} has {len(row)} cells, the header {width}: {list(row)}")
    rule = ["---:" if index in right else "---" for index in range(width)]
    return [f"| {' | '.join(cells)} |" for cells in (header, rule, *rows)]


def load_line(samples: Sequence[tuple[str, tuple[float, float, float]]], cores: int) -> str:
    """`os.getloadavg()` samples taken at named moments (their 1-minute averages), as one line for a results file."""
    readings = ", ".join(f"{moment} {load[0]:.2f}" for moment, load in samples)
    return (
        f"Load (`os.getloadavg()`, 1-minute average; {cores} cores): {readings}. The machine is shared with other "
        "engineers' work: a load above the core count means the run got less than the whole CPU."
    )
